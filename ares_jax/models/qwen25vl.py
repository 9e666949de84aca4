"""The Qwen2.5-VL policy: token embedding, vision tower, decoder, LM head; and `forward`.

`forward` takes exactly what the Hugging Face processor returns; everything that depends on
concrete image sizes is prepared on the host (`positions`), then one jitted program runs.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from ares_jax import sharding
from ares_jax.models import lora
from ares_jax.models import positions as pos_lib
from ares_jax.models.config import ModelConfig
from ares_jax.models.layers import RMSNorm
from ares_jax.models.text import Decoder, DecoderLayer, mrope_cos_sin, segment_ids
from ares_jax.models.vision import VisionInputs, VisionTower

Params = Any
# What the processor returns besides input_ids and attention_mask, as `forward` and `generate` take them.
MEDIA_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@struct.dataclass
class ModelInputs:
  """What one forward reads, in this order everywhere: token ids [B, T] int32, M-RoPE positions
  [3, B, T] int32 (`positions.mrope_positions`), the attention mask [B, T] (1 = token, 0 = padding) and
  the prepared vision inputs (`prepare_vision`; None: text only), and optionally shared prompts: `prefix`
  [B, T] int32 holds, for each token, the `mask` value (segment) of a prompt earlier in its row that it
  also attends to, besides its own segment, causally in both (-2, or any value <= 0: none). One row can
  thus hold a prompt once followed by several responses, each with its own packing id and the prompt's as
  prefix, positions continuing from the prompt's end in each (`train.packing`). A pytree: it crosses `jit` as one argument, and memory plans turn it into
  abstract arrays as a whole."""

  ids: jax.Array
  positions: jax.Array
  mask: jax.Array
  vision: VisionInputs | None = None
  prefix: jax.Array | None = None


class Qwen25VL(nn.Module):
  config: ModelConfig

  def setup(self):
    cfg, tc = self.config, self.config.text
    pd = jnp.dtype(cfg.param_dtype)
    self.embed_tokens = nn.Embed(
        tc.vocab_size, tc.hidden_size, dtype=cfg.compute_dtype, param_dtype=pd,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    self.visual = VisionTower(cfg)
    self.decoder = Decoder(cfg)
    self.norm = RMSNorm(tc.rms_norm_eps, "embed", pd)
    if not cfg.tie_word_embeddings:
      self.lm_head = self.param("lm_head", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                         ("embed", "vocab")),
                                (tc.hidden_size, tc.vocab_size), pd)

  def embed(self, input_ids: jax.Array, vision: VisionInputs | None) -> jax.Array:
    """Token embeddings with image and video placeholders replaced by merged vision features: [B, T, E]."""
    x = self.embed_tokens(input_ids)
    if vision is None:
      return x
    feats = self.visual(vision).astype(x.dtype)  # [M, E]: every image's features, then every video's
    is_image = input_ids == self.config.image_token_id
    is_video = input_ids == self.config.video_token_id
    # masked_scatter semantics, per kind: the k-th image token (row-major over the batch) takes image
    # feature k, the k-th video token video feature k, which follows all image features
    count = lambda m: jnp.cumsum(m.reshape(-1)).reshape(m.shape) - 1
    k = jnp.where(is_image, count(is_image), count(is_video) + is_image.sum())
    gathered = jnp.take(feats, jnp.clip(k, 0, feats.shape[0] - 1), axis=0)
    return jnp.where((is_image | is_video)[..., None], gathered, x)

  def logits(self, x: jax.Array) -> jax.Array:
    """[B, T, E] final hidden states -> float32 logits [B, T, V] (float32 accumulation in bf16 too)."""
    x = self.norm(x)
    w = self.embed_tokens.embedding.T if self.config.tie_word_embeddings else self.lm_head
    out = jnp.einsum("bte,ev->btv", x, jnp.asarray(w, x.dtype), preferred_element_type=jnp.float32,
                     precision=jax.lax.Precision.HIGHEST)
    return nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_vocab"))

  def __call__(self, inputs: ModelInputs):
    """Logits [B, T, V] float32 of every position of `inputs`."""
    x = self.embed(inputs.ids, inputs.vision)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    cos, sin = mrope_cos_sin(self.config.text, inputs.positions)
    x, _ = self.decoder(x, cos, sin, segment_ids(inputs.mask), _prefix(inputs))
    return self.logits(x)

  def prefill(self, inputs: ModelInputs):
    """Runs the prompt and returns its KV cache entries (k, v) [L, B, T, K, D]; no LM head."""
    x = self.embed(inputs.ids, inputs.vision)
    cos, sin = mrope_cos_sin(self.config.text, inputs.positions)
    _, kv = self.decoder(x, cos, sin, segment_ids(inputs.mask), _prefix(inputs))
    return kv


def _prefix(inputs: ModelInputs) -> jax.Array | None:
  """The attention prefixes of `inputs.prefix`; -2 (matches no segment) for padding and values <= 0, which
  would otherwise make a token read the padding segments 0 / -1 (`segment_ids`)."""
  if inputs.prefix is None:
    return None
  prefix = inputs.prefix.astype(jnp.int32)
  return jnp.where((inputs.mask > 0) & (prefix > 0), prefix, -2)


@jax.jit
def unstack_layers(params) -> tuple[Params, ...]:
  """The stacked decoder weights as L per-layer trees, each leaf its own buffer (a copy); a layer's
  adapters, if any, under its tree's "lora" key (`lora.variables` reads them)."""
  stacked = params["decoder"]["layers"]
  if lora.POLICY_KEY in params:
    stacked = lora.with_adapters(stacked, params[lora.POLICY_KEY]["decoder"]["layers"])
  n = jax.tree.leaves(stacked)[0].shape[0]
  return tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n))


