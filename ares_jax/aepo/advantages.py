"""GRPO advantages and DAPO online filtering (docs/design.md §5.8). Pure and jittable.

Group handling (arbitrary integer `group_ids`, optional `traj_mask`) is that of `difficulty.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ares_jax.aepo.difficulty import _valid, group_mean, group_sum


@jax.jit
def grpo_advantages(reward: ArrayLike, group_ids: ArrayLike, eps: float = 1e-6,
                    traj_mask: ArrayLike | None = None) -> jax.Array:
  """A_i = (R_i - mean_g R) / (std_g R + eps), std unbiased (ddof = 1) over the group (docs/design.md §5.8).

  Every token of y_i gets A_i (broadcast in `aepo_loss`). A group with a single (valid) trajectory
  gets A = 0; masked-out trajectories get 0 and do not count in their group.

  Args:
    reward: R_i, [S] float.
    group_ids: prompt of each trajectory, [S] int (arbitrary values).
    eps: 1e-6.
    traj_mask: optional [S] bool of valid trajectories.

  Returns:
    A, [S] float32.
  """
  r = jnp.asarray(reward, jnp.float32)
  ok = _valid(traj_mask, r.shape[0])
  tot, cnt = group_sum(r, group_ids, ok)
  mean = tot / jnp.maximum(cnt, 1.0)
  sq, _ = group_sum((r - mean) ** 2, group_ids, ok)
  std = jnp.sqrt(sq / jnp.maximum(cnt - 1.0, 1.0))
  adv = (r - mean) / (std + jnp.float32(eps))
  return jnp.where(ok & (cnt > 1), adv, 0.0)


@jax.jit
def group_filter_mask(accuracy: ArrayLike, group_ids: ArrayLike, low: float = 0.01, high: float = 0.99,
                      traj_mask: ArrayLike | None = None) -> jax.Array:
  """DAPO online filtering (docs/design.md §5.8): True for trajectories whose group's mean accuracy lies in
  [low, high] (inclusive), i.e. groups that are neither all wrong nor all right; [S] bool.

  Filtered groups are left out of the update only; the statistics of §5.2-5.6 use the whole batch.
  Masked-out trajectories are False.
  """
  ok = _valid(traj_mask, jnp.asarray(accuracy).shape[0])
  p = group_mean(accuracy, group_ids, ok)
  return ok & (p >= jnp.float32(low)) & (p <= jnp.float32(high))
