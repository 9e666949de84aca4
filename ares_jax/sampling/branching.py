"""HWE branching inside the decode loop (design.md 5.4).

When the newest complete window of a trajectory is marked (window entropy >= tau_high), the
trajectory forks: the next free branch slot of the same prompt gets a copy of its cache rows and
tokens and is rewound to the window start t, from where it samples on its own RNG stream. Rules:
one fork per HWE window (a slot that forked, and its child, may fork again only at window starts
>= t + w); at most `n_branch` forks per prompt; slots are taken in order, so free slots are simply
those past the prompt's fork count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fork(state, marked: jax.Array, start: jax.Array, *, group: int, n_roots: int, n_branch: int, window: int,
         first_token: jax.Array):
  """Applies this step's forks to a `DecodeState`.

  marked [S]: the slot's newest complete window is an HWE window; start [S]: that window's start.
  first_token [S]: the prompt's last token, fed again by a child rewound to position 0.
  """
  s_slots, n_max = state.tokens.shape
  n_prompts = s_slots // group
  want = (marked & (start >= state.next_fork)).reshape(n_prompts, group)
  rank = jnp.cumsum(want, axis=1) - 1
  allowed = want & (rank < (n_branch - state.branches)[:, None])  # [P, G]
  child = (jnp.arange(n_prompts) * group + n_roots + state.branches)[:, None] + rank  # slot of each fork
  allowed_flat = allowed.reshape(-1)
  child_flat = jnp.where(allowed_flat, child.reshape(-1), s_slots)  # s_slots = out of range: dropped
  parents = jnp.arange(s_slots)
  # src[c] = parent of a new child c, else c itself
  src = jnp.arange(s_slots).at[child_flat].set(parents, mode="drop")
  is_child = src != jnp.arange(s_slots)
  t_child = jnp.take(start, src)  # fork position of each new child

  # Gathers stay inside each prompt's group of slots ([P, G, ...] with a per-prompt index), so with the
  # slot axis sharded over devices no device reads another's cache rows (an unstructured gather over S
  # would make the partitioner all-gather every layer's cache).
  src_in_group = (src - (jnp.arange(s_slots) // group) * group).reshape(n_prompts, group)

  def take(x):
    grouped = x.reshape(n_prompts, group, *x.shape[1:])
    return jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0))(grouped, src_in_group).reshape(x.shape)

  def copy_rows(cache):
    """cache [S, C, K, D] with each new child's rows replaced by its parent's, in place: one row per
    prompt and branch slot is read and written (a whole-cache gather would double the cache's memory)."""
    grouped = cache.reshape(n_prompts, group, *cache.shape[1:])
    for j in range(n_roots, group):  # only branch slots can be new children
      rows = jax.vmap(lambda g, i: jax.lax.dynamic_index_in_dim(g, i, 0, keepdims=False))(grouped, src_in_group[:, j])
      grouped = grouped.at[:, j].set(rows)
    return grouped.reshape(cache.shape)

  def apply(state):
    cols = jnp.arange(n_max)[None, :]
    keep = ~is_child[:, None] | (cols < t_child[:, None])  # a child keeps its parent's prefix
    # windows that reach into the resampled part are recomputed by the child
    keep_win = ~is_child[:, None] | (cols + window <= t_child[:, None])
    prev_tok = jnp.take_along_axis(take(state.tokens), jnp.maximum(t_child - 1, 0)[:, None], axis=1)[:, 0]
    pending = jnp.where(t_child > 0, prev_tok, first_token)
    return state.replace(
        tokens=jnp.where(keep, take(state.tokens), 0),
        logprobs=jnp.where(keep, take(state.logprobs), 0.0),
        entropy=jnp.where(keep, take(state.entropy), 0.0),
        window_entropy=jnp.where(keep_win, take(state.window_entropy), 0.0),
        window_valid=keep_win & take(state.window_valid),
        hwe=keep_win & take(state.hwe),
        length=jnp.where(is_child, t_child, state.length),
        pending=jnp.where(is_child, pending, state.pending),
        active=state.active | is_child,
        parent=jnp.where(is_child, src, state.parent),
        fork_pos=jnp.where(is_child, t_child, state.fork_pos),
        next_fork=jnp.where(is_child, t_child + window, state.next_fork))

  forked_parent = allowed_flat
  state = state.replace(
      next_fork=jnp.where(forked_parent, start + window, state.next_fork),
      branches=state.branches + allowed.sum(axis=1).astype(jnp.int32))
  # One conditional per cache array rather than one around the whole state: a conditional's result is
  # a buffer apart from its operand, so this bounds the extra memory by one layer's cache.
  any_fork = jnp.any(allowed_flat)
  cond_copy = lambda c: jax.lax.cond(any_fork, copy_rows, lambda x: x, c)
  state = state.replace(cache_k=tuple(map(cond_copy, state.cache_k)), cache_v=tuple(map(cond_copy, state.cache_v)))
  return jax.lax.cond(any_fork, apply, lambda s: s, state)
