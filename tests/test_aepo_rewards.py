"""aepo hierarchical reward (docs/design.md §5.6), ares_release shaping, GRPO advantages and the DAPO
filter (§5.8) against loop-based numpy re-derivations written from the spec text, plus
hand-worked cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax import aepo
from ares_jax.aepo import rewards

SEEDS = (0, 1, 2, 3)
EPS = 1e-6


# ---------------------------------------------------------------- numpy references (from the spec)

def ref_hierarchical(acc, n_he, bins, mode, max_penalty=1.0, ema_prev=None, decay=0.9):
  """Returns (reward, target[3], lambda[3], mu[3], var[3], new_ema[3] or None)."""
  s = len(acc)
  reward = np.zeros(s)
  target, lam, mu, var = np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3)
  new_ema = None if ema_prev is None else np.array(ema_prev, float)
  if mode == "ema" and new_ema is None:
    new_ema = np.full(3, np.nan)
  prev = np.full(3, np.nan) if ema_prev is None else np.asarray(ema_prev, float)
  for d in range(3):
    members = [i for i in range(s) if bins[i] == d]
    vals = [float(n_he[i]) for i in members]
    if vals:
      mu[d] = sum(vals) / len(vals)
      var[d] = sum((v - mu[d]) ** 2 for v in vals) / len(vals)
    if mode == "correct_mean":
      cvals = [float(n_he[i]) for i in members if acc[i] > 0]
      target[d] = sum(cvals) / len(cvals) if cvals else mu[d]
    elif mode == "batch_mean":
      target[d] = mu[d]
    elif mode == "ema":
      target[d] = prev[d] if np.isfinite(prev[d]) else mu[d]
      if vals:
        new_ema[d] = decay * prev[d] + (1 - decay) * mu[d] if np.isfinite(prev[d]) else mu[d]
    if d == 0:
      lam[d] = max(0.0, mu[d] - target[d]) / (var[d] + EPS)
    elif d == 1:
      lam[d] = abs(mu[d] - target[d]) / (var[d] + EPS)
    else:
      lam[d] = max(0.0, target[d] - mu[d]) / (var[d] + EPS)
  for i in range(s):
    d = bins[i]
    delta = n_he[i] - target[d]
    g = max(0.0, delta) if d == 0 else (abs(delta) if d == 1 else max(0.0, -delta))
    reward[i] = acc[i] - (1.0 if acc[i] == 0 else 0.0) * min(max_penalty, lam[d] * g)
  return reward, target, lam, mu, var, new_ema


def ref_release_one(correct, n, d, target, alpha=0.5):
  f, kappa, temp = (0.15, 0.25, 0.35)[d], (2, 3, 4)[d], (2, 2.5, 3)[d]
  cap = alpha * (1, 1, 1.2)[d]
  margin = max(1.0, f * max(target, 1))

  def huber(x):
    x = max(x, 0.0)
    return x * x / (2 * kappa) if x <= kappa else x - kappa / 2

  def sig(x):
    return 1 / (1 + math.exp(-x / temp))

  delta = n - target
  if d == 0 and correct:
    return -min(cap, huber(max(delta - margin, 0)) / (margin + kappa) * cap)
  if d == 1 and correct:
    return -min(cap, huber(max(abs(delta) - margin, 0)) / (margin + kappa) * cap)
  if d in (0, 1):
    return sig(max(delta - margin, 0)) * cap * (0.6 if d == 0 else 0.8)
  if correct:
    if delta >= -margin:
      return sig(delta + margin) * cap
    return -min(cap, 0.5 * huber(-delta - margin) / (margin + kappa) * cap)
  return sig(max(delta - margin, 0)) * cap


def ref_grpo(reward, gid):
  adv = np.zeros(len(reward))
  for g in set(gid.tolist()):
    idx = [i for i in range(len(reward)) if gid[i] == g]
    if len(idx) == 1:
      continue
    r = np.array([reward[i] for i in idx])
    adv[idx] = (r - r.mean()) / (np.std(r, ddof=1) + EPS)
  return adv


def random_batch(seed, prompts=6, n=8):
  rng = np.random.default_rng(seed)
  s = prompts * n
  gid = np.repeat(rng.permutation(100)[:prompts] - 50, n)
  p = rng.random(prompts)
  acc = (rng.random(s) < np.repeat(p, n)).astype(float)
  n_he = rng.integers(0, 40, size=s)
  bins = rng.integers(0, 3, size=s)
  return acc, n_he, bins, gid


def check_stats(stats, target, lam, mu, var):
  np.testing.assert_allclose(np.asarray(stats["mu"]), mu, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["var"]), var, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(stats["target"]), target, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["lambda"]), lam, rtol=1e-4, atol=1e-6)
  for k in ("mu", "var", "target", "lambda"):
    assert stats[k].shape == (3,) and stats[k].dtype == jnp.float32


# ---------------------------------------------------------------- hierarchical reward

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("mode", ["correct_mean", "batch_mean"])
def test_reward_matches_numpy(seed, mode):
  acc, n_he, bins, _ = random_batch(seed)
  reward, stats = aepo.hierarchical_reward(acc, n_he, bins, target_mode=mode)
  r_ref, target, lam, mu, var, _ = ref_hierarchical(acc, n_he, bins, mode)
  assert reward.dtype == jnp.float32 and reward.shape == acc.shape
  np.testing.assert_allclose(np.asarray(reward), r_ref, rtol=1e-5, atol=1e-6)
  check_stats(stats, target, lam, mu, var)
  np.testing.assert_allclose(np.asarray(stats["entropy_reward"]), r_ref - acc, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_reward_small_variance_and_penalty_clipping(seed):
  """Narrow N_HE spread makes lambda * g large: penalties clip at max_penalty, R stays in [-1, 1]."""
  rng = np.random.default_rng(100 + seed)
  acc = (rng.random(48) < 0.5).astype(float)
  n_he = rng.integers(3, 6, size=48)
  bins = rng.integers(0, 3, size=48)
  for mp in (1.0, 0.25):
    reward, _ = aepo.hierarchical_reward(acc, n_he, bins, max_penalty=mp)
    r_ref = ref_hierarchical(acc, n_he, bins, "correct_mean", max_penalty=mp)[0]
    np.testing.assert_allclose(np.asarray(reward), r_ref, rtol=1e-5, atol=1e-6)
    r = np.asarray(reward)
    assert r.min() >= -mp - 1e-6 and r.max() <= 1.0
    assert (r[acc == 1] == 1).all()  # correct answers are never penalised
  big = aepo.hierarchical_reward(acc, n_he * 1000, bins)[0]
  assert np.asarray(big).min() >= -1.0


def test_reward_hand_worked_hard_bin():
  # hard bin: correct N = 8, 2 (target 5); wrong N = 0, 10, 3; mu = 4.6, var = 14.24
  acc = np.array([1, 1, 0, 0, 0], float)
  n_he = np.array([8, 2, 0, 10, 3])
  bins = np.full(5, 2)
  reward, stats = aepo.hierarchical_reward(acc, n_he, bins)
  lam = 0.4 / (14.24 + EPS)
  np.testing.assert_allclose(float(stats["lambda"][2]), lam, rtol=1e-5)
  np.testing.assert_allclose(float(stats["target"][2]), 5.0)
  np.testing.assert_allclose(float(stats["mu"][2]), 4.6, rtol=1e-6)
  np.testing.assert_allclose(float(stats["var"][2]), 14.24, rtol=1e-5)
  # wrong with too few HWE (N=0, 3) are penalised; wrong with many (N=10) is not
  np.testing.assert_allclose(np.asarray(reward), [1, 1, -lam * 5, 0, -lam * 2], rtol=1e-5, atol=1e-7)


def test_reward_lambda_directions_per_bin():
  # three groups, one per bin; correct answers sit at N = 10, wrong ones elsewhere
  acc = np.array([1, 1, 0,   1, 0, 0,   1, 0, 0], float)
  bins = np.array([0, 0, 0,   1, 1, 1,   2, 2, 2])
  over = np.array([10, 10, 30,  10, 30, 40,  10, 30, 40])  # wrong ones explore more than correct ones
  under = np.array([10, 10, 1,  10, 1, 0,    10, 1, 0])    # wrong ones explore less
  r_over, s_over = aepo.hierarchical_reward(acc, over, bins)
  r_under, s_under = aepo.hierarchical_reward(acc, under, bins)
  lo, lu = np.asarray(s_over["lambda"]), np.asarray(s_under["lambda"])
  assert lo[0] > 0 and lo[1] > 0 and lo[2] == 0  # easy: penalise over-exploration; hard: not
  assert lu[0] == 0 and lu[1] > 0 and lu[2] > 0  # hard: penalise under-exploration; easy: not
  ro, ru = np.asarray(r_over), np.asarray(r_under)
  assert (ro[[2]] < 0).all() and (ro[[4, 5]] < 0).all() and (ro[[7, 8]] == 0).all()
  assert (ru[[2]] == 0).all() and (ru[[4, 5]] < 0).all() and (ru[[7, 8]] < 0).all()
  for r, n in ((r_over, over), (r_under, under)):
    np.testing.assert_allclose(np.asarray(r), ref_hierarchical(acc, n, bins, "correct_mean")[0], rtol=1e-5)


def test_batch_mean_is_plain_grpo_reward():
  acc, n_he, bins, _ = random_batch(9)
  reward, stats = aepo.hierarchical_reward(acc, n_he, bins, target_mode="batch_mean")
  np.testing.assert_array_equal(np.asarray(reward), acc)
  np.testing.assert_array_equal(np.asarray(stats["lambda"]), 0)


def test_correct_mean_without_correct_falls_back_to_mu():
  acc = np.zeros(4)
  n_he = np.array([1, 5, 2, 9])
  bins = np.array([2, 2, 0, 0])
  reward, stats = aepo.hierarchical_reward(acc, n_he, bins)
  np.testing.assert_allclose(np.asarray(stats["target"]), [5.5, 0, 3])
  np.testing.assert_array_equal(np.asarray(stats["lambda"]), 0)
  np.testing.assert_array_equal(np.asarray(reward), 0)
  # empty bin (medium): zeros, no nan
  assert np.isfinite(np.asarray(stats["var"])).all()


def test_ema_mode():
  acc, n_he, bins, _ = random_batch(4)
  bins = np.where(bins == 1, 0, bins)  # medium bin absent in step 1
  r1, s1 = aepo.hierarchical_reward(acc, n_he, bins, target_mode="ema")
  ref1 = ref_hierarchical(acc, n_he, bins, "ema", decay=rewards.TARGET_EMA_DECAY)
  np.testing.assert_allclose(np.asarray(r1), ref1[0], rtol=1e-5)  # first step: target = mu, lambda = 0
  np.testing.assert_array_equal(np.asarray(s1["lambda"]), 0)
  state = np.asarray(s1["ema_state"])
  assert np.isnan(state[1]) and np.allclose(state[[0, 2]], ref1[3][[0, 2]])
  acc2, n2, bins2, _ = random_batch(5)
  r2, s2 = aepo.hierarchical_reward(acc2, n2, bins2, target_mode="ema", ema_state=state)
  ref2 = ref_hierarchical(acc2, n2, bins2, "ema", ema_prev=state, decay=rewards.TARGET_EMA_DECAY)
  np.testing.assert_allclose(np.asarray(r2), ref2[0], rtol=1e-5, atol=1e-6)
  check_stats(s2, *ref2[1:5])
  np.testing.assert_allclose(np.asarray(s2["ema_state"]), ref2[5], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(s2["target"])[[0, 2]], state[[0, 2]], rtol=1e-6)
  # an absent bin keeps its previous EMA
  _, s3 = aepo.hierarchical_reward(acc2, n2, np.zeros_like(bins2), target_mode="ema", ema_state=state)
  np.testing.assert_array_equal(np.asarray(s3["ema_state"])[2], state[2])


def test_traj_mask_equals_subset():
  acc, n_he, bins, gid = random_batch(6)
  keep = np.random.default_rng(6).random(len(acc)) < 0.6
  for mode in ("correct_mean", "ares_release"):
    full, sf = aepo.hierarchical_reward(acc, n_he, bins, target_mode=mode, traj_mask=keep)
    sub, ss = aepo.hierarchical_reward(acc[keep], n_he[keep], bins[keep], target_mode=mode)
    np.testing.assert_allclose(np.asarray(full)[keep], np.asarray(sub), rtol=1e-6)
    assert (np.asarray(full)[~keep] == 0).all()
    np.testing.assert_allclose(np.asarray(sf["var"]), np.asarray(ss["var"]), rtol=1e-6)


def test_bad_mode_raises():
  with pytest.raises(ValueError, match="target_mode"):
    aepo.hierarchical_reward(np.ones(2), np.ones(2), np.zeros(2, int), target_mode="nope")


# ---------------------------------------------------------------- ares_release

def test_ares_release_appendix_case():
  """Easy, correct, N = 51, target 28: entropy reward -0.5, total 0.5 (paper appendix)."""
  shaping = aepo.ares_release_shaping(np.array([1.0]), np.array([51]), np.array([0]), np.array([28.0, 0, 0]))
  np.testing.assert_allclose(float(shaping[0]), -0.5, rtol=1e-6)
  # the same through hierarchical_reward: the easy bin's mean N_HE is (51 + 5 + 28) / 3 = 28
  reward, stats = aepo.hierarchical_reward(np.ones(3), np.array([51, 5, 28]), np.zeros(3, int),
                                           target_mode="ares_release")
  assert float(stats["target"][0]) == 28.0
  np.testing.assert_allclose(float(stats["entropy_reward"][0]), -0.5, rtol=1e-6)
  np.testing.assert_allclose(float(reward[0]), 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(reward)[1:], 1.0)  # under the target / on it: no penalty


@pytest.mark.parametrize("seed", SEEDS)
def test_ares_release_matches_numpy(seed):
  rng = np.random.default_rng(200 + seed)
  s = 90
  acc = (rng.random(s) < 0.5).astype(float)
  bins = np.repeat(np.arange(3), s // 3)
  target = rng.integers(0, 30, size=3).astype(float)
  n_he = np.clip(target[bins] + rng.integers(-25, 25, size=s), 0, None)  # covers every branch of 5.6
  got = np.asarray(aepo.ares_release_shaping(acc, n_he, bins, target))
  want = [ref_release_one(acc[i] > 0, float(n_he[i]), bins[i], target[bins[i]]) for i in range(s)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # through hierarchical_reward with target = round(mu_d)
  reward, stats = aepo.hierarchical_reward(acc, n_he, bins, target_mode="ares_release")
  mu = np.array([n_he[bins == d].mean() for d in range(3)])
  np.testing.assert_array_equal(np.asarray(stats["target"]), np.round(mu))
  want = [acc[i] + ref_release_one(acc[i] > 0, float(n_he[i]), bins[i], np.round(mu)[bins[i]]) for i in range(s)]
  np.testing.assert_allclose(np.asarray(reward), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- GRPO advantages and DAPO filter

@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_matches_numpy(seed):
  rng = np.random.default_rng(300 + seed)
  s = 40
  gid = rng.integers(-5, 12, size=s) * 7  # uneven, arbitrary group ids, some singletons likely
  gid[0] = 999  # a group of one
  reward = rng.normal(size=s)
  reward[gid == gid[1]] = 0.5  # a constant group
  adv = aepo.grpo_advantages(reward, gid)
  assert adv.dtype == jnp.float32
  want = ref_grpo(reward, gid)
  np.testing.assert_allclose(np.asarray(adv), want, rtol=1e-4, atol=1e-5)
  assert float(adv[0]) == 0.0
  np.testing.assert_array_equal(np.asarray(adv)[gid == gid[1]], 0.0)
  np.testing.assert_allclose(np.asarray(jax.jit(aepo.grpo_advantages)(reward, gid)), want, rtol=1e-4, atol=1e-5)


def test_grpo_hand_worked():
  adv = np.asarray(aepo.grpo_advantages(np.array([1.0, 0, 0, 0, 3.0]), np.array([4, 4, 4, 4, 8])))
  # group 4: mean 0.25, unbiased std 0.5; group 8 has one member
  np.testing.assert_allclose(adv, [0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS), -0.25 / (0.5 + EPS),
                                   -0.25 / (0.5 + EPS), 0.0], rtol=1e-6)
  # masking a member out changes its group's statistics and zeroes it
  adv_m = np.asarray(aepo.grpo_advantages(np.array([1.0, 0, 0, 0, 3.0]), np.array([4, 4, 4, 4, 8]),
                                          traj_mask=np.array([1, 1, 0, 0, 1], bool)))
  s = np.std([1.0, 0.0], ddof=1)
  np.testing.assert_allclose(adv_m, [0.5 / (s + EPS), -0.5 / (s + EPS), 0, 0, 0], rtol=1e-6)


def test_group_filter_mask():
  acc = np.array([1, 1, 1,  0, 0, 0,  1, 0, 0,  1], float)
  gid = np.array([3, 3, 3,  1, 1, 1,  7, 7, 7,  0])
  np.testing.assert_array_equal(np.asarray(aepo.group_filter_mask(acc, gid)),
                                [0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
  rng = np.random.default_rng(0)
  acc, _, _, gid = random_batch(1)
  want = np.array([0.01 <= acc[gid == g].mean() <= 0.99 for g in gid])
  np.testing.assert_array_equal(np.asarray(aepo.group_filter_mask(acc, gid)), want)
  keep = rng.random(len(acc)) < 0.5
  got = np.asarray(aepo.group_filter_mask(acc, gid, traj_mask=keep))
  assert not got[~keep].any()


def test_full_statistics_pipeline_jits():
  """bins -> reward -> advantages under one jit equals the eager result."""
  acc, n_he, _, gid = random_batch(8)

  def pipeline(acc, n_he, gid):
    bins = aepo.difficulty_bins(acc, gid)
    reward, stats = aepo.hierarchical_reward(acc, n_he, bins)
    return aepo.grpo_advantages(reward, gid), aepo.group_filter_mask(acc, gid), stats

  eager = pipeline(acc, n_he, gid)
  jitted = jax.jit(pipeline)(acc, n_he, gid)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
