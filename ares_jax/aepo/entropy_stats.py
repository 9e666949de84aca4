"""Entropy statistics of a rollout batch: the threshold tau_high (docs/design.md §5.2), HWE counts
N_HE (§5.3) and the validated HWE window set W_valid (§5.3).

All functions are pure and jittable and accept numpy or jax arrays. Shapes: S trajectory slots,
N response positions. Float work is done in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


@jax.jit
def trajectory_quantiles(entropy: ArrayLike, mask: ArrayLike, quantile: float = 0.95
                         ) -> tuple[jax.Array, jax.Array]:
  """Quantile_q({H_t(y)}) of every trajectory y (the summand of tau_high, docs/design.md §5.2).

  Matches `np.quantile(h[mask], q)` with numpy's default 'linear' method: with the k valid values
  sorted ascending, the virtual index is q * (k - 1) and the result interpolates linearly between
  its two neighbours.

  Args:
    entropy: H_t, [S, N] float.
    mask: valid response tokens, [S, N] bool (or 0/1).
    quantile: q in [0, 1].

  Returns:
    (quantiles [S] float32, has_tokens [S] bool). Rows without a valid token get quantile 0 and
    has_tokens False.
  """
  h = jnp.asarray(entropy, jnp.float32)
  m = jnp.asarray(mask).astype(bool)
  k = m.sum(axis=-1)  # [S]
  # Invalid entries sort to the end; only the first k of each row are read.
  srt = jnp.sort(jnp.where(m, h, jnp.inf), axis=-1)
  pos = jnp.float32(quantile) * (jnp.maximum(k, 1) - 1).astype(jnp.float32)
  lo = jnp.floor(pos)
  frac = pos - lo
  lo_i = lo.astype(jnp.int32)
  hi_i = jnp.minimum(lo_i + 1, jnp.maximum(k - 1, 0))
  a = jnp.take_along_axis(srt, lo_i[:, None], axis=-1)[:, 0]
  b = jnp.take_along_axis(srt, hi_i[:, None], axis=-1)[:, 0]
  # numpy's _lerp: a + (b - a) * t, computed from the upper end when t >= 0.5.
  diff = b - a
  val = jnp.where(frac >= 0.5, b - diff * (1 - frac), a + diff * frac)
  has = k > 0
  return jnp.where(has, val, 0.0), has


@jax.jit
def entropy_threshold(entropy: ArrayLike, mask: ArrayLike, quantile: float = 0.95) -> jax.Array:
  """tau_high = mean over trajectories y of Quantile_q({H_t(y)}) (docs/design.md §5.2).

  Trajectories with no valid token (e.g. unused branch slots, length 0) are left out of the mean.

  Args:
    entropy: token entropies H_t, [S, N] float.
    mask: valid response tokens, [S, N] bool.
    quantile: q, 0.95 in the paper.

  Returns:
    tau_high, a float32 scalar. **[decision]** +inf when no trajectory has a valid token, so that
    no window is marked (and `ema_threshold` keeps its previous value).
  """
  q, has = trajectory_quantiles(entropy, mask, quantile)
  n = has.sum()
  return jnp.where(n > 0, jnp.where(has, q, 0.0).sum() / jnp.maximum(n, 1), jnp.inf)


@jax.jit
def ema_threshold(prev: ArrayLike, new: ArrayLike, decay: float) -> jax.Array:
  """Optional EMA of tau_high (`tau_ema`, docs/design.md §5.2): decay * prev + (1 - decay) * new.

  A non-finite `prev` (nan or inf: no threshold yet) returns `new`; a non-finite `new` (an empty
  batch) returns `prev`. float32 scalar.
  """
  p = jnp.asarray(prev, jnp.float32)
  n = jnp.asarray(new, jnp.float32)
  mixed = jnp.float32(decay) * p + (1 - jnp.float32(decay)) * n
  return jnp.where(~jnp.isfinite(p), n, jnp.where(~jnp.isfinite(n), p, mixed))


@jax.jit
def hwe_marks(window_entropy: ArrayLike, window_valid_mask: ArrayLike, tau: ArrayLike,
              position_mask: ArrayLike | None = None) -> jax.Array:
  """m_t = 1[Hbar_t >= tau_high] on valid (complete) windows (docs/design.md §5.3), [S, N] bool.

  `position_mask` ([S, N] bool, optional) further restricts the marks, e.g. to window starts whose
  token decodes to a trigger word (the `trigger_words` mode of §5.3, resolved on the host).
  """
  wv = jnp.asarray(window_valid_mask).astype(bool)
  marks = wv & (jnp.asarray(window_entropy, jnp.float32) >= jnp.asarray(tau, jnp.float32))
  if position_mask is not None:
    marks = marks & jnp.asarray(position_mask).astype(bool)
  return marks


@jax.jit
def hwe_counts(window_entropy: ArrayLike, window_valid_mask: ArrayLike, tau: ArrayLike,
               position_mask: ArrayLike | None = None) -> jax.Array:
  """N_HE(y) = sum_t m_t, the number of high-window-entropy positions (docs/design.md §5.3).

  Args:
    window_entropy: Hbar_t, [S, N] float (the window starting at t).
    window_valid_mask: complete windows, t + w - 1 < length, [S, N] bool.
    tau: tau_high, a scalar (or anything broadcastable to [S, N]).
    position_mask: optional [S, N] bool restriction (`trigger_words` mode).

  Returns:
    N_HE, [S] int32.
  """
  return hwe_marks(window_entropy, window_valid_mask, tau, position_mask).sum(axis=-1).astype(jnp.int32)


@jax.jit
def hwe_window_mask(hwe: ArrayLike, window: int | ArrayLike) -> jax.Array:
  """W_valid(y) = union over marked t of [t, t + w - 1] (docs/design.md §5.3), [S, N] bool.

  Position j is covered iff some mark lies in [j - w + 1, j]; computed with a running count so
  `window` may be a Python int or a traced scalar. Windows reaching past N are cut at N.

  Args:
    hwe: marks m_t at window starts, [S, N] bool (e.g. `rollouts.hwe`).
    window: w >= 1.
  """
  m = jnp.asarray(hwe).astype(jnp.int32)
  n = m.shape[-1]
  c = jnp.cumsum(m, axis=-1)  # c[j] = marks in [0, j]
  j = jnp.arange(n)
  back = j - jnp.asarray(window, jnp.int32)  # marks in [0, j - w] are out of reach
  c_back = jnp.where(back >= 0, jnp.take(c, jnp.clip(back, 0, n - 1), axis=-1), 0)
  return (c - c_back) > 0