def decode_step(config: ModelConfig, params, layers: Sequence[Params], tokens, positions,
                attend: Sequence[Callable]):
  """One cached decode step over per-layer weights `layers` (from `unstack_layers(params)`; with adapters
  unless `config` has none, e.g. when they are merged into the layers' weights).

  tokens [B]; positions [B] (text tokens: the same id on all three M-RoPE axes); attend: L functions
  `(q [B, 1, H, D], k, v [B, 1, K, D]) -> (out [B, 1, H, D], update)`, each the attention over one
  layer's cache and the token's own key (`layers.cache_reader` for a dense cache [B, S, K, D], whose
  update is the token's (k, v); or the sampler's pages).
  Returns (logits [B, V] float32, the L layers' updates).

  Why unrolled over separate buffers: a scanned decoder slices every layer's weights and cache out
  of the stacked arrays each step, and XLA materialises those slices as copies (so do static slices
  taken inside the jitted loop); benchmarks/decode_scan_vs_unrolled.py measures the difference.
  """
  model = Qwen25VL(config)
  top = {"params": lora.base_params(params)}  # the embedding and LM head are never adapted
  x = model.apply(top, tokens[:, None], method=lambda m, t: m.embed_tokens(t))
  pos3 = jnp.broadcast_to(positions[None, :, None], (3, tokens.shape[0], 1))
  cos, sin = mrope_cos_sin(config.text, pos3)
  layer = DecoderLayer(config)
  updates = []
  for layer_params, layer_attend in zip(layers, attend, strict=True):
    x, update = layer.apply(lora.variables(config, layer_params), x, cos, sin, None, attend=layer_attend)
    updates.append(update)
  return model.apply(top, x, method=Qwen25VL.logits)[:, 0], updates


