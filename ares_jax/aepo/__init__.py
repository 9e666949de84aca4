"""AEPO (docs/design.md §5) as pure, jittable JAX functions; they accept numpy or jax arrays.

Modules follow the sections of docs/design.md:
  entropy_stats  §5.2-5.3   tau_high, N_HE, W_valid
  difficulty     §5.5       online difficulty bins (and the per-group reductions)
  rewards        §5.6       hierarchical entropy reward, ares_release shaping
  advantages     §5.8       GRPO advantages, DAPO online filter
  loss           §5.9-5.10  KL weights, k3 KL, the AEPO loss

Every public function is wrapped in `jax.jit` (string options such as `target_mode`, `loss_agg`
and `dual_clip` are static arguments), so eager calls on host arrays compile once per shape, and
the functions compose inside a caller's jit, grad or vmap as plain JAX code.
"""

from ares_jax.aepo.advantages import group_filter_mask, grpo_advantages
from ares_jax.aepo.difficulty import (EASY, HARD, MEDIUM, NUM_BINS, difficulty_bins, group_index, group_mean,
                                      pass_rates)
from ares_jax.aepo.entropy_stats import (ema_threshold, entropy_threshold, hwe_counts, hwe_marks,
                                         hwe_window_mask, trajectory_quantiles)
from ares_jax.aepo.loss import aepo_loss, aggregate, k3_kl, kl_weights
from ares_jax.aepo.rewards import (TARGET_MODES, ares_release_shaping, bin_statistics, hierarchical_reward,
                                   init_ema_state)

__all__ = [
    "EASY", "MEDIUM", "HARD", "NUM_BINS", "TARGET_MODES",
    "entropy_threshold", "trajectory_quantiles", "ema_threshold", "hwe_marks", "hwe_counts", "hwe_window_mask",
    "difficulty_bins", "pass_rates", "group_index", "group_mean",
    "hierarchical_reward", "ares_release_shaping", "bin_statistics", "init_ema_state",
    "grpo_advantages", "group_filter_mask",
    "kl_weights", "k3_kl", "aggregate", "aepo_loss",
]
