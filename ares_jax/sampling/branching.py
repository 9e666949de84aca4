"""HWE branching inside the decode loop (docs/design.md §5.4; the caches: §7).

When the newest complete window of a trajectory is marked (window entropy >= tau_high), the
trajectory forks: the next free branch slot of the same prompt gets its cache prefix (a copy of the
rows of a dense cache; the page-table entries and one partly filled page of a paged one) and its
tokens, and is rewound to the window start t, from where it samples on its own RNG stream. Rules:
one fork per HWE window (a slot that forked, and its child, may fork again only at window starts
>= t + w); at most `n_branch` forks per prompt; slots are taken in order, so free slots are simply
those past the prompt's fork count.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def fork(state, marked: jax.Array, start: jax.Array, *, group: int, n_roots: int, n_branch: int, window: int):
  """Applies this step's forks to a `DecodeState`.

  marked [S]: the slot's newest complete window is an HWE window; start [S]: that window's start.
  A child rewound to position 0 feeds its prompt's last token again (`state.first_token`). The cache
  (dense rows or pages) copies what the children need itself: `state.cache.fork`.
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

  def apply(state):
    cols = jnp.arange(n_max)[None, :]
    keep = ~is_child[:, None] | (cols < t_child[:, None])  # a child keeps its parent's prefix
    # windows that reach into the resampled part are recomputed by the child
    keep_win = ~is_child[:, None] | (cols + window <= t_child[:, None])
    prev_tok = jnp.take_along_axis(take(state.tokens), jnp.maximum(t_child - 1, 0)[:, None], axis=1)[:, 0]
    pending = jnp.where(t_child > 0, prev_tok, state.first_token)
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
  any_fork = jnp.any(allowed_flat)
  state = state.replace(
      next_fork=jnp.where(forked_parent, start + window, state.next_fork),
      branches=state.branches + allowed.sum(axis=1).astype(jnp.int32),
      cache=state.cache.fork(any_fork, src_in_group, is_child.reshape(n_prompts, group),
                             t_child.reshape(n_prompts, group), n_roots))
  return jax.lax.cond(any_fork, apply, lambda s: s, state)