def check_inputs(config: ModelConfig, input_ids, attention_mask, pixel_values, image_grid_thw,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> None:
  """Raises `InputError` naming what was found and what was expected (shapes, token counts)."""
  if input_ids.ndim != 2:
    raise pos_lib.InputError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
  if attention_mask.shape != input_ids.shape:
    raise pos_lib.InputError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
  _check_media(config, "image", config.image_token_id, input_ids, attention_mask, pixel_values, image_grid_thw,
               names=("pixel_values", "image_grid_thw"))
  _check_media(config, "video", config.video_token_id, input_ids, attention_mask, pixel_values_videos,
               video_grid_thw, names=("pixel_values_videos", "video_grid_thw"))
  if second_per_grid_ts is not None:
    n_videos = 0 if video_grid_thw is None else len(np.asarray(video_grid_thw).reshape(-1, 3))
    if np.asarray(second_per_grid_ts).reshape(-1).shape != (n_videos,):
      raise pos_lib.InputError(f"second_per_grid_ts has shape {np.shape(second_per_grid_ts)}; expected one "
                               f"value per video ({n_videos}, from video_grid_thw)")


def _check_media(config: ModelConfig, kind: str, token_id: int, input_ids, attention_mask, pixels, grid, *,
                 names: tuple[str, str]) -> None:
  pixels_name, grid_name = names
  n_tokens = int(((input_ids == token_id) & (attention_mask > 0)).sum())
  if pixels is None or grid is None:
    if n_tokens:
      raise pos_lib.InputError(f"input_ids hold {n_tokens} {kind} tokens but no {pixels_name}/{grid_name} "
                               "were given")
    return
  vc = config.vision
  grid = np.asarray(grid).reshape(-1, 3)
  n_patches = int(grid.prod(-1).sum())
  if pixels.ndim != 2 or pixels.shape != (n_patches, vc.patch_dim):
    raise pos_lib.InputError(
        f"{pixels_name} shape {tuple(pixels.shape)} does not match {grid_name}, which implies "
        f"({n_patches}, {vc.patch_dim}) = (sum of t*h*w, channels*temporal_patch*patch**2)")
  if np.any(grid[:, 1:] % vc.spatial_merge_size):
    raise pos_lib.InputError(f"{grid_name} {grid.tolist()}: h and w must be multiples of spatial_merge_size")
  n_merged = int(pos_lib.merged_token_counts(grid, vc).sum())
  if n_tokens != n_merged:
    raise pos_lib.InputError(
        f"input_ids hold {n_tokens} {kind} tokens but {grid_name} gives {n_merged} merged patches "
        f"(t*h*w/{vc.merge_unit} per {kind}); likely causes: the prompt was truncated (max_prompt_length) "
        f"through the {kind}, or <|{kind}_pad|> was expanded with a different max_pixels/min_pixels than the "
        f"processor that produced {pixels_name}")


def prepare_vision(config: ModelConfig, pixel_values, image_grid_thw, min_windows: int = 1, *,
                   pixel_values_videos=None, video_grid_thw=None) -> VisionInputs | None:
  """Host-side: pixel rows and grids -> `VisionInputs` in the bucketed slot layout; None without any.

  The tower sees every image, then every video (a video is an image of t > 1 temporal patches: its frames
  attend within themselves), the order in which `Qwen25VL.embed` places their features. Pixels may be
  `jax.ShapeDtypeStruct`s (memory plans of many large images, whose pixel rows need not exist): the
  layout is computed as usual and `patches` is abstract too.
  """
  kinds = [(p, np.asarray(g, np.int64).reshape(-1, 3)) for p, g in
           ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)) if p is not None and g is not None]
  kinds = [(p, g) for p, g in kinds if len(g)]
  if not kinds:
    return None
  grid = np.concatenate([g for _, g in kinds])
  layout = pos_lib.vision_layout(grid, config.vision, min_windows)
  src = layout["patch_src"]
  if any(isinstance(p, jax.ShapeDtypeStruct) for p, _ in kinds):
    patches = jax.ShapeDtypeStruct((len(src), config.vision.patch_dim), jnp.float32)
  else:
    pixels = np.concatenate([np.asarray(p, dtype=np.float32) for p, _ in kinds])
    patches = np.where((src >= 0)[:, None], pixels[np.maximum(src, 0)], 0.0).astype(np.float32)
  full = np.isin(np.arange(config.vision.depth), config.vision.fullatt_block_indexes)
  return VisionInputs(patches=patches, slot_segment=layout["slot_segment"], pos_hw=layout["pos_hw"],
                      merged_index=layout["merged_index"], full_layer=full)


def media_vision(config: ModelConfig, media: Mapping[str, Any], min_windows: int = 1) -> VisionInputs | None:
  """`prepare_vision` of the images and videos of a processor-style dict (any of its keys may be absent)."""
  return prepare_vision(config, media.get("pixel_values"), media.get("image_grid_thw"), min_windows,
                        pixel_values_videos=media.get("pixel_values_videos"),
                        video_grid_thw=media.get("video_grid_thw"))


def media_positions(config: ModelConfig, input_ids, attention_mask, media: Mapping[str, Any]) -> np.ndarray:
  """`positions.mrope_positions` [3, B, T] of rows whose images and videos are those of `media`."""
  return pos_lib.mrope_positions(input_ids, attention_mask, media.get("image_grid_thw"), config,
                                 media.get("video_grid_thw"), media.get("second_per_grid_ts"))[0]


