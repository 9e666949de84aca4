"""Pallas splash attention (TPU) behind the segment-id contract of `attention.dot_product_attention`.

The kernel takes one sequence [H, T, D] with q pre-scaled, a static mask (causal, or full for the
vision tower) and dynamic `SegmentIds`; it never holds more than a block of scores. Mosaic kernels
are not partitioned by XLA, so the call runs inside `jax.shard_map` over the active mesh: batch over
the mesh axes of "activation_batch" and heads over those of "activation_heads" (sharding.LOGICAL_RULES)
where they divide, each device running the kernel on its own shard (vmapped over its batch rows).

GQA: with G query heads per kv head the MQA form of the kernel runs once per kv head (no repeated
k/v); when the tensor axis splits the query heads but not the kv heads, k/v are repeated first.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec as P

from ares_jax import sharding

BLOCK = 512  # MaxText's default tile; sequences are padded to a multiple of it (or of 128 if shorter)
_LANES = 128  # the kernel's minimum tile
# The kernel prefetches its block-mask tables ([q blocks, kv blocks] bytes, two of them) into SMEM,
# 1 MiB on TPU v5p: 16 max_pixels images in one sequence (393k slots) at 512-tiles need 1.1 MiB and
# fail to compile. Longer sequences therefore get larger tiles until the tables fit in half of it.
MAX_TILES = 1 << 17
_PAD_SEGMENT = np.iinfo(np.int32).min


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def splash_attention(q, k, v, q_segment, kv_segment, *, causal: bool, block: int = BLOCK,
                     interpret: bool = False) -> jax.Array:
  """q [B, T, H, D]; k, v [B, S, K, D]; segments [B, T], [B, S] int32. Returns [B, T, H, D].

  T and S are padded to tile multiples; padded queries and keys share a segment of their own, so
  no row is fully masked (the kernel would return NaN for it, and its backward would spread NaN).
  `interpret=True` runs the kernel in the Pallas interpreter (CPU tests of this glue).
  """
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  bq, bk = min(block, _round_up(t, _LANES)), min(block, _round_up(s, _LANES))
  while -(-t // bq) * -(-s // bk) > MAX_TILES:
    bq, bk = (bq, bk * 2) if bk <= bq else (bq * 2, bk)
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  if tp > t and sp == s:  # padded queries need a padded key to see (cross-attention lengths only)
    sp += bk
  pad = lambda a, n, value=0: jnp.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                      constant_values=value)
  q = pad(q * jnp.asarray(d**-0.5, q.dtype), tp).transpose(0, 2, 1, 3)  # [B, H, Tp, D], softmax scale folded in
  k, v = (pad(a, sp).transpose(0, 2, 1, 3) for a in (k, v))  # [B, K, Sp, D]
  q_segment, kv_segment = pad(q_segment, tp, _PAD_SEGMENT), pad(kv_segment, sp, _PAD_SEGMENT)

  mesh = jax.sharding.get_abstract_mesh()
  manual = mesh.empty or bool(mesh.manual_axes)  # no mesh, or already inside a shard_map
  batch_spec = head_spec = kv_spec = None
  if not manual:
    batch_spec, head_spec = sharding.logical_to_spec(("activation_batch", "activation_heads"), (b, h), mesh)
    head_shards = int(np.prod([mesh.shape[a] for a in _names(head_spec)]))
    if head_shards > 1 and kh % head_shards:
      # the shards of the query heads would need kv heads that straddle devices: give each query
      # head its own copy (transformers' repeat_kv layout: query head i reads kv head i // G)
      k, v = (jnp.repeat(a, h // kh, axis=1) for a in (k, v))
      kh = h
    kv_spec = head_spec
  kernel = functools.partial(_local_attention, causal=causal, blocks=(bq, bk), interpret=interpret)
  if manual:
    out = kernel(q, k, v, q_segment, kv_segment)
  else:
    heads, seq = P(batch_spec, head_spec), P(batch_spec)
    out = jax.shard_map(kernel, in_specs=(heads, P(batch_spec, kv_spec), P(batch_spec, kv_spec), seq, seq),
                        out_specs=heads, check_vma=False)(q, k, v, q_segment, kv_segment)
  return out.transpose(0, 2, 1, 3)[:, :t]


def _names(spec_entry) -> tuple[str, ...]:
  if spec_entry is None:
    return ()
  return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def _local_attention(q, k, v, q_segment, kv_segment, *, causal: bool, blocks: tuple[int, int], interpret: bool):
  """One device's shard: q [b, h, T, D]; k, v [b, kh, S, D]; segments [b, T], [b, S]."""
  b, h, t, d = q.shape
  kh, s = k.shape[1], k.shape[2]
  g = h // kh
  bq, bk = blocks
  shape = (t, s)
  one = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  compute = min(bk, BLOCK)  # the kv tile computed at once: larger fetches, same VMEM per step
  sizes = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=compute, block_q_dkv=bq, block_kv_dkv=bk,
                            block_kv_dkv_compute=compute, block_q_dq=bq, block_kv_dq=bk)
  make = splash.make_splash_mha if g == 1 else splash.make_splash_mqa
  kernel = make(splash.MultiHeadMask([one] * (h if g == 1 else g)), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, interpret=interpret)
  segments = splash.SegmentIds(q_segment, kv_segment)
  if g == 1:
    return jax.vmap(kernel)(q, k, v, segments)
  per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # q [kh, g, T, D], k/v [kh, S, D]
  out = jax.vmap(per_kv_head)(q.reshape(b, kh, g, t, d), k, v, segments)
  return out.reshape(b, h, t, d)
