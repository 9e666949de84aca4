"""Self-attention over segment ids: one entry point, several implementations.

`dot_product_attention(q, k, v, q_segment=, kv_segment=, causal=, implementation=, q_prefix=)`: query t
sees key s iff `q_segment[t] == kv_segment[s]`, or `q_prefix[t] == kv_segment[s]` when `q_prefix` is
given (and `s <= t` when causal). The prefix is a shared prompt: one packed row holds a prompt once and
then several responses, each in its own segment with the prompt's segment as its prefix, so each reads
the whole prompt and causally itself only. Segment ids replace dense [T, S] masks
so that no implementation but `xla` ever holds a [T, S] array: at one max_pixels image the vision
tower's full attention spans ~24k slots, and its fp32 scores over 16 heads alone are 37 GiB (four
images in one sequence: 587 GiB; measured for TPU v5p, docs/design.md §10.2).

Implementations (`ModelConfig.attention`):
  xla        einsum + softmax over a dense mask (the reference; fine for short keys).
  blockwise  flash-style loops over query and key blocks in plain XLA (`blockwise_attention.py`):
             O(block^2) temporaries, any platform, differentiable with a recomputing backward.
  splash     the Pallas TPU kernel (`splash_attention.py`), run per device under `shard_map`.
  cudnn      cuDNN flash attention (GPU) where segments are contiguous runs, else blockwise.
  auto       splash on TPU, cudnn on GPU, blockwise on CPU; `xla` whenever the keys are short.

Shared prefixes (`q_prefix`): xla and blockwise build the extended mask exactly (blockwise skips tiles by
it). splash and cudnn fall back to blockwise, logged once: splash could run twice (own segment, then
q_segment := q_prefix) and merge the two by log-sum-exp, but the kernel's log-sum-exp output
(`save_residuals=True`) has no backward in jax 0.10 ("Higher-order AD not supported"), so the merge
would not be differentiable; cudnn knows only per-row lengths, and a response's keys (prompt, then itself
after other responses) are not one contiguous run.

Padding belongs in its own segment (text: 0 / -1, vision: -1), so that no query row is ever fully
masked (a fully masked row has an undefined softmax; kernels turn it into NaN).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.models import blockwise_attention
from ares_jax.models import splash_attention

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "splash", "cudnn")
# Keys this short fit one kernel tile anyway (splash's minimum block is 128): a dense [T, S] score
# block is what any implementation would hold, and xla's einsum needs no padding or kernel launch.
SHORT_KV = 128
CPU_SHORT_KV = 512  # on CPU the einsum path is the fastest up to about one blockwise tile
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite: a fully masked row averages instead of NaN

_log = logging.getLogger(__name__)
_logged: set[str] = set()


def log_once(message: str) -> None:
  """Logs a fallback once per process (the model is traced many times; once is enough to know)."""
  if message not in _logged:
    _logged.add(message)
    _log.warning(message)


def check_implementation(name: str, field: str = "config.model.attention") -> str:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"{field}={name!r}; choose one of {', '.join(IMPLEMENTATIONS)}")
  return name


def resolve_attention(name: str, platform: str, kv_length: int | None = None) -> str:
  """The concrete implementation for `name` on `platform` ('cpu' | 'gpu' | 'tpu' | 'cuda' | 'rocm').

  Only `auto` depends on the platform: tpu -> splash, gpu -> cudnn, cpu -> blockwise; with a known
  `kv_length` of at most one tile (SHORT_KV; CPU_SHORT_KV on CPU) it is xla. Explicit
  names are returned as they are. Callers that compile for a TPU topology from a CPU host must pass
  the mesh's platform, not `jax.default_backend()` (see `current_platform`).
  """
  check_implementation(name)
  if name != "auto":
    return name
  platform = "gpu" if platform in ("cuda", "rocm") else platform
  short = SHORT_KV if platform in ("tpu", "gpu") else CPU_SHORT_KV
  if kv_length is not None and kv_length <= short:
    return "xla"
  return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "blockwise")


def current_platform() -> str:
  """Platform of the devices of the mesh being traced for (the abstract mesh carries it), else the
  default backend: the memory planner traces for a TPU topology on a CPU host."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment: jax.Array,
                          kv_segment: jax.Array, causal: bool, implementation: str = "auto",
                          q_prefix: jax.Array | None = None) -> jax.Array:
  """Grouped-query softmax attention restricted to equal segment ids (and to s <= t when causal).

  q [B, T, H, D]; k, v [B, S, K, D], H a multiple of K (query head h reads kv head h // (H/K), the
  layout of transformers' repeat_kv); q_segment [B, T], kv_segment [B, S] integer ids. Causality
  compares absolute indices (self-attention, T == S). q_prefix [B, T] (optional): query t also sees
  the keys whose segment is q_prefix[t] (a shared prompt); a value no key has (callers: -2) for none.
  None compiles to the plain segment program. Returns [B, T, H, D] in q's dtype.
  """
  if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] \
      or q.shape[2] % k.shape[2]:
    raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} are not [B,T,H,D], [B,S,K,D] with "
                     "H a multiple of K")
  if q_segment.shape != q.shape[:2] or kv_segment.shape != k.shape[:2]:
    raise ValueError(f"attention: segments {q_segment.shape}, {kv_segment.shape} must be {q.shape[:2]}, "
                     f"{k.shape[:2]}")
  if q_prefix is not None and q_prefix.shape != q_segment.shape:
    raise ValueError(f"attention: q_prefix {q_prefix.shape} must be {q_segment.shape}")
  kv_len = k.shape[1]
  platform = current_platform()
  impl = resolve_attention(implementation, platform, kv_len)
  if impl == "splash" and platform != "tpu":
    raise ValueError(f"attention=splash is a TPU (Mosaic) kernel; the devices here are {platform!r}: set "
                     "config.model.attention to auto, blockwise or xla")
  args = (q, k, v, q_segment.astype(jnp.int32), kv_segment.astype(jnp.int32))
  kw = {} if q_prefix is None else {"q_prefix": q_prefix.astype(jnp.int32)}
  if impl == "xla" or (impl in ("splash", "cudnn") and kv_len <= SHORT_KV):
    return xla_attention(*args, causal=causal, **kw)
  if impl in ("splash", "cudnn") and q_prefix is not None:
    log_once(f"attention={impl}: shared prefixes (q_prefix) are not supported; using blockwise attention "
             "(attention.py's docstring says why)")
    impl = "blockwise"
  if impl == "blockwise":
    return blockwise_attention.blockwise_attention(*args, causal=causal, **kw)
  if impl == "splash":
    return splash_attention.splash_attention(*args, causal=causal)
  return cudnn_attention(*args, causal=causal)


