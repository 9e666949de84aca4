"""Flash-style attention in plain XLA: loops over query and key blocks with an online softmax.

Why: the einsum path materialises float32 scores [B, K, G, T, S]; here every step holds one
[B, K, G, block_q, block_k] tile, the running max / sum in float32 and the output accumulator, so
temporaries are O(T) + O(block^2) on any platform (the CPU tests, a GPU without cuDNN, a TPU when the
kernel is not wanted). Autodiff through the loops would save every probability tile (O(T x S)
residuals), so the backward is written out (`jax.custom_vjp`): it keeps only the output and the
row log-sum-exp and recomputes the tiles, as FlashAttention-2 does.

Tiles where no query sees any key (causal upper triangle, different images of the vision tower)
are skipped with `lax.cond`, so block-diagonal segments cost compute linear in the number of
segments, not quadratic in the sequence. With `q_prefix` (shared prompts) the skip test reads the
extended mask, so a response's tiles over its own prompt are computed and those over other rows' are not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 512
_MASKED = -0.7 * float(np.finfo(np.float32).max)  # finite, so exp(masked - max) never sees inf - inf
_PAD_SEGMENT = np.iinfo(np.int32).min  # internal padding: a segment no caller uses
_PAD_PREFIX = _PAD_SEGMENT + 1  # padded queries' prefix: matches no key, padded ones included
_HI = jax.lax.Precision.HIGHEST


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def blockwise_attention(q, k, v, q_segment, kv_segment, *, causal: bool, block_q: int | None = None,
                        block_k: int | None = None, q_prefix: jax.Array | None = None) -> jax.Array:
  """Same contract as `attention.dot_product_attention` (`q_prefix` included); T and S are padded to
  block multiples. Without `q_prefix` the program is the plain segment one (no prefix compares).

  Blocks default to DEFAULT_BLOCK, read at trace time (tests lower it to run many tiles).

  Padded queries and keys share a segment of their own, so real rows never see padding and padded
  rows (sliced off) are never fully masked.
  """
  b, t, h, d = q.shape
  s = k.shape[1]
  bq, bk = min(block_q or DEFAULT_BLOCK, t), min(block_k or DEFAULT_BLOCK, s)
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  pad = lambda a, n, value=0: jnp.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2),
                                      constant_values=value)
  q_pre = None if q_prefix is None else pad(q_prefix, tp, _PAD_PREFIX)
  out = _flash(pad(q, tp), pad(k, sp), pad(v, sp), pad(q_segment, tp, _PAD_SEGMENT),
               pad(kv_segment, sp, _PAD_SEGMENT), q_pre, causal, (bq, bk))
  return out[:, :t]


def _tile_mask(q_seg, kv_seg, q_pre, q_pos, kv_pos, causal):
  """[B, bq, bk] bool for one tile: segments [B, bq] / [B, bk], q_pre [B, bq] or None (no prefixes), and the
  tile's absolute query and key indices q_pos [bq], kv_pos [bk] (for the causal test)."""
  mask = q_seg[:, :, None] == kv_seg[:, None, :]
  if q_pre is not None:
    mask |= q_pre[:, :, None] == kv_seg[:, None, :]
  if causal:
    mask &= q_pos[:, None] >= kv_pos[None, :]
  return mask


