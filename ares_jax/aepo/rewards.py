"""Hierarchical entropy reward (docs/design.md §5.6): per-bin N_HE statistics, targets, closed-form
multipliers lambda_d and the direction-aware shaping of the reward, plus the public release's
`ares_release` shaping.

Pure and jittable (`target_mode` is a Python string: mark it static when jitting a wrapper).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ares_jax.aepo.difficulty import EASY, HARD, MEDIUM, NUM_BINS, _valid

TARGET_MODES = ("correct_mean", "batch_mean", "ema", "ares_release")
# The `ema` mode's decay (the paper leaves it open; docs/design.md §5.6): a horizon of about ten steps.
TARGET_EMA_DECAY = 0.9

# ares_release constants per bin (easy, medium, hard), docs/design.md §5.6.
_REL_MARGIN_FRAC = (0.15, 0.25, 0.35)
_REL_KAPPA = (2.0, 3.0, 4.0)
_REL_TEMP = (2.0, 2.5, 3.0)
_REL_CAP = (1.0, 1.0, 1.2)  # times alpha
_REL_WRONG_SCALE = (0.6, 0.8, 1.0)


def init_ema_state() -> jax.Array:
  """EMA state of the `ema` target mode before the first step: [3] float32 of nan (no bin seen)."""
  return jnp.full((NUM_BINS,), jnp.nan, jnp.float32)


@jax.jit
def bin_statistics(values: ArrayLike, bins: ArrayLike, select: ArrayLike | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(count_d, mean_d, population variance_d) of `values` [S] over the trajectories of each bin d.

  `select` ([S] bool) restricts the members. Each output is [3] float32; an empty bin has count 0,
  mean 0 and variance 0.
  """
  v = jnp.asarray(values, jnp.float32)
  sel = _valid(select, v.shape[0])
  onehot = (jnp.asarray(bins)[:, None] == jnp.arange(NUM_BINS)[None, :]) & sel[:, None]  # [S, 3]
  w = onehot.astype(jnp.float32)
  cnt = w.sum(0)
  mean = (w * v[:, None]).sum(0) / jnp.maximum(cnt, 1.0)
  var = (w * (v[:, None] - mean[None, :]) ** 2).sum(0) / jnp.maximum(cnt, 1.0)
  return cnt, mean, var


def _huber(x: jax.Array, kappa: jax.Array) -> jax.Array:
  x = jnp.maximum(x, 0.0)
  return jnp.where(x <= kappa, x * x / (2 * kappa), x - kappa / 2)


@jax.jit
def ares_release_shaping(accuracy: ArrayLike, n_he: ArrayLike, bins: ArrayLike, target_by_bin: ArrayLike,
                         alpha: float = 0.5) -> jax.Array:
  """The public release's entropy reward per trajectory (docs/design.md §5.6, `ares_release`); [S] float32.

  With Delta = N_HE - target_d, margin = max(1, f_d * max(target_d, 1)), huber / sig / cap as in
  §5.6: correct easy and medium answers are penalised for exceeding the target band (easy: above,
  medium: either side); wrong answers get + sig(max(Delta - margin, 0)) * cap * {0.6, 0.8, 1};
  correct hard answers get + sig(Delta + margin) * cap when Delta >= -margin, else a half-weight
  huber penalty. The total reward is accuracy + this.

  Args:
    accuracy: [S] (1 correct, 0 wrong; correct means accuracy > 0).
    n_he: N_HE, [S].
    bins: [S] int in {0, 1, 2}.
    target_by_bin: [3] targets (round(mu_d) in the release).
    alpha: the cap scale.
  """
  acc = jnp.asarray(accuracy, jnp.float32)
  n = jnp.asarray(n_he, jnp.float32)
  b = jnp.asarray(bins, jnp.int32)
  pick = lambda table: jnp.asarray(table, jnp.float32)[b]
  target = jnp.asarray(target_by_bin, jnp.float32)[b]
  kappa, temp = pick(_REL_KAPPA), pick(_REL_TEMP)
  cap = jnp.float32(alpha) * pick(_REL_CAP)
  margin = jnp.maximum(1.0, pick(_REL_MARGIN_FRAC) * jnp.maximum(target, 1.0))
  delta = n - target
  sig = lambda x: 1.0 / (1.0 + jnp.exp(-x / temp))
  penalty = lambda x, scale: -jnp.minimum(cap, scale * _huber(x, kappa) / (margin + kappa) * cap)

  easy_correct = penalty(jnp.maximum(delta - margin, 0.0), 1.0)
  med_correct = penalty(jnp.maximum(jnp.abs(delta) - margin, 0.0), 1.0)
  hard_correct = jnp.where(delta >= -margin, sig(delta + margin) * cap, penalty(-delta - margin, 0.5))
  wrong = sig(jnp.maximum(delta - margin, 0.0)) * cap * pick(_REL_WRONG_SCALE)
  correct = jnp.where(b == EASY, easy_correct, jnp.where(b == MEDIUM, med_correct, hard_correct))
  return jnp.where(acc > 0, correct, wrong)


