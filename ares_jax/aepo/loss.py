"""Dynamic KL budget (docs/design.md §5.9) and the AEPO policy loss (§5.10). Pure and jittable.

Shapes: S trajectories, N response positions. `loss_agg` and `dual_clip` are Python values (static
under jit).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

LOSS_AGGS = ("token_mean", "seq_mean_token_mean")
_LOG_RATIO_CLAMP = 20.0


@jax.jit
def kl_weights(bins: ArrayLike, window_mask: ArrayLike, beta_by_bin: ArrayLike, rho: float | ArrayLike = 0.5
               ) -> jax.Array:
  """beta_it = beta_{d_i} * rho_t, rho_t = rho inside W_valid(y_i), else 1 (docs/design.md §5.9).

  Args:
    bins: d_i, [S] int in {0, 1, 2}.
    window_mask: W_valid, [S, N] bool (`hwe_window_mask`).
    beta_by_bin: beta_d, [3] float (kl_coef times `aepo.kl_bin_scale`, by default {2, 1, 0.5}).
    rho: the in-window relaxation, < 1.

  Returns:
    [S, N] float32.
  """
  beta = jnp.asarray(beta_by_bin, jnp.float32)[jnp.asarray(bins, jnp.int32)]
  rho_t = jnp.where(jnp.asarray(window_mask).astype(bool), jnp.asarray(rho, jnp.float32), 1.0)
  return beta[:, None] * rho_t


@jax.jit
def k3_kl(logp: ArrayLike, ref_logp: ArrayLike) -> jax.Array:
  """The k3 ("low_var_kl") estimator of KL(pi || pi_ref) per token (docs/design.md §5.9).

  kl = exp(r) - r - 1 with r = ref_logp - logp, clamped to [-10, 10] (as verl's low_var_kl; r is
  also clamped to [-20, 20] before exp, which cannot change a value: |r| > 20 gives kl > 10).
  Same shape as the inputs, float32.
  """
  r = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
  r = jnp.clip(r, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  return jnp.clip(jnp.exp(r) - r - 1.0, -10.0, 10.0)


@functools.partial(jax.jit, static_argnames="loss_agg")
def aggregate(values: ArrayLike, loss_mask: ArrayLike, loss_agg: str = "token_mean",
              seq_weight: ArrayLike | None = None) -> jax.Array:
  """Reduces per-token `values` [S, N] over `loss_mask` [S, N] to a scalar.

  token_mean: sum over all loss-mask tokens / their number. seq_mean_token_mean: mean over the sequences
  with at least one loss-mask token of their token means; a row is a sequence, unless `seq_weight` [S, N]
  gives each token 1 / (its sequence's loss-mask tokens), which rows that pack several sequences need
  (`train.packing`): the sum of v * m * seq_weight is then the sum of the sequences' means, and the sum of
  m * seq_weight their number. 0 when nothing is masked in. (A mini-batch split into micro-batches weights
  each micro-batch's value by its share of the tokens or sequences.)
  """
  if loss_agg not in LOSS_AGGS:
    raise ValueError(f"loss_agg={loss_agg!r}; expected one of {LOSS_AGGS}")
  v = jnp.asarray(values, jnp.float32)
  m = jnp.asarray(loss_mask).astype(jnp.float32)
  if loss_agg == "token_mean":
    return (v * m).sum() / jnp.maximum(m.sum(), 1.0)
  if seq_weight is not None:
    w = m * jnp.asarray(seq_weight, jnp.float32)
    n = w.sum()
    return jnp.where(n > 0, (v * w).sum() / jnp.where(n > 0, n, 1.0), 0.0)
  per_tok = m.sum(-1)
  seq = (v * m).sum(-1) / jnp.maximum(per_tok, 1.0)
  has = per_tok > 0
  return jnp.where(has, seq, 0.0).sum() / jnp.maximum(has.sum(), 1)


@functools.partial(jax.jit, static_argnames=("dual_clip", "loss_agg"))
def aepo_loss(logprobs: ArrayLike, old_logprobs: ArrayLike, ref_logprobs: ArrayLike | None, adv: ArrayLike,
              loss_mask: ArrayLike, weights: ArrayLike | None, *, clip_low: float = 0.2, clip_high: float = 0.28,
              dual_clip: float | None = None, loss_agg: str = "token_mean", seq_weight: ArrayLike | None = None
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The AEPO objective (docs/design.md §5.10), to be minimised.

  ratio = exp(logp - old_logp) (log-ratio clamped to [-20, 20] as in verl);
  pg_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A); with `dual_clip` = c > 1,
  pg_t = min(pg_t, -c * A) where A < 0 (dual-clip PPO); per-token loss = pg_t + beta_it * kl_t with
  kl_t = `k3_kl(logp, ref_logp)`; aggregated by `loss_agg` over the loss-mask tokens.

  Args:
    logprobs: log pi_theta of the taken tokens, [S, N] (the argument to differentiate).
    old_logprobs: log pi_old (rollout policy), [S, N].
    ref_logprobs: log pi_ref, [S, N], or None for no KL term.
    adv: advantages, [S] (broadcast over tokens) or [S, N].
    loss_mask: tokens trained on, [S, N] bool (a branch's starts at its fork position).
    weights: beta_it, [S, N] or [S] (`kl_weights`); None with `ref_logprobs` None.
    clip_low, clip_high: the asymmetric clip range (DAPO clip-higher).
    dual_clip: c of dual-clip PPO, or None.
    loss_agg: "token_mean" or "seq_mean_token_mean".
    seq_weight: rows that pack several sequences: 1 / (loss tokens of the token's sequence), [S, N] (`aggregate`).

  Returns:
    (loss, metrics): loss a float32 scalar = metrics pg_loss + kl_loss; metrics (float32 scalars,
    no entropy needed): pg_loss, kl_loss (beta-weighted KL, aggregated like the loss), kl (mean k3
    over loss tokens, unweighted), clip_frac (tokens where the clipped branch is active),
    clip_frac_lower (tokens capped by the dual clip), ppo_kl (mean old_logp - logp), ratio_mean,
    ratio_max, num_tokens. The diagnostic ones are token means over the loss mask and carry no
    gradient.
  """
  logp = jnp.asarray(logprobs, jnp.float32)
  old = jnp.asarray(old_logprobs, jnp.float32)
  mask = jnp.asarray(loss_mask).astype(bool)
  a = jnp.asarray(adv, jnp.float32)
  if a.ndim == 1:
    a = a[:, None]
  a = jnp.broadcast_to(a, logp.shape)

  log_ratio = jnp.clip(logp - old, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  ratio = jnp.exp(log_ratio)
  pg1 = -a * ratio
  pg2 = -a * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  pg = jnp.maximum(pg1, pg2)
  clipped = pg2 > pg1
  lower = jnp.zeros_like(mask)
  if dual_clip is not None:
    if dual_clip <= 1.0:
      raise ValueError(f"dual_clip={dual_clip} must be > 1")
    pg3 = -a * jnp.float32(dual_clip)
    lower = (a < 0) & (pg > pg3)
    pg = jnp.where(a < 0, jnp.minimum(pg, pg3), pg)

  if ref_logprobs is None:
    kl = jnp.zeros_like(logp)
    w = jnp.zeros_like(logp)
  else:
    kl = k3_kl(logp, ref_logprobs)
    if weights is None:
      raise ValueError("weights (beta_it) are required when ref_logprobs is given")
    w = jnp.asarray(weights, jnp.float32)
    w = jnp.broadcast_to(w[:, None] if w.ndim == 1 else w, logp.shape)

  pg_loss = aggregate(pg, mask, loss_agg, seq_weight)
  kl_loss = aggregate(w * kl, mask, loss_agg, seq_weight)
  loss = pg_loss + kl_loss

  sg = jax.lax.stop_gradient
  mean = lambda v: aggregate(sg(v), mask, "token_mean")
  num = mask.sum()
  metrics = {
      "pg_loss": sg(pg_loss),
      "kl_loss": sg(kl_loss),
      "kl": mean(kl),
      "clip_frac": mean(clipped),
      "clip_frac_lower": mean(lower),
      "ppo_kl": mean(old - logp),
      "ratio_mean": mean(ratio),
      "ratio_max": jnp.where(num > 0, jnp.max(jnp.where(mask, sg(ratio), -jnp.inf)), 0.0),
      "num_tokens": num.astype(jnp.float32),
  }
  return loss, metrics
