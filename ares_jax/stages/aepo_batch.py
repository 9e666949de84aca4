"""From one batch of rollouts to the arrays of an AEPO update (design.md 5.2-5.9), on the host.

Everything here is the algorithm's bookkeeping between the sampler and the optimizer: grading
results in, AEPO statistics, rewards, advantages, KL weights and loss masks out.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
import numpy as np

from ares_jax import aepo
from ares_jax.sampling import Rollouts

BIN_NAMES = ("easy", "medium", "hard")


@dataclasses.dataclass
class Shaped:
  """Per-trajectory results of the statistics of one batch."""

  reward: np.ndarray  # [S]
  adv: np.ndarray  # [S]
  bins: np.ndarray  # [S]
  n_he: np.ndarray  # [S]
  train: np.ndarray  # [S] bool: used slot of a group kept by the online filter
  loss_mask: np.ndarray  # [S, N] bool
  kl_weights: np.ndarray  # [S, N]
  tau_high: float
  ema_state: np.ndarray
  metrics: dict[str, float]


def trigger_positions(r: Rollouts, trigger_tokens: np.ndarray | None) -> np.ndarray | None:
  """[S, N] bool: window starts whose token is a trigger word (`aepo.trigger_words`, design.md 5.3), given
  the vocabulary table of `data.tokenizer.word_token_table`; None (every window counts) without one."""
  if trigger_tokens is None:
    return None
  return trigger_tokens[np.clip(r.tokens, 0, len(trigger_tokens) - 1)] & r.mask


def shape_batch(r: Rollouts, accuracy: np.ndarray, fmt: np.ndarray, a: ml_collections.ConfigDict,
                prev_tau: float, prev_ema: np.ndarray, trigger_tokens: np.ndarray | None = None) -> Shaped:
  used = r.used
  at = trigger_positions(r, trigger_tokens)
  groups = r.prompt_index
  mask = r.mask
  tau = float(aepo.entropy_threshold(r.entropy, mask, a.entropy_quantile))
  if a.tau_ema > 0:
    tau = float(aepo.ema_threshold(prev_tau, tau, a.tau_ema))
  n_he = np.asarray(aepo.hwe_counts(r.window_entropy, r.window_valid, tau, at))
  bins = np.asarray(aepo.difficulty_bins(accuracy, groups, a.easy_threshold, a.hard_threshold, traj_mask=used))
  reward, stats = aepo.hierarchical_reward(
      accuracy, n_he, bins, a.target_mode, eps=a.eps, max_penalty=a.max_penalty,
      ema_state=jnp.asarray(prev_ema), traj_mask=used)
  reward = np.asarray(reward) + a.format_weight * fmt * used
  adv = np.asarray(aepo.grpo_advantages(reward, groups, traj_mask=used))
  keep = np.asarray(aepo.group_filter_mask(accuracy, groups, a.filter_low, a.filter_high, traj_mask=used))
  hwe_now = np.asarray(aepo.hwe_marks(r.window_entropy, r.window_valid, tau, at))
  window_mask = aepo.hwe_window_mask(hwe_now, a.window)
  beta = a.kl_coef * jnp.asarray(a.kl_bin_scale, jnp.float32)
  weights = np.asarray(aepo.kl_weights(bins, window_mask, beta, a.rho))
  cols = np.arange(mask.shape[1])[None, :]
  loss_mask = mask & (cols >= np.maximum(r.fork_pos, 0)[:, None])  # a branch trains from its fork on

  m: dict[str, float] = {
      "reward/mean": float(reward[used].mean()), "accuracy/mean": float(accuracy[used].mean()),
      "format/mean": float(fmt[used].mean()), "tau_high": tau,
      "entropy/mean": float(r.entropy[mask].mean()) if mask.any() else 0.0,
      "length/mean": float(r.length[used].mean()), "branches": float((r.parent >= 0).sum()),
      "filtered_groups": float(len(np.unique(groups[used & ~keep]))),
      "groups": float(len(np.unique(groups[used]))), "train_trajectories": float((keep & used).sum())}
  for d, name in enumerate(BIN_NAMES):
    sel = used & (bins == d)
    m[f"count/{name}"] = float(sel.sum())
    m[f"accuracy/{name}"] = float(accuracy[sel].mean()) if sel.any() else float("nan")
    m[f"length/{name}"] = float(r.length[sel].mean()) if sel.any() else float("nan")
    m[f"n_he/{name}"] = float(n_he[sel].mean()) if sel.any() else float("nan")
    m[f"lambda/{name}"] = float(stats["lambda"][d])
    m[f"target/{name}"] = float(stats["target"][d])
  ema = np.asarray(stats.get("ema_state", prev_ema))
  return Shaped(reward, adv, bins, n_he, keep & used, loss_mask, weights, tau, ema, m)