@functools.partial(jax.jit, static_argnums=0)
def _apply(config: ModelConfig, params, inputs: ModelInputs):
  return Qwen25VL(config).apply(lora.variables(config, params), inputs)


def forward(config: ModelConfig, params: Params, input_ids, attention_mask, pixel_values=None,
            image_grid_thw=None, *, pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
            length_bucket: int = 64) -> jax.Array:
  """Logits [B, T, V] float32 for a batch as the Hugging Face processor returns it.

  Left or right padding; images as `pixel_values` [sum(t*h*w), 1176] with `image_grid_thw`
  [num_images, 3]; videos as `pixel_values_videos` with `video_grid_thw` [num_videos, 3] and
  `second_per_grid_ts` [num_videos] (seconds per temporal patch; 1 when not given, as transformers).
  The sequence is padded on the right to a multiple of `length_bucket` (and the vision slots to a
  bucket) so that nearby shapes share one compiled program; padding is cut off again. Params may be
  sharded: the program then runs on their mesh.
  """
  input_ids = np.asarray(input_ids)
  attention_mask = np.asarray(attention_mask)
  host = lambda a: None if a is None else np.asarray(a)
  pixel_values, image_grid_thw = host(pixel_values), host(image_grid_thw)
  pixel_values_videos, video_grid_thw = host(pixel_values_videos), host(video_grid_thw)
  check_inputs(config, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
               video_grid_thw, second_per_grid_ts)
  vision = prepare_vision(config, pixel_values, image_grid_thw, pixel_values_videos=pixel_values_videos,
                          video_grid_thw=video_grid_thw)
  positions, _ = pos_lib.mrope_positions(
      input_ids, attention_mask, image_grid_thw if pixel_values is not None else None, config,
      video_grid_thw if pixel_values_videos is not None else None, second_per_grid_ts)
  b, t = input_ids.shape
  pad = -t % max(length_bucket, 1)
  ids = np.pad(input_ids, ((0, 0), (0, pad))).astype(np.int32)
  mask = np.pad(attention_mask, ((0, 0), (0, pad))).astype(np.int32)
  positions = np.pad(positions, ((0, 0), (0, 0), (0, pad)))
  with sharding.mesh_context_of(params):
    logits = _apply(config, params, ModelInputs(ids, positions, mask, vision))
  return logits[:, :t]


def init_params(config: ModelConfig, key: jax.Array) -> Params:
  """Random parameters (plain arrays, logical-axis metadata stripped); with `config.lora`, the policy tree
  holds fresh adapters (B = 0) under "lora" (models/lora.py)."""
  return nn.unbox(_init_boxed(config, key))


def init_adapters(config: ModelConfig, key: jax.Array, shardings: Any = None) -> Params:
  """Fresh LoRA adapters (A random, B = 0) for `config`, placed on `shardings` (those of the "lora" subtree
  of `sharding.param_shardings(abstract_params(config), mesh)`)."""
  fn = lambda k: init_params(config, k)[lora.POLICY_KEY]
  return jax.jit(fn, out_shardings=shardings)(key)


def _dummy_inputs(config: ModelConfig):
  vc = config.vision
  grid = np.array([[1, 2 * vc.spatial_merge_size, 2 * vc.spatial_merge_size]])
  vision = prepare_vision(config, np.zeros((int(grid.prod()), vc.patch_dim), np.float32), grid)
  n = int(pos_lib.merged_token_counts(grid, vc).sum())
  ids = np.full((1, n + 2), config.image_token_id, np.int32)
  ids[0, 0] = ids[0, -1] = 0
  positions, _ = pos_lib.mrope_positions(ids, np.ones_like(ids), grid, config)
  return ModelInputs(ids, positions, np.ones_like(ids), vision)


def _policy_tree(config: ModelConfig, key: jax.Array):
  v = Qwen25VL(config).init(key, _dummy_inputs(config))
  return lora.with_adapters(v["params"], v.get(lora.POLICY_KEY))


def _init_boxed(config: ModelConfig, key: jax.Array):
  return jax.jit(functools.partial(_policy_tree, config))(key)


def abstract_params(config: ModelConfig):
  """Shapes, dtypes and logical axis names of every parameter (adapters included), without allocating."""
  return jax.eval_shape(functools.partial(_policy_tree, config), jax.random.key(0))