def segment_mask(q_segment: jax.Array, kv_segment: jax.Array, causal: bool,
                 q_prefix: jax.Array | None = None) -> jax.Array:
  """[B, T, S] bool: equal segments or the query's prefix segment (and s <= t when causal). Only the
  xla path builds it."""
  mask = q_segment[:, :, None] == kv_segment[:, None, :]
  if q_prefix is not None:
    mask |= q_prefix[:, :, None] == kv_segment[:, None, :]
  if causal:
    t, s = q_segment.shape[1], kv_segment.shape[1]
    mask &= jax.lax.broadcasted_iota(jnp.int32, (t, s), 0) >= jax.lax.broadcasted_iota(jnp.int32, (t, s), 1)
  return mask


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query einsum-softmax attention under a dense bool mask broadcastable to [B, T, S].

  Scores are float32 [B, K, G, T, S]: the memory this module exists to avoid for long sequences.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST) * (d**-0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, t, h, d)


def xla_attention(q, k, v, q_segment, kv_segment, *, causal: bool, q_prefix: jax.Array | None = None) -> jax.Array:
  return masked_attention(q, k, v, segment_mask(q_segment, kv_segment, causal, q_prefix))


# ----------------------------------------------------------------------------------------------- cuDNN

MAX_RUNS = 3  # text rows are [left padding | tokens | right padding]: three contiguous segments


