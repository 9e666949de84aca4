"""Qwen2 text decoder with GQA and multimodal rotary embeddings (M-RoPE), scanned over layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ares_jax.models.attention import dot_product_attention
from ares_jax.models.config import ModelConfig, TextConfig
from ares_jax.models.layers import GatedMLP, RMSNorm, apply_rotary, cache_reader, dense, remat_policy


def mrope_cos_sin(cfg: TextConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """cos/sin [B, T, head_dim] for M-RoPE position ids `positions` [3, B, T] (temporal, height, width).

  Frequency j of the rotary half-dimension reads the position of axis a(j), where `mrope_section`
  splits the half-dimension into three contiguous chunks (the chunked, not interleaved, layout).
  """
  half = cfg.head_dim // 2
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
  axis_of_freq = np.repeat(np.arange(3), cfg.mrope_section)  # [half]
  assert axis_of_freq.shape == (half,)
  pos = jnp.take(positions.astype(jnp.float32), axis_of_freq, axis=0)  # [half, B, T]
  freqs = jnp.moveaxis(pos, 0, -1) * inv_freq  # [B, T, half]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


class Attention(nn.Module):
  """GQA self-attention.

  Without a cache (training, prefill) `mask` holds segment ids [B, T] (`segment_ids`): causal
  attention within equal ids, through `attention.dot_product_attention` (`config.attention`); `prefix`
  [B, T] (optional) is each token's shared prompt segment, which it also attends to (-2: none). The
  second output is (k, v) [B, T, K, D] of this call's tokens (a prefill's cache entries). One decode step
  (T = 1) passes `attend(q, k, v) -> (out, update)` instead, which reads the cache it is bound to (a
  dense one, `layers.cache_reader`, or the sampler's pages) beside the token's own key; its `update`
  (what the cache needs to take this token: its k and v, or pages it wrote) is the second output.
  Returns (output [B, T, E], that second output).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, attend=None, prefix=None):
    cfg, tc = self.config, self.config.text
    kw = dict(dtype=cfg.compute_dtype, param_dtype=jnp.dtype(cfg.param_dtype))
    proj = lambda heads, axes, t: dense((heads, tc.head_dim), ("embed", axes, "head_dim"), use_bias=True,
                                        name=f"{t}_proj", lora=cfg.lora.on(t), **kw)(x)
    q = proj(tc.num_heads, "q_heads", "q")
    k, v = proj(tc.num_kv_heads, "kv_heads", "k"), proj(tc.num_kv_heads, "kv_heads", "v")
    q = nn.with_logical_constraint(apply_rotary(q, cos, sin), ("activation_batch", "activation_length",
                                                                "activation_heads", None))
    k = apply_rotary(k, cos, sin)
    if attend is None:
      out = dot_product_attention(q, k, v, q_segment=mask, kv_segment=mask, causal=True,
                                  implementation=cfg.attention, q_prefix=prefix)
      kv = (k, v)
    else:
      out, kv = attend(q, k, v)
    out = dense(tc.hidden_size, ("q_heads", "head_dim", "embed"), axis=(-2, -1), use_bias=False, name="o_proj",
                lora=cfg.lora.on("o"), **kw)(out)
    return out, kv


class DecoderLayer(nn.Module):
  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache_k=None, cache_v=None, attend=None):
    """Without a cache `mask` is segment ids [B, T], or the pair (segment ids, prefix) of shared-prefix
    rows (see `Attention`; a pair because nn.scan passes positional arguments only, see `Decoder`).
    A decode step passes `attend` (see `Attention`), or a dense cache `cache_k`/`cache_v` [B, S, K, D]
    with `mask` bool [B, 1, S] (what a scan over layers can carry)."""
    cfg, tc = self.config, self.config.text
    pd = jnp.dtype(cfg.param_dtype)
    h = RMSNorm(tc.rms_norm_eps, "embed", pd, name="input_layernorm")(x)
    prefix = None
    if isinstance(mask, tuple):
      mask, prefix = mask
    if cache_k is not None:
      attend = cache_reader(cache_k, cache_v, mask)
    a, kv = Attention(cfg, name="self_attn")(h, cos, sin, mask, attend, prefix)
    x = x + a
    h = RMSNorm(tc.rms_norm_eps, "embed", pd, name="post_attention_layernorm")(x)
    x = x + GatedMLP(tc.intermediate_size, ("embed", "mlp"), False, cfg.compute_dtype, pd, cfg.lora,
                     name="mlp")(h)
    x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
    return x, kv


class Decoder(nn.Module):
  """All decoder layers as one `nn.scan` (parameters stacked on a leading 'layers' axis).

  `segment_ids` [B, T] (see `segment_ids`); `prefix` [B, T] (optional): the segment of each token's shared
  prompt, which it attends to as well as to its own segment (-2: none; see `Attention`). Returns (hidden
  [B, T, E], (k, v) [L, B, T, K, D] of the input tokens, for a KV cache).
  Cached decoding runs the layers unrolled instead (`qwen25vl.decode_step`).
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, x, cos, sin, segment_ids, prefix=None):
    cfg = self.config
    layer = DecoderLayer
    if cfg.remat_policy != "none":
      layer = nn.remat(layer, policy=remat_policy(cfg.remat_policy), prevent_cse=False)
    stack = nn.scan(layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.text.num_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    mask = segment_ids if prefix is None else (segment_ids, prefix)  # nn.scan ignores keyword arguments
    return stack(cfg, name="layers")(x, cos, sin, mask)


def segment_ids(attention_mask: jax.Array) -> jax.Array:
  """[B, T] int32 attention segments: a token keeps its attention_mask value (1, or a packing id),
  padding before a row's first token is 0 and padding after it -1.

  Real tokens thus never see padding, and every padding query sees at least itself (no fully
  masked row, no NaN). Separate ids for left and right padding make each row at most three
  contiguous runs, which the cuDNN path expresses with sequence lengths (attention.cudnn_attention).
  """
  mask = attention_mask.astype(jnp.int32)
  started = jnp.cumsum(mask > 0, axis=1) > 0
  return jnp.where(mask > 0, mask, jnp.where(started, -1, 0))
