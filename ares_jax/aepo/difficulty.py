"""Online difficulty bins (docs/design.md §5.5) and the per-group reductions they and GRPO share.

Groups: `group_ids` are arbitrary integers per trajectory (e.g. `rollouts.prompt_index`; any
values, not necessarily 0..G-1, in any order). **[decision]** They are relabelled inside jit with
`jnp.unique(..., size=S, return_inverse=True)` into dense labels 0..S-1, and all per-group sums
are `jax.ops.segment_sum` with `num_segments=S` (a static bound: there can never be more groups
than trajectories). This costs one sort of S integers, needs no extra static argument and keeps
memory O(S) (a pairwise [S, S] equality matrix would not).

Trajectory validity: every function takes an optional `traj_mask` [S] bool. Masked-out slots (e.g.
unused branch slots of the sampler, length 0) are left out of every group statistic and get
neutral outputs. None means all trajectories are valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

EASY, MEDIUM, HARD = 0, 1, 2
NUM_BINS = 3


def _valid(traj_mask: ArrayLike | None, s: int) -> jax.Array:
  return jnp.ones((s,), bool) if traj_mask is None else jnp.asarray(traj_mask).astype(bool)


@jax.jit
def group_index(group_ids: ArrayLike) -> jax.Array:
  """Dense group labels in [0, S) for arbitrary integer `group_ids` [S]; [S] int32."""
  ids = jnp.asarray(group_ids)
  s = ids.shape[0]
  _, inv = jnp.unique(ids, size=s, fill_value=ids.min() if s else 0, return_inverse=True)
  return inv.reshape(s).astype(jnp.int32)


@jax.jit
def group_sum(values: ArrayLike, group_ids: ArrayLike, traj_mask: ArrayLike | None = None
              ) -> tuple[jax.Array, jax.Array]:
  """Per-trajectory (sum over its group, count of its group), valid trajectories only; [S] each."""
  v = jnp.asarray(values, jnp.float32)
  s = v.shape[0]
  ok = _valid(traj_mask, s)
  g = group_index(group_ids)
  tot = jax.ops.segment_sum(jnp.where(ok, v, 0.0), g, num_segments=s)
  cnt = jax.ops.segment_sum(ok.astype(jnp.float32), g, num_segments=s)
  return tot[g], cnt[g]


@jax.jit
def group_mean(values: ArrayLike, group_ids: ArrayLike, traj_mask: ArrayLike | None = None) -> jax.Array:
  """Mean of `values` over each trajectory's group (valid members only), broadcast back; [S] float32.

  0 for a trajectory whose group has no valid member.
  """
  tot, cnt = group_sum(values, group_ids, traj_mask)
  return tot / jnp.maximum(cnt, 1.0)


@jax.jit
def pass_rates(accuracy: ArrayLike, group_ids: ArrayLike, traj_mask: ArrayLike | None = None) -> jax.Array:
  """p_g = mean accuracy of prompt g's group, per trajectory (docs/design.md §5.5); [S] float32."""
  return group_mean(accuracy, group_ids, traj_mask)


@jax.jit
def difficulty_bins(accuracy: ArrayLike, group_ids: ArrayLike, easy: float = 2 / 3, hard: float = 1 / 3,
                    traj_mask: ArrayLike | None = None) -> jax.Array:
  """Difficulty bin d of every trajectory from its group's pass rate p (docs/design.md §5.5).

  easy (0): p >= `easy`; medium (1): `hard` <= p < `easy`; hard (2): p < `hard`. With n = 8:
  >= 6 correct easy, 3-5 medium, <= 2 hard.

  Args:
    accuracy: R_acc per trajectory, [S] (1 correct, 0 wrong).
    group_ids: prompt of each trajectory, [S] int (arbitrary values).
    easy, hard: the bin thresholds.
    traj_mask: optional [S] bool of valid trajectories (see module docstring).

  Returns:
    [S] int32 in {0, 1, 2}.
  """
  p = pass_rates(accuracy, group_ids, traj_mask)
  return jnp.where(p >= jnp.float32(easy), EASY,
                   jnp.where(p >= jnp.float32(hard), MEDIUM, HARD)).astype(jnp.int32)