@functools.partial(jax.jit, static_argnames="target_mode")
def hierarchical_reward(accuracy: ArrayLike, n_he: ArrayLike, bins: ArrayLike,
                        target_mode: str = "correct_mean", *, eps: float = 1e-6, max_penalty: float = 1.0,
                        ema_state: ArrayLike | None = None,
                        traj_mask: ArrayLike | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """R(x, y; d), the hierarchical entropy reward of docs/design.md §5.6.

  Per bin d over its trajectories S_d: mu_d = mean N_HE, var_d = population variance of N_HE.
  target_d by `target_mode`:
    correct_mean (default): mean N_HE of the correct (accuracy > 0) trajectories of S_d, mu_d if
      none is correct;
    batch_mean: mu_d (the paper's literal formula: lambda_d = 0, plain GRPO rewards);
    ema: the EMA of mu_d over *previous* steps (`ema_state` [3], nan = bin not seen yet, in which
      case target_d = mu_d); the new state, decay * prev + (1 - decay) * mu_d (prev kept for a bin
      absent from this batch, mu_d for a first sighting), is returned as stats["ema_state"];
    ares_release: round(mu_d) (half to even), with `ares_release_shaping` instead of lambda.
  lambda_easy = max(0, mu - target) / (var + eps), lambda_med = |mu - target| / (var + eps),
  lambda_hard = max(0, target - mu) / (var + eps); with Delta_i = N_HE_i - target_d,
  g_easy = max(0, Delta), g_med = |Delta|, g_hard = max(0, -Delta), and
  R_i = R_acc_i - 1[acc_i = 0] * min(max_penalty, lambda_d * g_d(Delta_i)).

  Args:
    accuracy: R_acc, [S] (1 correct, 0 wrong).
    n_he: N_HE, [S] int or float.
    bins: difficulty bins, [S] int in {0 easy, 1 medium, 2 hard}.
    target_mode: one of TARGET_MODES.
    eps, max_penalty: as above (max_penalty 1 keeps R in [-1, 1]).
    ema_state: the `ema` mode's state (ignored by the other modes); its decay is TARGET_EMA_DECAY.
    traj_mask: optional [S] bool of valid trajectories; others are left out of the statistics and
      get reward 0.

  Returns:
    (reward [S] float32, stats) with stats target_d, lambda_d, mu_d, var_d, count_d ([3] float32
    each; lambda_d is 0 for `ares_release`), entropy_reward ([S], R - R_acc) and, for `ema`,
    ema_state ([3]).
  """
  if target_mode not in TARGET_MODES:
    raise ValueError(f"target_mode={target_mode!r}; expected one of {TARGET_MODES}")
  acc = jnp.asarray(accuracy, jnp.float32)
  n = jnp.asarray(n_he, jnp.float32)
  b = jnp.asarray(bins, jnp.int32)
  ok = _valid(traj_mask, acc.shape[0])
  correct = acc > 0
  cnt, mu, var = bin_statistics(n, b, ok)
  stats: dict[str, jax.Array] = {"mu": mu, "var": var, "count": cnt}

  if target_mode == "correct_mean":
    c_cnt, c_mean, _ = bin_statistics(n, b, ok & correct)
    target = jnp.where(c_cnt > 0, c_mean, mu)
  elif target_mode == "ema":
    prev = init_ema_state() if ema_state is None else jnp.asarray(ema_state, jnp.float32)
    seen = jnp.isfinite(prev)
    target = jnp.where(seen, prev, mu)
    d = jnp.float32(TARGET_EMA_DECAY)
    stats["ema_state"] = jnp.where(cnt > 0, jnp.where(seen, d * prev + (1 - d) * mu, mu), prev)
  elif target_mode == "ares_release":
    target = jnp.round(mu)
  else:  # batch_mean
    target = mu

  if target_mode == "ares_release":
    lam = jnp.zeros((NUM_BINS,), jnp.float32)
    shaping = ares_release_shaping(acc, n, b, target)
  else:
    gap = mu - target
    lam = jnp.stack([jnp.maximum(0.0, gap[EASY]), jnp.abs(gap[MEDIUM]), jnp.maximum(0.0, -gap[HARD])])
    lam = lam / (var + jnp.float32(eps))
    delta = n - target[b]
    g = jnp.where(b == EASY, jnp.maximum(0.0, delta),
                  jnp.where(b == MEDIUM, jnp.abs(delta), jnp.maximum(0.0, -delta)))
    pen = jnp.minimum(jnp.float32(max_penalty), lam[b] * g)
    shaping = -jnp.where(acc == 0, pen, 0.0)

  reward = jnp.where(ok, acc + shaping, 0.0)
  stats["target"], stats["lambda"] = target, lam
  stats["entropy_reward"] = jnp.where(ok, shaping, 0.0)
  return reward, stats