def cudnn_attention(q, k, v, q_segment, kv_segment, *, causal: bool, kernel: str = "cudnn") -> jax.Array:
  """cuDNN flash attention, which knows only per-row lengths (a valid prefix), not segment ids.

  A row made of at most MAX_RUNS contiguous runs of distinct segments (the text decoder's padding
  layout) is exact as one call per run: rows are rotated so that run j starts at index 0 and the
  kernel sees `query_seq_lengths = key_value_seq_lengths = len(run j)`; each output row is taken
  from the call of its own run. Whether the segments have that form is known only at run time, so
  `lax.cond` falls back to blockwise otherwise. Non-causal attention (the vision tower, whose padding
  interleaves with the images), other dtypes and head dims go to blockwise at trace time, logged once.
  `kernel='xla'` runs the same glue through jax's XLA implementation (tests on CPU).
  """
  b, t, h, d = q.shape
  why = None
  if not causal or t != k.shape[1]:
    why = "non-causal or cross attention"
  elif q.dtype not in (jnp.bfloat16, jnp.float16) and kernel == "cudnn":
    why = f"dtype {q.dtype} (cuDNN flash attention takes bfloat16/float16)"
  elif d % 8 or d > 128:
    why = f"head_dim {d} (cuDNN flash attention takes multiples of 8 up to 128)"
  if why is not None:
    log_once(f"attention=cudnn: {why} is not supported; using blockwise attention")
    return blockwise_attention.blockwise_attention(q, k, v, q_segment, kv_segment, causal=causal)

  run_start = jnp.concatenate([jnp.ones((b, 1), bool), kv_segment[:, 1:] != kv_segment[:, :-1]], axis=1)
  run = jnp.cumsum(run_start, axis=1) - 1  # [B, T] run index of each token
  n_runs = run[:, -1] + 1
  starts = jnp.stack([jnp.argmax(run == j, axis=1) for j in range(MAX_RUNS)], 1)  # [B, M]
  lengths = jnp.stack([(run == j).sum(1) for j in range(MAX_RUNS)], 1).astype(jnp.int32)
  run_ids = jnp.take_along_axis(kv_segment, starts, axis=1)  # [B, M] segment of each run
  exists = jnp.arange(MAX_RUNS)[None] < n_runs[:, None]
  clash = (run_ids[:, :, None] == run_ids[:, None, :]) & exists[:, :, None] & exists[:, None, :]
  ok = (jnp.all(n_runs <= MAX_RUNS) & jnp.all(q_segment == kv_segment)
        & ~jnp.any(clash & ~jnp.eye(MAX_RUNS, dtype=bool)))

  def by_runs(q, k, v):
    out = jnp.zeros_like(q)
    index = jnp.arange(t)[None]
    for j in range(MAX_RUNS):
      rot = (index + starts[:, j:j + 1]) % t  # [B, T]: row rotated so that run j starts at 0
      take = lambda a: jnp.take_along_axis(a, rot[:, :, None, None], axis=1)
      n = jnp.maximum(lengths[:, j], 1)  # an absent run computes one discarded row, never an empty one
      o = jax.nn.dot_product_attention(take(q), take(k), take(v), is_causal=True, query_seq_lengths=n,
                                       key_value_seq_lengths=n, implementation=kernel)
      back = (index - starts[:, j:j + 1]) % t
      out = jnp.where((run == j)[:, :, None, None], jnp.take_along_axis(o, back[:, :, None, None], axis=1), out)
    return out

  def fallback(q, k, v):
    return blockwise_attention.blockwise_attention(q, k, v, q_segment, kv_segment, causal=True)

  return jax.lax.cond(ok, by_runs, fallback, q, k, v)

