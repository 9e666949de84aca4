"""Building blocks shared by the text decoder and the vision tower.

Every parameter carries logical axis names (`nn.with_logical_partitioning`); the names are
mapped to mesh axes in one table, `ares_jax.sharding.LOGICAL_RULES`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from ares_jax.models import lora

Axes = tuple[str | None, ...]
_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite: fully masked (padding) rows stay NaN-free


class Dense(nn.Module):
  """y = x . kernel (+ bias), contracting the last `n_in` dims of x with the first of the kernel.

  The kernel is created in its final (multi-dimensional) shape, so its logical axis names fit it
  exactly (flax's DenseGeneral initialises a flattened kernel, which breaks sharded init).
  With `lora` (a `lora.LoraConfig`), a LoRA adapter A [*in, r], B [r, *out] in the "lora" collection
  adds (alpha / r) B A x (dropout on x when a "dropout" RNG is given, i.e. in training).
  """

  features: tuple[int, ...]
  axes: Axes  # kernel dims: input dims first, then output dims; the bias takes the output names
  n_in: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  lora: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(x.shape[x.ndim - self.n_in:]) + tuple(self.features)
    kernel = self.param("kernel", nn.with_logical_partitioning(_kernel_init(self.n_in), self.axes), shape,
                        self.param_dtype)
    contract = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), (contract, ((), ())),
                            precision=jax.lax.Precision.HIGHEST)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[self.n_in:]),
                        tuple(self.features), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    if self.lora is not None:
      y = y + self._adapter(x, shape)
    return y

  def _adapter(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    cfg, n = self.lora, self.n_in
    box = nn.with_logical_partitioning
    a = self.variable(lora.POLICY_KEY, "lora_a", box(lora.kaiming_uniform_a(n), self.axes[:n] + ("lora_rank",)),
                      self.make_rng("params") if self.is_initializing() else None, shape[:n] + (cfg.rank,),
                      self.param_dtype).value
    b = self.variable(lora.POLICY_KEY, "lora_b", box(nn.initializers.zeros_init(), ("lora_rank",) + self.axes[n:]),
                      None, (cfg.rank,) + shape[n:], self.param_dtype).value
    if cfg.dropout > 0 and self.has_rng("dropout"):
      x = nn.Dropout(cfg.dropout, deterministic=False)(x)
    return lora.adapter_delta(x, a, b, n, cfg.scale, self.dtype)


def _kernel_init(n_in: int):
  return nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                          out_axis=())


def dense(features: int | Sequence[int], axes: Axes, *, axis: int | Sequence[int] = -1, use_bias: bool,
          dtype, param_dtype, name: str, lora: Any = None) -> Dense:
  """A `Dense` over the last one (`axis=-1`) or last two (`axis=(-2, -1)`) input dims; `lora`: its adapter's
  `LoraConfig` (None: no adapter)."""
  n_in = 1 if isinstance(axis, int) else len(axis)
  feats = (features,) if isinstance(features, int) else tuple(features)
  return Dense(feats, axes, n_in, use_bias, dtype, param_dtype, lora, name=name)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32 and cast back before the scale, as transformers does."""

  eps: float
  axis_name: str = "norm"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, x.dtype) * y.astype(x.dtype)


class GatedMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  hidden: int
  axes: tuple[str, str]  # (model width, hidden width) logical names
  use_bias: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  lora: Any = None  # a LoraConfig: adapters on the projections among its gate/up/down targets

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    width, hid = self.axes
    on = lambda t: None if self.lora is None else self.lora.on(t)
    gate = dense(self.hidden, (width, hid), name="gate_proj", lora=on("gate"), **kw)(x)
    up = dense(self.hidden, (width, hid), name="up_proj", lora=on("up"), **kw)(x)
    return dense(x.shape[-1], (hid, width), name="down_proj", lora=on("down"), **kw)(nn.silu(gate) * up)


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [..., T, H, D]; cos/sin: [..., T, D] (broadcast over heads). Done in float32."""
  x32 = x.astype(jnp.float32)
  out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
  return out.astype(x.dtype)


def cached_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array, k_new: jax.Array,
                     v_new: jax.Array) -> jax.Array:
  """One decode step: softmax over the cached keys allowed by `mask` [B, 1, S] plus the new key.

  q: [B, 1, H, D]; k_cache, v_cache: [B, S, K, D]; k_new, v_new: [B, 1, K, D]. The two score blocks
  are normalised jointly, so the cache is read once and never concatenated or copied.
  """
  b, t, h, d = q.shape
  kv = k_cache.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  prec = jax.lax.Precision.HIGHEST
  s_cache = jnp.einsum("btkgd,bskd->bkgts", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32,
                       precision=prec) * (d**-0.5)
  s_cache = jnp.where(mask[:, None, None, :, :], s_cache, _NEG)
  s_new = jnp.einsum("btkgd,btkd->bkgt", qg, k_new, preferred_element_type=jnp.float32,
                     precision=prec)[..., None] * (d**-0.5)
  m = jnp.maximum(s_cache.max(-1, keepdims=True), s_new)
  p_cache, p_new = jnp.exp(s_cache - m), jnp.exp(s_new - m)
  denom = p_cache.sum(-1, keepdims=True) + p_new
  out = jnp.einsum("bkgts,bskd->btkgd", (p_cache / denom).astype(v_cache.dtype), v_cache, precision=prec)
  out = out.astype(jnp.float32) + jnp.einsum("bkgt,btkd->btkgd", (p_new / denom)[..., 0],
                                             v_new.astype(jnp.float32), precision=prec)
  return out.reshape(b, t, h, d).astype(q.dtype)


def cache_reader(k_cache: jax.Array, v_cache: jax.Array, mask: jax.Array):
  """The attention of one decode step over a dense cache (`cached_attention` with the cache bound):
  `attend(q, k_new, v_new) -> (out, (k_new, v_new))`, what `Attention` calls with a cache; the token's
  key and value come back for the caller to write into the cache."""
  return lambda q, k_new, v_new: (cached_attention(q, k_cache, v_cache, mask, k_new, v_new), (k_new, v_new))


def remat_policy(name: str):
  """Maps `ModelConfig.remat_policy` to a jax checkpoint policy (None = no remat)."""
  policies = {
      "none": None,
      "full": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_with_no_batch_dims": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  }
  if name not in policies:
    raise ValueError(f"model.remat_policy={name!r}; choose one of {sorted(policies)}")
  return policies[name]
