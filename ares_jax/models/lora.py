"""LoRA adapters (Hu et al. 2021): W x + (alpha / r) B A x on chosen projections, the base frozen.

Adapters live in their own Flax collection, "lora" (created by `layers.Dense` on targeted
projections), with logical axis names (`lora_rank` plus the kernel's input / output names), so the
same rules table shards them. A policy's parameter tree is one dict: the base's top-level names
plus "lora" holding the adapter tree (`POLICY_KEY`), so trainers split it by top-level name
(`frozen_names`) and the sampler, scorer and checkpoints see one pytree.

Flax shapes: for a kernel W [*in, *out] (input dims first), A ("lora_a") is [*in, r] and B
("lora_b") is [r, *out]; delta W = (alpha / r) A . B. A is initialised like peft's
kaiming_uniform(a=sqrt(5)) (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B = 0, so a fresh policy equals
its base (the paper's init).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ares_jax.models.config import TARGETS, TEXT_TARGETS, VISION_TARGETS, LoraConfig  # noqa: F401  (re-exported)

POLICY_KEY = "lora"  # the adapters' top-level name in a policy's parameter tree (and their collection)
# Parameter paths of the modules each target adapts ("decoder/layers" and "visual/blocks" are scanned:
# their kernels and adapters carry a leading layer axis).
MODULES = {
    **{t: (f"decoder/layers/self_attn/{t}_proj",) for t in "qkvo"},
    **{t: (f"decoder/layers/mlp/{t}_proj",) for t in ("gate", "up", "down")},
    "vision_attn": ("visual/blocks/qkv", "visual/blocks/proj"),
    "merger": ("visual/merger/mlp_0", "visual/merger/mlp_2"),
}
STACKED = ("decoder/layers/", "visual/blocks/")


def kaiming_uniform_a(n_in: int):
  """peft's init of A: kaiming_uniform(a=sqrt(5)) over fan_in = prod(input dims), i.e. bound 1/sqrt(fan_in)."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / np.sqrt(np.prod(shape[:n_in]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def adapter_delta(x: jax.Array, a: jax.Array, b: jax.Array, n_in: int, scale: float, dtype) -> jax.Array:
  """scale * (x . A) . B for x [..., *in]: the low-rank update without forming delta W."""
  contract_a = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
  hi = jax.lax.Precision.HIGHEST
  h = jax.lax.dot_general(x.astype(dtype), jnp.asarray(a, dtype), (contract_a, ((), ())), precision=hi)
  y = jax.lax.dot_general(h, jnp.asarray(b, dtype), (((h.ndim - 1,), (0,)), ((), ())), precision=hi)
  return y * jnp.asarray(scale, dtype)


# ------------------------------------------------------------------------------------------ policy trees

def uses_dropout(config) -> bool:
  """Whether training draws LoRA dropout masks (Updater(dropout=...))."""
  return config.lora.enabled and config.lora.dropout > 0


def base_config(config):
  """The model config without adapters: the base policy (AEPO's reference) and merged weights."""
  return config.replace(lora=LoraConfig()) if config.lora.enabled else config


def base_params(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != POLICY_KEY}


def adapters(params: dict) -> dict:
  return params[POLICY_KEY]


def with_adapters(base: dict, lora: dict | None) -> dict:
  return dict(base) if lora is None else {**base, POLICY_KEY: lora}


def variables(config, params: dict) -> dict:
  """Flax variables of a policy tree: {"params": base} (+ {"lora": adapters} when `config` uses them).

  A config without adapters ignores a tree's adapters: that is how the base (reference) policy runs."""
  if not config.lora.enabled:
    return {"params": base_params(params)}
  if POLICY_KEY not in params:
    raise ValueError(f"config.model.lora.rank={config.lora.rank} but the parameters hold no adapters "
                     f"(top-level names {sorted(params)}); attach them with models.init_adapters")
  return {"params": base_params(params), POLICY_KEY: params[POLICY_KEY]}


def frozen_names(params: dict, also: tuple[str, ...] = ()) -> tuple[str, ...]:
  """Top-level names a trainer freezes: with adapters, the whole base (only "lora" trains); without,
  `also` (e.g. the vision tower during SFT)."""
  if POLICY_KEY in params:
    return tuple(k for k in params if k != POLICY_KEY)
  return tuple(also)


def frozen_base(config, params: dict) -> dict:
  """The base in the compute dtype (it is never updated: no fp32 master copy is needed)."""
  dt = config.compute_dtype
  cast = lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dt else a
  return jax.tree.map(cast, base_params(params))


# ---------------------------------------------------------------------------------------------- merging

def merge_into(base: dict, lora: dict, scale: float, n_lead: int | None = None) -> dict:
  """`base` with W <- W + scale * A . B for every adapted module of `lora` (same nesting as `base`).

  n_lead: leading layer axes on every kernel (None: 1 under the scanned stacks, else 0; 0 for one
  unstacked layer's tree). Computed in float32, stored in W's dtype."""
  flat = traverse_util.flatten_dict(lora, sep="/")
  out = traverse_util.flatten_dict(base, sep="/")
  for path in sorted({p.rsplit("/", 1)[0] for p in flat}):
    kpath = path + "/kernel"
    w = out[kpath]
    a, b = flat[path + "/lora_a"], flat[path + "/lora_b"]
    lead = (1 if path.startswith(STACKED) else 0) if n_lead is None else n_lead
    ls = a.shape[:lead]
    a2 = a.astype(jnp.float32).reshape(*ls, -1, a.shape[-1])
    b2 = b.astype(jnp.float32).reshape(*ls, b.shape[lead], -1)
    delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
    out[kpath] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def merged(config, params: dict) -> dict:
  """The base parameters with the adapters folded in (for `base_config(config)`): the exported policy."""
  if not config.lora.enabled:
    return base_params(params)
  return merge_into(base_params(params), params[POLICY_KEY], config.lora.scale)
