"""Qwen2.5-VL vision tower: patch embedding, 2-D rotary, window/full attention blocks, patch merger.

The tower runs on a *slot layout* prepared on the host (`positions.vision_layout`): patches sit
window by window, every window padded to the same number of slots (8x8 patches), so window
attention is a batched [num_windows, 64, 64] attention and no shape depends on the image size
beyond the padded window count (a bucket).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from ares_jax import sharding
from ares_jax.models.attention import current_platform, dot_product_attention, resolve_attention
from ares_jax.models.config import ModelConfig, VisionConfig
from ares_jax.models.layers import GatedMLP, RMSNorm, apply_rotary, dense, remat_policy


@struct.dataclass
class VisionInputs:
  """Host-prepared vision inputs for a batch of images (see `positions.vision_layout`).

  patches: [N, patch_dim] pixel rows in slot order (N = windows * slots per window; pad rows 0).
  slot_segment: [N] int32 attention segment (one image frame) of each slot, -1 for padding.
  pos_hw: [N, 2] int32 (row, column) patch coordinates for the 2-D rotary embedding.
  merged_index: [M] int32, for every merged token in Hugging Face order (image by image, merge-block
    order) its index in the merged slot layout [N / 4]; M is bucketed, extra entries are ignored.
  full_layer: [depth] bool, which blocks attend over the whole image (fullatt_block_indexes).
  """

  patches: jax.Array
  slot_segment: jax.Array
  pos_hw: jax.Array
  merged_index: jax.Array
  full_layer: jax.Array


def vision_cos_sin(cfg: VisionConfig, pos_hw: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Axial 2-D rotary: head_dim/4 frequencies for rows, the same for columns, concatenated twice."""
  spatial = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
  freqs = pos_hw.astype(jnp.float32)[..., None] * inv_freq  # [N, 2, head_dim/4]
  hw = freqs.reshape(freqs.shape[0], -1)  # rows' frequencies then columns'
  emb = jnp.concatenate([hw, hw], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class VisionBlock(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, slot_segment, full):
    cfg, vc = self.config, self.config.vision
    kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))
    pd = jnp.dtype(cfg.param_dtype)
    n = x.shape[0]
    slots = vc.window_merged**2 * vc.merge_unit

    h = RMSNorm(1e-6, "vision_embed", pd, name="norm1")(x)
    qkv = dense((3, vc.num_heads, vc.head_dim), ("vision_embed", None, "vision_heads", "head_dim"),
                use_bias=True, name="qkv", lora=cfg.lora.on("vision_attn"), **kw)(h)
    q, k, v = (apply_rotary(qkv[:, i], cos, sin) if i < 2 else qkv[:, i] for i in range(3))
    # Segments: the image frame of a slot, -1 for padding slots (which then see only padding).
    attend = lambda q, k, v, seg: dot_product_attention(q, k, v, q_segment=seg, kv_segment=seg, causal=False,
                                                         implementation=cfg.attention)

    def windowed(q, k, v):  # a batch of windows [N / slots, slots, H, D]
      split = lambda a: a.reshape(n // slots, slots, *a.shape[1:])
      return attend(split(q), split(k), split(v), split(slot_segment)).reshape(q.shape)

    def whole_image(q, k, v):  # one sequence of all slots, block-diagonal over images by segment
      # Not splash: its kernel cannot skip the tiles between two images (work quadratic in the
      # number of images) and builds its mask tables in Python, which takes tens of minutes for a
      # batch of max_pixels images; the blockwise path skips those tiles with near splash's memory.
      impl = cfg.attention
      if resolve_attention(impl, current_platform(), n) == "splash":
        impl = "blockwise"
      return slot_parallel(lambda q, k, v, q_seg, kv_seg: dot_product_attention(
          q[None], k[None], v[None], q_segment=q_seg[None], kv_segment=kv_seg[None], causal=False,
          implementation=impl)[0], q, k, v, slot_segment)

    out = jax.lax.cond(full, whole_image, windowed, q, k, v)
    x = x + dense(vc.hidden_size, ("vision_heads", "head_dim", "vision_embed"), axis=(-2, -1), use_bias=True,
                  name="proj", lora=cfg.lora.on("vision_attn"), **kw)(out)
    h = RMSNorm(1e-6, "vision_embed", pd, name="norm2")(x)
    x = x + GatedMLP(vc.intermediate_size, ("vision_embed", "vision_mlp"), True, cfg.compute_dtype, pd,
                     name="mlp")(h)
    return nn.with_logical_constraint(x, ("vision_slots", "activation_embed")), None


def slot_parallel(attend, q, k, v, segment):
  """`attend(q, k, v, q_segment, kv_segment)` over slots [N, H, D] sharded over the batch devices
  ("vision_slots"): each device's slots as queries against every slot's keys, K, V and the segments
  gathered once (`shard_map`). Left to the SPMD partitioner, blockwise attention's loops over a sharded
  slot axis ran on every device over all the slots and all-gathered K and V at every query tile (the 7B
  plan's optimized HLO: 384 gathers of 629 MB a layer for 8 max_pixels images). Unsharded (no mesh, inside
  a shard_map, or slots that do not divide): `attend` as it is."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return attend(q, k, v, segment, segment)
  slots, heads, _ = sharding.logical_to_spec(("vision_slots", "vision_heads", None), q.shape, mesh)
  if slots is None:
    return attend(q, k, v, segment, segment)
  P = jax.sharding.PartitionSpec
  return jax.shard_map(attend, in_specs=(P(slots, heads), P(None, heads), P(None, heads), P(slots), P()),
                       out_specs=P(slots, heads), check_vma=False)(q, k, v, segment, segment)


class PatchMerger(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, vc = self.config, self.config.vision
    kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype), use_bias=True)
    x = RMSNorm(1e-6, "vision_embed", jnp.dtype(cfg.param_dtype), name="ln_q")(x)
    x = x.reshape(-1, vc.hidden_size * vc.merge_unit)
    x = dense(x.shape[-1], ("vision_merged", "vision_mlp"), name="mlp_0", lora=cfg.lora.on("merger"), **kw)(x)
    x = nn.gelu(x, approximate=False)
    return dense(vc.out_hidden_size, ("vision_mlp", "embed"), name="mlp_2", lora=cfg.lora.on("merger"), **kw)(x)


class VisionTower(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, inputs: VisionInputs) -> jax.Array:
    """Returns merged image embeddings [M, out_hidden_size] in Hugging Face order."""
    cfg, vc = self.config, self.config.vision
    kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))
    x = dense(vc.hidden_size, ("vision_patch", "vision_embed"), use_bias=False, name="patch_embed",
              **kw)(inputs.patches.astype(cfg.compute_dtype))
    # Slots are spread over the batch-sharding devices (whole windows each: N is a multiple of the
    # window's slots): replicated, a batch of max_pixels images would sit whole on every device.
    x = nn.with_logical_constraint(x, ("vision_slots", "activation_embed"))
    cos, sin = vision_cos_sin(vc, inputs.pos_hw)
    block = VisionBlock
    if cfg.remat_policy != "none":
      block = nn.remat(block, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
    blocks = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=vc.depth,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(cfg, name="blocks")(x, cos, sin, inputs.slot_segment, inputs.full_layer)
    merged = PatchMerger(cfg, name="merger")(x)  # [N / 4, out]
    return jnp.take(merged, inputs.merged_index, axis=0)
