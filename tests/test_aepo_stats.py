"""aepo entropy statistics (docs/design.md §5.2, §5.3) and difficulty bins (§5.5) against loop-based numpy
re-derivations written from the spec text, plus hand-worked cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax import aepo

SEEDS = (0, 1, 2, 3)


# ---------------------------------------------------------------- numpy references (from the spec)

def ref_threshold(entropy, mask, q):
  per_traj = []
  for s in range(entropy.shape[0]):
    vals = [float(entropy[s, t]) for t in range(entropy.shape[1]) if mask[s, t]]
    if vals:
      per_traj.append(np.quantile(np.array(vals), q))  # numpy default method: 'linear'
  return float(np.mean(per_traj)) if per_traj else np.inf


def ref_counts(window_entropy, valid, tau):
  out = np.zeros(window_entropy.shape[0], np.int64)
  for s in range(window_entropy.shape[0]):
    for t in range(window_entropy.shape[1]):
      if valid[s, t] and window_entropy[s, t] >= tau:
        out[s] += 1
  return out


def ref_window_mask(hwe, w):
  out = np.zeros(hwe.shape, bool)
  for s in range(hwe.shape[0]):
    for t in range(hwe.shape[1]):
      if hwe[s, t]:
        out[s, t:t + w] = True
  return out


def ref_bins(accuracy, group_ids, easy=2 / 3, hard=1 / 3):
  out = np.zeros(len(accuracy), np.int64)
  for g in set(group_ids.tolist()):
    idx = [i for i in range(len(accuracy)) if group_ids[i] == g]
    p = sum(accuracy[i] for i in idx) / len(idx)
    out[idx] = 0 if p >= easy else (1 if p >= hard else 2)
  return out


def random_rollout(seed, s=12, n=24, w=4):
  rng = np.random.default_rng(seed)
  entropy = rng.gamma(1.5, 0.6, size=(s, n))
  length = rng.integers(0, n + 1, size=s)
  length[0] = 0  # an unused slot
  length[1] = 1  # a single token
  mask = np.arange(n)[None, :] < length[:, None]
  window_valid = np.arange(n)[None, :] + w - 1 < length[:, None]
  window_entropy = np.zeros((s, n))
  for i in range(s):
    for t in range(n):
      if window_valid[i, t]:
        window_entropy[i, t] = entropy[i, t:t + w].mean()
  return entropy, mask, window_entropy, window_valid


# ---------------------------------------------------------------- threshold

@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("q", [0.95, 0.5, 0.0, 1.0])
def test_threshold_matches_numpy(seed, q):
  entropy, mask, _, _ = random_rollout(seed)
  got = aepo.entropy_threshold(entropy, mask, q)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), ref_threshold(entropy, mask, q), rtol=1e-5)
  quants, has = aepo.trajectory_quantiles(entropy, mask, q)
  for s in range(entropy.shape[0]):
    assert bool(has[s]) == bool(mask[s].any())
    if mask[s].any():
      np.testing.assert_allclose(float(quants[s]), np.quantile(entropy[s][mask[s]], q), rtol=1e-5)


def test_threshold_hand_worked_linear_interpolation():
  entropy = np.array([[0.0, 1, 2, 3, 4, 9], [20.0, 10, 0, 0, 0, 0], [5.0, 5, 5, 5, 5, 5]])
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  # row 0: sorted [0..4], index 0.95 * 4 = 3.8 -> 3.8; row 1: [10, 20], 0.95 -> 19.5; row 2 left out.
  np.testing.assert_allclose(float(aepo.entropy_threshold(entropy, mask)), (3.8 + 19.5) / 2, rtol=1e-6)
  np.testing.assert_allclose(float(aepo.entropy_threshold(entropy, mask, 0.5)), (2.0 + 15.0) / 2, rtol=1e-6)
  # no valid token anywhere: +inf (nothing is marked)
  assert np.isinf(float(aepo.entropy_threshold(entropy, np.zeros_like(mask))))


def test_threshold_jits_and_ema():
  entropy, mask, _, _ = random_rollout(5)
  f = jax.jit(aepo.entropy_threshold, static_argnames="quantile")
  np.testing.assert_allclose(float(f(entropy, mask, quantile=0.95)), ref_threshold(entropy, mask, 0.95), rtol=1e-5)
  np.testing.assert_allclose(float(aepo.ema_threshold(1.0, 3.0, 0.9)), 0.9 * 1.0 + 0.1 * 3.0, rtol=1e-6)
  assert float(aepo.ema_threshold(jnp.nan, 3.0, 0.9)) == 3.0  # first batch
  assert float(aepo.ema_threshold(jnp.inf, 3.0, 0.9)) == 3.0
  assert float(aepo.ema_threshold(2.0, jnp.inf, 0.9)) == 2.0  # empty batch keeps the previous value
  assert float(jax.jit(aepo.ema_threshold)(1.0, 3.0, 0.5)) == 2.0


# ---------------------------------------------------------------- HWE counts and windows

@pytest.mark.parametrize("seed", SEEDS)
def test_hwe_counts_match_numpy(seed):
  entropy, mask, window_entropy, window_valid = random_rollout(seed)
  tau = ref_threshold(entropy, mask, 0.95)
  got = aepo.hwe_counts(window_entropy, window_valid, tau)
  assert got.dtype == jnp.int32 and got.shape == (entropy.shape[0],)
  np.testing.assert_array_equal(np.asarray(got), ref_counts(window_entropy, window_valid, tau))
  for t in (0.5, 1.0, 1.5):
    np.testing.assert_array_equal(np.asarray(aepo.hwe_counts(window_entropy, window_valid, t)),
                                  ref_counts(window_entropy, window_valid, t))
  # invalid windows never count, whatever their value
  big = np.where(window_valid, window_entropy, 1e9)
  np.testing.assert_array_equal(np.asarray(aepo.hwe_counts(big, window_valid, 1.0)),
                                ref_counts(window_entropy, window_valid, 1.0))


def test_hwe_counts_threshold_is_inclusive_and_position_mask():
  we = np.array([[1.0, 2.0, 3.0, 2.0]])
  valid = np.array([[True, True, True, False]])
  assert int(aepo.hwe_counts(we, valid, 2.0)[0]) == 2  # Hbar >= tau, the invalid 2.0 is ignored
  pos = np.array([[True, False, True, True]])  # e.g. trigger-word positions
  assert int(aepo.hwe_counts(we, valid, 2.0, position_mask=pos)[0]) == 1
  np.testing.assert_array_equal(np.asarray(aepo.hwe_marks(we, valid, 2.0)), [[False, True, True, False]])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("w", [1, 3, 4, 8])
def test_window_mask_matches_numpy(seed, w):
  rng = np.random.default_rng(seed)
  hwe = rng.random((6, 20)) < 0.12
  got = aepo.hwe_window_mask(hwe, w)
  assert got.dtype == jnp.bool_ and got.shape == hwe.shape
  np.testing.assert_array_equal(np.asarray(got), ref_window_mask(hwe, w))
  # traced window size under jit
  np.testing.assert_array_equal(np.asarray(jax.jit(aepo.hwe_window_mask)(hwe, w)), ref_window_mask(hwe, w))


def test_window_mask_hand_worked():
  hwe = np.zeros((2, 8), bool)
  hwe[0, 1] = True
  hwe[1, [0, 2, 6]] = True
  got = np.asarray(aepo.hwe_window_mask(hwe, 3)).astype(int)
  np.testing.assert_array_equal(got[0], [0, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(got[1], [1, 1, 1, 1, 1, 0, 1, 1])  # union; last window cut at N


def test_pipeline_from_rollout_fields():
  """tau -> marks at window starts (what the sampler stores as `hwe`) -> counts and W_valid agree."""
  entropy, mask, window_entropy, window_valid = random_rollout(7, w=4)
  tau = aepo.entropy_threshold(entropy, mask)
  marks = aepo.hwe_marks(window_entropy, window_valid, tau)
  np.testing.assert_array_equal(np.asarray(marks).sum(-1), np.asarray(aepo.hwe_counts(window_entropy, window_valid, tau)))
  wm = np.asarray(aepo.hwe_window_mask(marks, 4))
  assert not (wm & ~mask).any()  # marked windows are complete, so W_valid stays inside the response


# ---------------------------------------------------------------- difficulty bins

def test_bins_hand_worked_n8():
  correct = np.arange(9)  # 0..8 correct out of 8 in nine groups
  acc = np.concatenate([(np.arange(8) < c).astype(float) for c in correct])
  gid = np.repeat(np.arange(9), 8)
  bins = np.asarray(aepo.difficulty_bins(acc, gid)).reshape(9, 8)
  assert (bins == bins[:, :1]).all()
  np.testing.assert_array_equal(bins[:, 0], [2, 2, 2, 1, 1, 1, 0, 0, 0])  # <=2 hard, 3-5 medium, >=6 easy


def test_bins_hand_worked_exact_thirds():
  acc = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0], float)
  gid = np.array([5, 5, 5, 9, 9, 9, 2, 2, 2])
  np.testing.assert_array_equal(np.asarray(aepo.difficulty_bins(acc, gid)), [0, 0, 0, 1, 1, 1, 2, 2, 2])
  # custom thresholds
  np.testing.assert_array_equal(np.asarray(aepo.difficulty_bins(acc, gid, easy=0.9, hard=0.5)),
                                [1, 1, 1, 2, 2, 2, 2, 2, 2])


@pytest.mark.parametrize("seed", SEEDS)
def test_bins_match_numpy_arbitrary_group_ids(seed):
  rng = np.random.default_rng(seed)
  s = 40
  raw = rng.integers(0, 9, size=s)
  gid = raw * 1000 - 4321  # arbitrary, negative, non-contiguous, unsorted
  acc = (rng.random(s) < rng.random()).astype(float)
  want = ref_bins(acc, gid)
  np.testing.assert_array_equal(np.asarray(aepo.difficulty_bins(acc, gid)), want)
  np.testing.assert_array_equal(np.asarray(jax.jit(aepo.difficulty_bins)(acc, gid)), want)
  perm = rng.permutation(s)
  np.testing.assert_array_equal(np.asarray(aepo.difficulty_bins(acc[perm], gid[perm])), want[perm])


def test_bins_traj_mask_leaves_slots_out():
  rng = np.random.default_rng(11)
  acc = (rng.random(24) < 0.5).astype(float)
  gid = np.repeat(np.arange(3), 8)
  keep = rng.random(24) < 0.7
  keep[::8] = True
  got = np.asarray(aepo.difficulty_bins(acc, gid, traj_mask=keep))
  np.testing.assert_array_equal(got[keep], ref_bins(acc[keep], gid[keep]))


def test_trigger_words_count_only_marked_windows_that_start_on_a_trigger_word():
  """docs/design.md §5.3's trigger_words mode: N_HE counts marked windows whose first token is a trigger word."""
  import types

  from ares_jax.data.tokenizer import tiny_tokenizer, word_token_table
  from ares_jax.aepo.step import trigger_positions

  tok = tiny_tokenizer()
  table = word_token_table(tok, ["So", "check"])
  so, check, other = tok.convert_tokens_to_ids("ĠSo"), tok.convert_tokens_to_ids("Check"), tok("x")["input_ids"][0]
  assert table[so] and table[check] and not table[other]
  tokens = np.array([[so, other, check, other], [other, other, so, other]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  at = trigger_positions(types.SimpleNamespace(tokens=tokens, mask=mask), table)
  np.testing.assert_array_equal(at, [[1, 0, 1, 0], [0, 0, 0, 0]])  # past the length counts nothing
  we = np.full((2, 4), 5.0, np.float32)
  counts = aepo.hwe_counts(we, np.ones((2, 4), bool), 1.0, at)
  np.testing.assert_array_equal(counts, [2, 0])
  assert trigger_positions(types.SimpleNamespace(tokens=tokens, mask=mask), None) is None
  with pytest.raises(ValueError, match="trigger_words"):
    word_token_table(tok, [" "])
