"""aepo KL weights, k3 KL (docs/design.md §5.9) and the AEPO loss (§5.10) against loop-based numpy
re-derivations from the spec text; the loss gradient against numpy finite differences and an
analytic derivative."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax import aepo

SEEDS = (0, 1, 2)
BETA_SCALE = np.array([2.0, 1.0, 0.5], np.float32)  # docs/design.md §5.9: beta_d / kl_coef for easy, medium, hard


# ---------------------------------------------------------------- numpy references (from the spec)

def ref_k3(logp, ref_logp):
  r = ref_logp - logp
  return min(max(math.exp(r) - r - 1.0, -10.0), 10.0)


def ref_token_loss(logp, old, ref, a, w, clip_low, clip_high, dual_clip):
  ratio = math.exp(logp - old)
  pg = -min(ratio * a, min(max(ratio, 1 - clip_low), 1 + clip_high) * a)
  if dual_clip is not None and a < 0:
    pg = min(pg, -dual_clip * a)
  kl = 0.0 if ref is None else ref_k3(logp, ref)
  return pg, kl, pg + w * kl


def ref_loss(logp, old, ref, adv, mask, weights, clip_low=0.2, clip_high=0.28, dual_clip=None,
             loss_agg="token_mean"):
  s, n = logp.shape
  a2 = adv if adv.ndim == 2 else np.repeat(adv[:, None], n, axis=1)
  w2 = np.zeros((s, n)) if weights is None else weights
  tot, pg_tot, cnt, seq_means, kl_tot = 0.0, 0.0, 0, [], 0.0
  for i in range(s):
    row, row_n = 0.0, 0
    for t in range(n):
      if not mask[i, t]:
        continue
      pg, kl, tok = ref_token_loss(logp[i, t], old[i, t], None if ref is None else ref[i, t], a2[i, t],
                                   w2[i, t], clip_low, clip_high, dual_clip)
      tot, pg_tot, kl_tot, cnt = tot + tok, pg_tot + pg, kl_tot + kl, cnt + 1
      row, row_n = row + tok, row_n + 1
    if row_n:
      seq_means.append(row / row_n)
  if loss_agg == "token_mean":
    loss = tot / max(cnt, 1)
  else:
    loss = float(np.mean(seq_means)) if seq_means else 0.0
  return loss, {"pg_loss_token_mean": pg_tot / max(cnt, 1), "kl": kl_tot / max(cnt, 1)}


def ref_grad(logp, old, ref, adv, mask, weights, clip_low=0.2, clip_high=0.28, dual_clip=None,
             loss_agg="token_mean"):
  """Analytic d loss / d logp of the reference, token by token."""
  s, n = logp.shape
  a2 = adv if adv.ndim == 2 else np.repeat(adv[:, None], n, axis=1)
  g = np.zeros((s, n))
  per_row = mask.sum(1)
  n_seq = (per_row > 0).sum()
  for i in range(s):
    for t in range(n):
      if not mask[i, t]:
        continue
      ratio = math.exp(logp[i, t] - old[i, t])
      a = a2[i, t]
      unclipped, clipped = ratio * a, min(max(ratio, 1 - clip_low), 1 + clip_high) * a
      d_pg = -a * ratio if unclipped <= clipped else 0.0  # the clipped branch is constant in logp
      if dual_clip is not None and a < 0 and -min(unclipped, clipped) > -dual_clip * a:
        d_pg = 0.0
      r = ref[i, t] - logp[i, t]
      d_kl = (1.0 - math.exp(r)) if math.exp(r) - r - 1.0 < 10.0 else 0.0
      d = d_pg + weights[i, t] * d_kl
      g[i, t] = d / mask.sum() if loss_agg == "token_mean" else d / per_row[i] / n_seq
  return g


def random_loss_inputs(seed, s=6, n=12, per_token_adv=False):
  rng = np.random.default_rng(seed)
  old = np.log(rng.uniform(0.05, 0.95, size=(s, n)))
  logp = old + rng.normal(0, 0.25, size=(s, n))  # some ratios outside [0.8, 1.28]
  ref = logp + rng.normal(0, 0.6, size=(s, n))
  ref[0, :3] = logp[0, :3] + np.array([4.0, -12.0, 2.5])  # k3 beyond the clamp at 10, and near it
  adv = rng.normal(size=(s, n)) if per_token_adv else rng.normal(size=s)
  mask = rng.random((s, n)) < 0.8
  mask[0, :3] = True
  mask[-1] = False  # an empty row
  bins = rng.integers(0, 3, size=s)
  wmask = rng.random((s, n)) < 0.3
  weights = np.asarray(aepo.kl_weights(bins, wmask, 0.05 * BETA_SCALE, 0.5), np.float64)
  return logp, old, ref, adv, mask, weights


# ---------------------------------------------------------------- k3 and KL weights

def test_k3_matches_numpy_and_clamps():
  rng = np.random.default_rng(0)
  logp = rng.normal(-2, 1, size=(5, 7))
  ref = logp + rng.normal(0, 2, size=(5, 7))
  ref[0, 0], ref[0, 1] = logp[0, 0] + 30.0, logp[0, 1] - 30.0
  got = np.asarray(aepo.k3_kl(logp, ref))
  want = np.array([[ref_k3(logp[i, t], ref[i, t]) for t in range(7)] for i in range(5)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got.dtype == np.float32 and got.max() <= 10.0 and got.min() >= 0.0
  assert got[0, 0] == 10.0 and got[0, 1] == 10.0
  np.testing.assert_allclose(float(aepo.k3_kl(np.float32(-1.0), np.float32(-1.0))), 0.0, atol=1e-7)


def test_kl_weights():
  bins = np.array([0, 1, 2, 1])
  wmask = np.zeros((4, 5), bool)
  wmask[0, 1:3] = True
  wmask[2, 4] = True
  beta = 1e-2 * BETA_SCALE
  got = np.asarray(aepo.kl_weights(bins, wmask, beta, 0.5))
  assert got.shape == (4, 5) and got.dtype == np.float32
  want = np.zeros((4, 5))
  for i in range(4):
    for t in range(5):
      want[i, t] = [0.02, 0.01, 0.005][bins[i]] * (0.5 if wmask[i, t] else 1.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------- the loss

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_loss_matches_numpy(seed, loss_agg, dual_clip):
  logp, old, ref, adv, mask, weights = random_loss_inputs(seed)
  if dual_clip is not None:
    old = old.copy()
    old[1] = logp[1] - 2.0  # ratio e^2 > 3: the dual clip bites where A < 0
    adv = adv.copy()
    adv[1] = -1.0
  loss, metrics = aepo.aepo_loss(logp, old, ref, adv, mask, weights, dual_clip=dual_clip, loss_agg=loss_agg)
  want, parts = ref_loss(logp, old, ref, adv, mask, weights, dual_clip=dual_clip, loss_agg=loss_agg)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  np.testing.assert_allclose(float(loss), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(metrics["pg_loss"] + metrics["kl_loss"]), float(loss), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(metrics["kl"]), parts["kl"], rtol=1e-5)
  if loss_agg == "token_mean":
    np.testing.assert_allclose(float(metrics["pg_loss"]), parts["pg_loss_token_mean"], rtol=1e-5, atol=1e-6)
  m = mask.astype(bool)
  ratio = np.exp(logp - old)
  a2 = np.repeat(adv[:, None], logp.shape[1], 1)
  clip_frac = ((-a2 * np.clip(ratio, 0.8, 1.28) > -a2 * ratio) & m).sum() / m.sum()
  np.testing.assert_allclose(float(metrics["clip_frac"]), clip_frac, rtol=1e-5)
  assert 0 < float(metrics["clip_frac"]) < 1
  np.testing.assert_allclose(float(metrics["ppo_kl"]), (old - logp)[m].mean(), rtol=1e-4, atol=1e-6)
  assert float(metrics["num_tokens"]) == m.sum()
  if dual_clip is not None:
    assert float(metrics["clip_frac_lower"]) > 0
  for k in ("pg_loss", "kl", "clip_frac", "kl_loss", "ppo_kl", "ratio_mean"):
    assert metrics[k].dtype == jnp.float32


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
def test_loss_gradient(seed, loss_agg, dual_clip):
  logp, old, ref, adv, mask, weights = random_loss_inputs(seed, s=4, n=8)
  if dual_clip is not None:
    old = old.copy()
    old[1] = logp[1] - 2.0
    adv = adv.copy()
    adv[1] = -1.0
  f = lambda lp: aepo.aepo_loss(lp, old, ref, adv, mask, weights, dual_clip=dual_clip, loss_agg=loss_agg)[0]
  g = np.asarray(jax.grad(f)(jnp.asarray(logp, jnp.float32)), np.float64)
  analytic = ref_grad(logp, old, ref, adv, mask, weights, dual_clip=dual_clip, loss_agg=loss_agg)
  np.testing.assert_allclose(g, analytic, rtol=1e-4, atol=1e-7)
  assert (g[~mask] == 0).all()
  # central finite differences of the float64 numpy reference
  h = 1e-6
  fd = np.zeros_like(logp)
  for i in range(logp.shape[0]):
    for t in range(logp.shape[1]):
      up, dn = logp.copy(), logp.copy()
      up[i, t] += h
      dn[i, t] -= h
      fd[i, t] = (ref_loss(up, old, ref, adv, mask, weights, dual_clip=dual_clip, loss_agg=loss_agg)[0]
                  - ref_loss(dn, old, ref, adv, mask, weights, dual_clip=dual_clip, loss_agg=loss_agg)[0]) / (2 * h)
  np.testing.assert_allclose(analytic, fd, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-7)


def test_per_token_advantages_and_per_traj_weights():
  logp, old, ref, adv, mask, weights = random_loss_inputs(4, per_token_adv=True)
  loss, _ = aepo.aepo_loss(logp, old, ref, adv, mask, weights)
  np.testing.assert_allclose(float(loss), ref_loss(logp, old, ref, adv, mask, weights)[0], rtol=1e-5)
  # [S] advantages equal the same values broadcast to [S, N]; [S] weights likewise
  adv1 = adv[:, 0]
  w1 = np.full(logp.shape[0], 0.03)
  a = aepo.aepo_loss(logp, old, ref, adv1, mask, w1)[0]
  b = aepo.aepo_loss(logp, old, ref, np.repeat(adv1[:, None], logp.shape[1], 1), mask,
                     np.full(logp.shape, 0.03))[0]
  np.testing.assert_allclose(float(a), float(b), rtol=1e-7)


def test_loss_hand_worked():
  # one token per case, A = 1: ratio 1.5 is clipped at 1.28; ratio 0.5 is not (A > 0 keeps min).
  logp = np.log(np.array([[1.5, 0.5]]))
  old = np.zeros((1, 2))
  mask = np.ones((1, 2), bool)
  loss, m = aepo.aepo_loss(logp, old, None, np.array([1.0]), mask, None)
  np.testing.assert_allclose(float(loss), (-1.28 - 0.5) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_frac"]), 0.5)
  assert float(m["kl"]) == 0.0
  # A = -1: ratio 0.5 is clipped at 0.8 (loss 0.8), ratio 1.5 is not (loss 1.5)
  loss, _ = aepo.aepo_loss(logp, old, None, np.array([-1.0]), mask, None)
  np.testing.assert_allclose(float(loss), (1.5 + 0.8) / 2, rtol=1e-6)
  # dual clip c = 1.2 caps the A < 0 loss at 1.2
  loss, m = aepo.aepo_loss(logp, old, None, np.array([-1.0]), mask, None, dual_clip=1.2)
  np.testing.assert_allclose(float(loss), (1.2 + 0.8) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(m["clip_frac_lower"]), 0.5)
  # KL term: weight 0.1, r = 1 -> k3 = e - 2
  loss, m = aepo.aepo_loss(np.zeros((1, 1)), np.zeros((1, 1)), np.ones((1, 1)), np.array([0.0]),
                           np.ones((1, 1), bool), np.full((1, 1), 0.1))
  np.testing.assert_allclose(float(loss), 0.1 * (math.e - 2), rtol=1e-6)
  np.testing.assert_allclose(float(m["kl"]), math.e - 2, rtol=1e-6)


def test_empty_mask_and_errors():
  z = np.zeros((2, 3))
  loss, m = aepo.aepo_loss(z, z, z, np.ones(2), np.zeros((2, 3), bool), z, loss_agg="seq_mean_token_mean")
  assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())
  with pytest.raises(ValueError, match="loss_agg"):
    aepo.aepo_loss(z, z, z, np.ones(2), np.ones((2, 3), bool), z, loss_agg="sum")
  with pytest.raises(ValueError, match="weights"):
    aepo.aepo_loss(z, z, z, np.ones(2), np.ones((2, 3), bool), None)


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_shares_add_up_to_the_mini_batch_loss(loss_agg):
  """The updater's weights: a micro-batch's share of the loss tokens (token_mean) or of the sequences with a
  loss token (seq_mean_token_mean) times its loss sums to the loss of the whole mini-batch."""
  logp, old, ref, adv, mask, weights = random_loss_inputs(1)
  whole = float(aepo.aepo_loss(logp, old, ref, adv, mask, weights, loss_agg=loss_agg)[0])
  parts = 0.0
  for sl in (slice(0, 3), slice(3, None)):
    share = (mask[sl].sum() / mask.sum() if loss_agg == "token_mean"
             else mask[sl].any(-1).sum() / mask.any(-1).sum())
    parts += share * float(aepo.aepo_loss(logp[sl], old[sl], ref[sl], adv[sl], mask[sl], weights[sl],
                                          loss_agg=loss_agg)[0])
  np.testing.assert_allclose(parts, whole, rtol=1e-5)


def test_loss_jits_float32_and_full_step():
  """The whole AEPO update math composes under one jit, with float32 inputs, and matches eager."""
  rng = np.random.default_rng(3)
  s, n, w = 16, 20, 4
  entropy = rng.gamma(1.5, 0.6, size=(s, n)).astype(np.float32)
  length = rng.integers(5, n + 1, size=s)
  mask = np.arange(n)[None, :] < length[:, None]
  window_valid = np.arange(n)[None, :] + w - 1 < length[:, None]
  window_entropy = np.stack([np.convolve(entropy[i], np.ones(w) / w, "full")[w - 1:] for i in range(s)])
  window_entropy = np.where(window_valid, window_entropy, 0).astype(np.float32)
  gid = np.repeat(np.arange(4), 4)
  acc = (rng.random(s) < 0.5).astype(np.float32)
  logp, old, ref = (np.log(rng.uniform(0.1, 0.9, size=(s, n))).astype(np.float32) for _ in range(3))

  def step(logp, old, ref, entropy, mask, window_entropy, window_valid, acc, gid):
    tau = aepo.entropy_threshold(entropy, mask)
    n_he = aepo.hwe_counts(window_entropy, window_valid, tau)
    marks = aepo.hwe_marks(window_entropy, window_valid, tau)
    bins = aepo.difficulty_bins(acc, gid)
    reward, _ = aepo.hierarchical_reward(acc, n_he, bins)
    adv = aepo.grpo_advantages(reward, gid)
    keep = aepo.group_filter_mask(acc, gid)
    weights = aepo.kl_weights(bins, aepo.hwe_window_mask(marks, w), 1e-2 * BETA_SCALE, 0.5)
    grad_fn = jax.value_and_grad(aepo.aepo_loss, has_aux=True)
    (loss, metrics), g = grad_fn(logp, old, ref, adv, mask & keep[:, None], weights)
    return loss, metrics, g

  args = (logp, old, ref, entropy, mask, window_entropy, window_valid, acc, gid)
  eager = step(*args)
  jitted = jax.jit(step)(*args)
  assert jitted[0].dtype == jnp.float32 and jitted[2].dtype == jnp.float32
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert np.isfinite(float(jitted[0]))
  lowered = jax.jit(aepo.aepo_loss, static_argnames=("loss_agg",)).lower(
      logp, old, ref, np.zeros(s, np.float32), mask, np.zeros((s, n), np.float32), loss_agg="seq_mean_token_mean")
  assert "f64" not in lowered.as_text()
