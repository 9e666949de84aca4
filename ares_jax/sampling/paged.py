"""The paged KV cache of the rollout engine: each prompt once per group, responses in pages.

A group (one prompt's G = n + branches trajectory slots) owns, per layer,
  - its prompt's KV once, [T - 1, K, D] (the prompt but its last token, which every slot feeds at its
    first step), which every root and branch slot reads: the group's shared prompt pages;
  - a pool of R = G * ceil(N / page_size) response pages [R, page_size, K, D] and a page table per slot
    [G, pages per slot] (-1: none), filled by a bump allocator (`next_free`).
Arrays are [F, ...] over the F groups in flight, so with the group axis sharded every gather and
scatter stays inside a group, on the devices that hold its slots.

Why per-group pools with the worst case reserved: a slot only ever takes fresh pages (a root as it
grows, a child from its fork position on), never gives one back while its group decodes, and needs at
most ceil(N / page_size) of its own; so G of those per group can never run out, nothing is evicted or
recomputed, and the outputs cannot depend on what else is in flight. A group's pages are all free
again when it ends (its slots are refilled with the next prompt, `refill.py`).

Copy-on-write forks: a child forked at response position t maps its parent's pages wholly before t,
and gets a copy of the one partly filled page (none when t is a page boundary); later tokens go to
pages of its own. Shared pages are never written: every slot writes only at positions >= its length,
and a page below a child's fork position is full.

Decode attention (`paged_attention`) reads each group's prompt once per step for all of its G queries (a
grouped einsum: G * H query rows per kv head) and the response pages in blocks merged with a running
log-sum-exp, in one of two ways (`SamplingConfig.decode_attention`):
  - "per_group" (accelerators): block j is pages [j * bp, (j + 1) * bp) of every group's pool, sliced (no
    gather), up to the most pages any group has taken, read once for all G queries; each slot keeps the keys
    of the pages its table maps, at their positions. A prefix that forks share is read once, not once per
    slot; scores cost G times a slot's flops, which decode has to spare where it is bound by HBM bandwidth.
  - "per_slot" (CPUs): block j is table columns [j * bp, (j + 1) * bp) of every slot, gathered from its
    group's pool: a slot's flops exactly (on the CPU benchmark's shapes attention went 49 -> 29 ms per
    layer), but compiled for TPU at 7B the gather made XLA copy every layer's pool around the decode loop
    (its temporaries went 9.6 -> 108 GiB), and so did a layout with fixed places per (slot, page) read by a
    slice and a gather over the slots of the block.
The Pallas `ragged_paged_attention` TPU kernel was not used: it reads each sequence's pages on its own (the
shared prompt G times) and returns no log-sum-exp to merge blocks read apart, and it cannot mask a
left-padded prompt.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

_NEG = -0.7 * float(np.finfo(np.float32).max)  # finite, as the dense path's mask value
_UNMAPPED = np.iinfo(np.int32).max // 2  # a page position no length reaches
_PREC = jax.lax.Precision.HIGHEST
BLOCK_TOKENS = 256  # response keys read per attention block (a few pages); smaller wastes loop trips


def pages_per_slot(n_max: int, page_size: int) -> int:
  """Table width: the pages of N response positions."""
  return -(-n_max // page_size)


def block_pages_for(page_size: int) -> int:
  return max(1, BLOCK_TOKENS // page_size)


@struct.dataclass
class PagedCache:
  """KV of F groups of G slots (L layers; K kv heads of D; P_s pages per slot)."""

  prompt_k: tuple[jax.Array, ...]  # L x [F, T - 1, K, D]
  prompt_v: tuple[jax.Array, ...]
  prompt_valid: jax.Array  # [F, T - 1] bool: real prompt tokens (left padding is not)
  pool_k: tuple[jax.Array, ...]  # L x [F, R, page_size, K, D]
  pool_v: tuple[jax.Array, ...]
  table: jax.Array  # [F, G, P_s] int32 page of each slot's response page j; -1: none yet
  next_free: jax.Array  # [F] int32 first unused page of each group's pool
  block_pages: int = struct.field(pytree_node=False)
  per_slot: bool = struct.field(pytree_node=False, default=False)  # `paged_attention`'s two ways
  # > 0: attention reads exactly this many page blocks, unrolled, whatever the live length: memory plans
  # compile one decode step so to read its cost at a live length (a loop's body is counted once)
  cost_blocks: int = struct.field(pytree_node=False, default=0)

  @property
  def page_size(self) -> int:
    return self.pool_k[0].shape[2]

  def page_positions(self) -> jax.Array:
    """[F, G, R] int32: the response position of page p's first token in slot g's sequence, or a number
    past any length where g does not map p (made once per step, read by every layer)."""
    n_groups, group, n_pages = self.table.shape
    r_pages = self.pool_k[0].shape[1]
    first = jnp.arange(n_pages, dtype=jnp.int32) * self.page_size
    mapped = jnp.where(self.table >= 0, self.table, r_pages)  # out of range: dropped
    unmapped = jnp.full((r_pages,), _UNMAPPED, jnp.int32)
    return jax.vmap(jax.vmap(lambda t: unmapped.at[t].set(first, mode="drop")))(mapped)

  def attention(self, length, active):
    """(this cache with a fresh page for each active slot whose response position `length` [S] starts one,
    the L layers' attention of the step). Each layer's attention writes the fed token's KV into its page
    before reading the pool and returns the written pools: XLA then updates the pools in place (written
    after a loop had read them, they would be copied whole)."""
    n_groups, group, n_pages = self.table.shape
    ps, r_pages = self.page_size, self.pool_k[0].shape[1]
    length, active = length.reshape(n_groups, group), active.reshape(n_groups, group)
    need = active & (length % ps == 0)
    new_page = self.next_free[:, None] + jnp.cumsum(need, axis=1) - 1  # [F, G]
    table = jnp.where(need[..., None] & (jnp.arange(n_pages) == (length // ps)[..., None]), new_page[..., None],
                      self.table)
    page = jnp.take_along_axis(table, (length // ps)[..., None], axis=2)[..., 0]
    page = jnp.where(active, page, r_pages)  # out of range: an ended slot writes nothing
    offset = length % ps
    cache = self.replace(table=table, next_free=self.next_free + need.sum(axis=1, dtype=jnp.int32))
    page_pos = None if self.per_slot else cache.page_positions()

    def store(pool, new):  # pool [F, R, ps, K, D], new [S, 1, K, D]
      new = new.reshape(n_groups, group, *new.shape[2:]).astype(pool.dtype)
      return jax.vmap(lambda p, i, o, x: p.at[i, o].set(x, mode="drop"))(pool, page, offset, new)

    def attend(i, q, k, v):
      pool_k, pool_v = store(self.pool_k[i], k), store(self.pool_v[i], v)
      out = paged_attention(q, k, v, self.prompt_k[i], self.prompt_v[i], self.prompt_valid, pool_k, pool_v,
                            page_pos=page_pos, table=table, length=length.reshape(-1),
                            pages_used=cache.next_free, block_pages=self.block_pages, blocks=self.cost_blocks)
      return out, (pool_k, pool_v)
    return cache, [functools.partial(attend, i) for i in range(len(self.pool_k))]

  def absorb(self, updates, length, active):
    """The pools each layer's attention wrote (`attention`)."""
    del length, active
    return self.replace(pool_k=tuple(u[0] for u in updates), pool_v=tuple(u[1] for u in updates))

  def fork(self, any_fork, src_in_group, is_child, t_child, n_roots):
    """New children [F, G] (forked at `t_child` from slot `src_in_group` of their group) map their parent's
    full pages before t and a copy of the partly filled one."""
    del n_roots
    ps, n_pages = self.page_size, self.table.shape[2]
    parent_table = jnp.take_along_axis(self.table, src_in_group[..., None], axis=1)  # [F, G, P_s]
    full = t_child // ps
    partial = is_child & (t_child % ps != 0)
    new_page = self.next_free[:, None] + jnp.cumsum(partial, axis=1) - 1
    cols = jnp.arange(n_pages)
    child_table = jnp.where(cols < full[..., None], parent_table, -1)
    child_table = jnp.where(partial[..., None] & (cols == full[..., None]), new_page[..., None], child_table)
    table = jnp.where(is_child[..., None], child_table, self.table)
    r_pages = self.pool_k[0].shape[1]
    src = jnp.take_along_axis(parent_table, jnp.minimum(full, n_pages - 1)[..., None], axis=2)[..., 0]
    dst = jnp.where(partial, new_page, r_pages)  # out of range: nothing copied

    def copy_pages(pool):  # G pages per group read and written, not the cache
      return jax.vmap(lambda p, s, d: p.at[d].set(jnp.take(p, s, axis=0, mode="clip"), mode="drop"))(pool, src, dst)

    cond_copy = lambda c: jax.lax.cond(any_fork, copy_pages, lambda x: x, c)
    return self.replace(pool_k=tuple(map(cond_copy, self.pool_k)), pool_v=tuple(map(cond_copy, self.pool_v)),
                        table=table, next_free=self.next_free + partial.sum(axis=1, dtype=jnp.int32))

  def admit(self, groups, k, v, mask):
    """Groups [Q] (out of range: skipped) take new prompts: k, v [L, Q, T, K, D] from prefill, mask [Q, T]."""
    put = lambda buf, x: buf.at[groups].set(x[:, :-1].astype(buf.dtype), mode="drop")
    return self.replace(prompt_k=tuple(put(b, x) for b, x in zip(self.prompt_k, k)),
                        prompt_v=tuple(put(b, x) for b, x in zip(self.prompt_v, v)),
                        prompt_valid=put(self.prompt_valid, mask.astype(bool)),
                        table=self.table.at[groups].set(-1, mode="drop"),
                        next_free=self.next_free.at[groups].set(0, mode="drop"))


def empty_cache(n_layers: int, n_groups: int, group: int, t_prompt: int, n_max: int, *, page_size: int,
                kv_heads: int, head_dim: int, dtype, attention: str = "per_group") -> PagedCache:
  """A cache of F empty groups (sharded like the dense cache: groups over data x fsdp, heads over tensor);
  `attention`: "per_group" or "per_slot" (`paged_attention`)."""
  if attention not in ("per_group", "per_slot"):
    raise ValueError(f"paged attention {attention!r}: per_group or per_slot (resolve 'auto' by platform first)")
  bp = block_pages_for(page_size)
  n_pages = pages_per_slot(n_max, page_size)
  r_pages = -(-group * -(-n_max // page_size) // bp) * bp  # whole attention blocks
  prompt = lambda: nn.with_logical_constraint(jnp.zeros((n_groups, t_prompt - 1, kv_heads, head_dim), dtype),
                                              ("cache_batch", None, "cache_heads", None))
  pool = lambda: nn.with_logical_constraint(jnp.zeros((n_groups, r_pages, page_size, kv_heads, head_dim), dtype),
                                            ("cache_batch", None, None, "cache_heads", None))
  layers = lambda make: tuple(make() for _ in range(n_layers))
  return PagedCache(prompt_k=layers(prompt), prompt_v=layers(prompt),
                    prompt_valid=jnp.zeros((n_groups, t_prompt - 1), bool),
                    pool_k=layers(pool), pool_v=layers(pool), table=jnp.full((n_groups, group, n_pages), -1, jnp.int32),
                    next_free=jnp.zeros((n_groups,), jnp.int32),
                    block_pages=bp, per_slot=attention == "per_slot")


def paged_attention(q, k_new, v_new, prompt_k, prompt_v, prompt_valid, pool_k, pool_v, *, page_pos, table,
                    length, pages_used, block_pages: int, blocks: int = 0):
  """One decode step's attention of S = F * G slots.

  q [S, 1, H, D]; k_new, v_new [S, 1, K, D] (the token's own key); prompt_k/v [F, T', K, D] with
  prompt_valid [F, T']; pool_k/v [F, R, ps, K, D]; table [F, G, P_s] (-1: unmapped); length [S]: response
  keys 0..length-1 are live; pages_used [F]. `blocks` > 0: read that many page blocks, unrolled
  (`PagedCache.cost_blocks`). Returns [S, 1, H, D] in q's dtype.

  The prompt is read once per group for all G queries. page_pos [F, G, R] (`PagedCache.page_positions`):
  the response pages "per_group" (block j is pages [j * bp, (j + 1) * bp) of every group's pool, a slice,
  and each slot keeps the keys of the pages its table maps, at their positions: softmax does not care in
  which order keys come); None: "per_slot" (block j is table columns [j * bp, (j + 1) * bp) of every
  slot, gathered from its group's pool).
  """
  s_slots, _, n_heads, d = q.shape
  n_groups, _, kv_heads, _ = prompt_k.shape
  group, rep, ps = s_slots // n_groups, n_heads // kv_heads, pool_k.shape[2]
  scale = d**-0.5
  qg = q.reshape(n_groups, group, kv_heads, rep, d)
  dot = lambda spec, a, b: jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=jnp.float32, precision=_PREC)

  s_prompt = dot("fgkrd,ftkd->fgkrt", qg, prompt_k) * scale
  s_prompt = jnp.where(prompt_valid[:, None, None, None, :], s_prompt, _NEG)
  s_self = dot("fgkrd,fgkd->fgkr", qg, k_new.reshape(n_groups, group, kv_heads, d)) * scale
  m = jnp.maximum(s_prompt.max(-1), s_self)  # [F, G, K, r] running max
  p_prompt, p_self = jnp.exp(s_prompt - m[..., None]), jnp.exp(s_self - m)
  l = p_prompt.sum(-1) + p_self
  o = dot("fgkrt,ftkd->fgkrd", p_prompt.astype(prompt_v.dtype), prompt_v)
  o = o + p_self[..., None] * v_new.reshape(n_groups, group, kv_heads, 1, d).astype(jnp.float32)
  live = length.reshape(n_groups, group)
  span = block_pages * ps
  if page_pos is None:  # per_slot: table columns of every slot, gathered
    n_cols = -(-table.shape[2] // block_pages)
    table = jnp.pad(table, ((0, 0), (0, 0), (0, n_cols * block_pages - table.shape[2])), constant_values=-1)
    gather = jax.vmap(lambda pool, pages: pool[pages])  # [R, ps, K, D], [G, bp] -> [G, bp, ps, K, D]
    specs = ("fgkrd,fgpskd->fgkrps", "fgkrps,fgpskd->fgkrd")
    n_blocks = (jnp.max(length) + span - 1) // span  # only blocks some slot has live keys in

    def read(j):  # (k, v [F, G, bp, ps, K, D], which keys each slot keeps [F, G, bp, ps])
      pages = jnp.maximum(jax.lax.dynamic_slice_in_dim(table, j * block_pages, block_pages, axis=2), 0)
      ok = (j * span + jnp.arange(span).reshape(block_pages, ps)) < live[..., None, None]
      return gather(pool_k, pages), gather(pool_v, pages), ok
  else:  # per_group: pages of every group's pool, sliced
    n_cols = pool_k.shape[1] // block_pages
    specs = ("fgkrd,fpskd->fgkrps", "fgkrps,fpskd->fgkrd")
    n_blocks = (jnp.max(pages_used) + block_pages - 1) // block_pages  # only pages some group has taken

    def read(j):  # (k, v [F, bp, ps, K, D], which keys each slot keeps [F, G, bp, ps])
      first = jax.lax.dynamic_slice_in_dim(page_pos, j * block_pages, block_pages, axis=2)  # [F, G, bp]
      ok = (first[..., None] + jnp.arange(ps)) < live[..., None, None]
      return (jax.lax.dynamic_slice_in_dim(pool_k, j * block_pages, block_pages, axis=1),
              jax.lax.dynamic_slice_in_dim(pool_v, j * block_pages, block_pages, axis=1), ok)

  def block(j, carry):
    m, l, o = carry
    k_blk, v_blk, ok = read(j)
    s = dot(specs[0], qg, k_blk) * scale
    s = jnp.where(ok[:, :, None, None], s, _NEG).reshape(*s.shape[:4], -1)
    m_new = jnp.maximum(m, s.max(-1))
    corr, p = jnp.exp(m - m_new), jnp.exp(s - m_new[..., None])
    p = p.reshape(*p.shape[:4], block_pages, ps).astype(v_blk.dtype)
    o = o * corr[..., None] + dot(specs[1], p, v_blk)
    return m_new, l * corr + p.astype(jnp.float32).sum((-2, -1)), o

  if blocks:
    for j in range(min(blocks, n_cols)):
      m, l, o = block(j, (m, l, o))
  else:
    m, l, o = jax.lax.fori_loop(0, n_blocks, block, (m, l, o))
  return (o / l[..., None]).reshape(s_slots, 1, n_heads, d).astype(q.dtype)