def _blocks(q, k, v, q_seg, kv_seg, q_pre, bq, bk):
  """Block-major views: q [nq, B, bq, K, G, D]; k, v [nk, B, bk, K, D]; segments, prefixes [n, B, blk]."""
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  qb = _query_blocks(q, bq, kh)
  kb = k.reshape(b, s // bk, bk, kh, d).transpose(1, 0, 2, 3, 4)
  vb = v.reshape(b, s // bk, bk, kh, d).transpose(1, 0, 2, 3, 4)
  q_rows = lambda a: None if a is None else a.reshape(b, t // bq, bq).transpose(1, 0, 2)
  return qb, kb, vb, q_rows(q_seg), kv_seg.reshape(b, s // bk, bk).transpose(1, 0, 2), q_rows(q_pre)


def _query_blocks(x, bq, kh):
  """[B, T, H, D] -> [nq, B, bq, K, G, D]."""
  b, t, h, d = x.shape
  return x.reshape(b, t // bq, bq, kh, h // kh, d).transpose(1, 0, 2, 3, 4, 5)


def _scores(q_blk, k_blk, scale):
  """[B, K, G, bq, bk] float32 scores of one tile."""
  return jnp.einsum("bqkgd,bskd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32, precision=_HI) * scale


def _positions(t: int, s: int, bq: int, bk: int):
  """Absolute query and key indices by block: [nq, bq], [nk, bk]."""
  return jnp.arange(t, dtype=jnp.int32).reshape(t // bq, bq), jnp.arange(s, dtype=jnp.int32).reshape(s // bk, bk)


def _forward(q, k, v, q_seg, kv_seg, q_pre, causal, blocks):
  """Returns (out [B, T, H, D], lse [nq, B, K, G, bq] float32 row log-sum-exp); blocks = (bq, bk)."""
  bq, bk = blocks
  b, t, h, d = q.shape
  kh = k.shape[2]
  g, scale = h // kh, d**-0.5
  # Why the masks' inputs pass through a barrier with q, and no tile holds a broadcast constant: differentiated
  # inside a scan over layers, JAX moves every value that depends on the loop's constants only (segments,
  # positions, fill values) out of the loop, and inside these loops that makes each tile's mask and fill a
  # residual, stacked [nq, nk, B, K, G, bq, bk]: 38 GiB a device in the 7B gradient micro-step (12,288-token
  # rows, tiles of 512). Tied to q, they are computed tile by tile like everything else.
  q, q_seg, kv_seg, q_pre, (q_pos, kv_pos) = jax.lax.optimization_barrier(
      (q, q_seg, kv_seg, q_pre, _positions(t, k.shape[1], bq, bk)))
  qb, kb, vb, qsb, ksb, qpb = _blocks(q, k, v, q_seg, kv_seg, q_pre, bq, bk)

  def q_step(_, xs):
    q_blk, qs, qp, q_at = xs

    def kv_step(carry, ys):
      k_blk, v_blk, ks, kv_at = ys
      keep = _tile_mask(qs, ks, qp, q_at, kv_at, causal)[:, None, None].astype(jnp.float32)  # [B, 1, 1, bq, bk]

      def tile(carry):
        m, l, acc = carry  # m, l [B, K, G, bq]; acc [B, K, G, bq, D] float32
        sc = _scores(q_blk, k_blk, scale) + (1.0 - keep) * _MASKED  # masked: _MASKED (|scores| << it)
        m_new = jnp.maximum(m, sc.max(-1))
        p = jnp.exp(sc - m_new[..., None]) * keep
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32,
                        precision=_HI)
        return m_new, l * corr + p.sum(-1), acc * corr[..., None] + pv

      return jax.lax.cond(keep.any(), tile, lambda c: c, carry), None

    init = (jnp.full((b, kh, g, bq), _MASKED, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, d), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, ksb, kv_pos))
    seen = l > 0  # only internal padding rows can see nothing; they come out as zeros
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return None, (out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse)  # [B, bq, K, G, D]

  _, (out, lse) = jax.lax.scan(q_step, None, (qb, qsb, qpb, q_pos))
  return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, t, h, d), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, q_seg, kv_seg, q_pre, causal, blocks):
  return _forward(q, k, v, q_seg, kv_seg, q_pre, causal, blocks)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_pre, causal, blocks):
  out, lse = _forward(q, k, v, q_seg, kv_seg, q_pre, causal, blocks)
  return out, (q, k, v, q_seg, kv_seg, q_pre, out, lse)


def _flash_bwd(causal, blocks, residuals, d_out):
  """FlashAttention-2 backward: dS = P * (dP - rowsum(dO * O)); one pass over query blocks, each
  scanning the key blocks, with dK, dV accumulated in float32 across the outer loop."""
  bq, bk = blocks
  q, k, v, q_seg, kv_seg, q_pre, out, lse = residuals
  b, t, h, d = q.shape
  kh = k.shape[2]
  g, scale = h // kh, d**-0.5
  qb, kb, vb, qsb, ksb, qpb = _blocks(q, k, v, q_seg, kv_seg, q_pre, bq, bk)
  dob = _query_blocks(d_out, bq, kh)
  delta = (d_out.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1)  # [B, T, H]
  delta = delta.reshape(b, t // bq, bq, kh, g).transpose(1, 0, 3, 4, 2)  # [nq, B, K, G, bq]
  q_pos, kv_pos = _positions(t, k.shape[1], bq, bk)

  def q_step(dkv, xs):
    q_blk, do_blk, lse_blk, delta_blk, qs, qp, q_at = xs

    def kv_step(dq, ys):
      k_blk, v_blk, ks, kv_at = ys
      mask = _tile_mask(qs, ks, qp, q_at, kv_at, causal)[:, None, None]

      def tile(dq):
        p = jnp.where(mask, jnp.exp(_scores(q_blk, k_blk, scale) - lse_blk[..., None]), 0.0)
        dv = jnp.einsum("bkgqs,bqkgd->bskd", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32,
                        precision=_HI)
        dp = jnp.einsum("bqkgd,bskd->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32, precision=_HI)
        ds = (p * (dp - delta_blk[..., None])).astype(q_blk.dtype)
        dq = dq + scale * jnp.einsum("bkgqs,bskd->bqkgd", ds, k_blk, preferred_element_type=jnp.float32,
                                     precision=_HI)
        dk = scale * jnp.einsum("bkgqs,bqkgd->bskd", ds, q_blk, preferred_element_type=jnp.float32, precision=_HI)
        return dq, dk, dv

      def skip(dq):
        zero = jnp.zeros(k_blk.shape, jnp.float32)
        return dq, zero, zero

      dq, dk, dv = jax.lax.cond(mask.any(), tile, skip, dq)
      return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_step, jnp.zeros(q_blk.shape, jnp.float32), (kb, vb, ksb, kv_pos))
    return (dkv[0] + dk, dkv[1] + dv), dq.astype(q.dtype)

  zeros = jnp.zeros(kb.shape, jnp.float32)
  (dk, dv), dq = jax.lax.scan(q_step, (zeros, zeros), (qb, dob, lse, delta, qsb, qpb, q_pos))
  dq = dq.transpose(1, 0, 2, 3, 4, 5).reshape(q.shape)
  unblock = lambda a, like: a.transpose(1, 0, 2, 3, 4).reshape(like.shape).astype(like.dtype)
  return dq, unblock(dk, k), unblock(dv, v), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
