"""The rollout engine against transformers' greedy generate and a teacher-forced recomputation."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

import hf_reference as R
from ares_jax import models, sampling
from ares_jax import sharding

EOS = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return R.saved_and_loaded(str(tmp_path_factory.mktemp("sampler")), seed=5)


def _batch():
  return R.build_batch([[3, "img", 5], [9], [2, "img", 1, "img", 4]],
                       R.random_images([(56, 84), (84, 56), (112, 56)], seed=2), "left", seed=3)


def _hf_greedy(model, batch, n_new):
  ids = torch.tensor(batch["input_ids"])
  kw = dict(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]))
  if "pixel_values" in batch:
    kw.update(pixel_values=torch.tensor(batch["pixel_values"]), image_grid_thw=torch.tensor(batch["image_grid_thw"]),
              mm_token_type_ids=(ids == R.IMAGE).int())
  with torch.no_grad():
    out = model.generate(**kw, max_new_tokens=n_new, do_sample=False, eos_token_id=EOS, pad_token_id=2)
  return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("with_images", [True, False])
def test_greedy_equals_transformers_generate(tiny, with_images):
  model, _, config, params = tiny
  batch = _batch() if with_images else R.build_batch([[4], [11], [7]], [], "left", seed=4)
  # transformers' generate may emit vision placeholders; ours suppresses them unless told not to
  sc = sampling.SamplingConfig(max_new_tokens=16, temperature=0.0, eos_ids=(EOS,), pad_id=2, suppress_ids=())
  r = sampling.generate(config, params, batch, sc, jax.random.key(0))
  ref = _hf_greedy(model, batch, 16)
  for i in range(len(ref)):
    n = int(r.length[i])
    np.testing.assert_array_equal(r.tokens[i, :n], ref[i, :n])
    if n < 16:  # stopped on EOS exactly where transformers did
      assert r.tokens[i, n - 1] == EOS and (ref[i, n:] == 2).all()


def _teacher_forced(config, params, batch, r, temperature):
  """log softmax(logits / T) of each generated token and the full-vocabulary entropy, via forward."""
  ids, mask = batch["input_ids"], batch["attention_mask"]
  logp_all, ent_all = np.zeros(r.tokens.shape, np.float32), np.zeros(r.tokens.shape, np.float32)
  for s in np.flatnonzero(r.used):
    g, n = int(r.prompt_index[s]), int(r.length[s])
    seq = np.concatenate([ids[g][mask[g] > 0], r.tokens[s, :n]])[None]
    has_image = (ids[g] == R.IMAGE).any()
    pv, grid = None, None
    assert not np.isin(r.tokens[s, :n], [R.IMAGE, R.VIDEO, R.V_START, R.V_END]).any()
    if has_image:  # the images of row g: rows hold their images in order, one vision_start each
      n_img = [int((ids[k] == R.V_START).sum()) for k in range(len(ids))]
      first = sum(n_img[:g])
      counts = batch["image_grid_thw"].prod(-1)
      grid = batch["image_grid_thw"][first:first + n_img[g]]
      start = int(counts[:first].sum())
      pv = batch["pixel_values"][start:start + int(grid.prod(-1).sum())]
    logits = np.asarray(models.forward(config, params, seq, np.ones_like(seq), pv, grid))[0]
    t0 = seq.shape[1] - n - 1
    z = logits[t0:t0 + n].astype(np.float64) / (temperature or 1.0)
    lp = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    logp_all[s, :n] = lp[np.arange(n), r.tokens[s, :n]]
    ent_all[s, :n] = -(np.exp(lp) * lp).sum(-1)
  return logp_all, ent_all


def test_sampled_logprobs_and_entropy_equal_teacher_forcing(tiny):
  _, _, config, params = tiny
  batch = _batch()
  sc = sampling.SamplingConfig(max_new_tokens=12, temperature=0.8, top_p=0.95, n=2, eos_ids=(EOS,))
  r = sampling.generate(config, params, batch, sc, jax.random.key(1))
  lp, ent = _teacher_forced(config, params, batch, r, 0.8)
  m = r.mask
  assert np.abs(r.logprobs - lp)[m].max() <= 1e-4
  assert np.abs(r.entropy - ent)[m].max() <= 1e-4
  assert (r.logprobs[~m] == 0).all() and (r.tokens[~m] == sc.pad_id).all()


def test_window_entropy_and_marks(tiny):
  _, _, config, params = tiny
  w, tau = 3, 4.5
  sc = sampling.SamplingConfig(max_new_tokens=14, temperature=1.0, n=3, window=w, max_branches=0)
  r = sampling.generate(config, params, _batch(), sc, jax.random.key(2), tau_high=tau)
  for s in range(len(r.length)):
    n = int(r.length[s])
    valid = np.arange(r.tokens.shape[1]) + w <= n
    np.testing.assert_array_equal(r.window_valid[s], valid)
    ref = np.array([r.entropy[s, t:t + w].mean() for t in range(n - w + 1)])
    np.testing.assert_allclose(r.window_entropy[s, :n - w + 1], ref, atol=1e-6)
    np.testing.assert_array_equal(r.hwe[s], valid & (r.window_entropy[s] >= tau))
  assert r.hwe.any() and not r.hwe.all()
  assert (r.parent == -1).all()  # max_branches=0: marks but no forks


def test_budget_shorter_than_window_has_no_windows(tiny):
  _, _, config, params = tiny
  sc = sampling.SamplingConfig(max_new_tokens=2, temperature=1.0, n=2, window=4, max_branches=2)
  r = sampling.generate(config, params, _batch(), sc, jax.random.key(0), tau_high=0.0)
  assert r.tokens.shape[1] == 2 and (r.length[r.length > 0] <= 2).all()
  assert not r.window_valid.any() and not r.hwe.any() and (r.parent == -1).all()


def test_branch_invariants(tiny):
  _, _, config, params = tiny
  batch = _batch()
  w, n, b = 2, 4, 3
  sc = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, n=n, window=w, max_branches=b)
  r = sampling.generate(config, params, batch, sc, jax.random.key(3), tau_high=4.0)
  kids = np.flatnonzero(r.parent >= 0)
  assert len(kids) > 0, "tau chosen so that forks happen"
  group = n + b
  assert r.tokens.shape[0] == len(batch["input_ids"]) * group
  for c in kids:
    p, t = int(r.parent[c]), int(r.fork_pos[c])
    assert r.prompt_index[c] == r.prompt_index[p] and c % group >= n
    np.testing.assert_array_equal(r.tokens[c, :t], r.tokens[p, :t])
    np.testing.assert_array_equal(r.logprobs[c, :t], r.logprobs[p, :t])
    assert r.length[c] > t
    # the parent's window starting at the fork position was an HWE window
    assert r.hwe[p, t] or (r.parent[p] >= 0 and t < r.fork_pos[p])
  for g in range(len(batch["input_ids"])):
    in_group = kids[r.prompt_index[kids] == g]
    assert len(in_group) <= b
    np.testing.assert_array_equal(np.sort(in_group % group), np.arange(n, n + len(in_group)))  # filled in order
  for p in np.unique(r.parent[kids]):  # one fork per window: a parent's forks are >= w apart
    pos = np.sort(r.fork_pos[kids[r.parent[kids] == p]])
    assert (np.diff(pos) >= w).all()
  unused = (r.parent < 0) & (np.arange(len(r.length)) % group >= n)
  assert (r.length[unused] == 0).all()
  # children's own tokens are scored exactly like any trajectory (their cache rows were copied right)
  lp, ent = _teacher_forced(config, params, batch, r, 1.0)
  assert np.abs(r.logprobs - lp)[r.mask].max() <= 1e-4
  assert np.abs(r.entropy - ent)[r.mask].max() <= 1e-4


def test_restrict_support_matches_numpy():
  """top-k first, then the nucleus of the renormalised remainder (transformers' warper order)."""
  rng = np.random.default_rng(0)
  lp = np.asarray(sampling.scaled_log_probs(rng.normal(size=(4, 50)).astype(np.float32) * 3, 1.0))
  for k, p in [(5, 1.0), (0, 0.7), (8, 0.5), (0, 1.0), (1, 0.01)]:
    out = np.asarray(sampling.restrict_support(lp, k, p)) > np.finfo(np.float32).min
    for row, kept in zip(lp, out):
      order = np.argsort(-row)[:k or 50]
      probs = np.exp(row[order]) / np.exp(row[order]).sum()
      size = int(np.searchsorted(np.cumsum(probs), p) + 1) if p < 1 else len(order)
      expect = np.zeros(50, bool)
      expect[order[:size]] = True
      np.testing.assert_array_equal(kept, expect)


def test_top_k_one_is_greedy_and_keys_are_deterministic(tiny):
  _, _, config, params = tiny
  batch = _batch()
  greedy = sampling.generate(config, params, batch, sampling.SamplingConfig(max_new_tokens=8, temperature=0.0),
                             jax.random.key(0))
  top1 = sampling.generate(config, params, batch,
                           sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1), jax.random.key(9))
  np.testing.assert_array_equal(top1.tokens, greedy.tokens)
  sc = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=2)
  a = sampling.generate(config, params, batch, sc, jax.random.key(4))
  b = sampling.generate(config, params, batch, sc, jax.random.key(4))
  c = sampling.generate(config, params, batch, sc, jax.random.key(5))
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)
  assert not np.array_equal(a.tokens[0], a.tokens[1])  # each sample has its own stream


def test_sharded_sampler_equals_single_device(tiny):
  _, path, config, params = tiny
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
  _, params8 = models.load_hf(path, mesh=mesh)
  batch = R.build_batch([[3, "img", 5], [9]], R.random_images([(56, 84)]), "left")
  sc = sampling.SamplingConfig(max_new_tokens=10, temperature=1.0, n=2, window=2, max_branches=1)
  one = sampling.generate(config, params, batch, sc, jax.random.key(6), tau_high=4.0)
  eight = sampling.generate(config, params8, batch, sc, jax.random.key(6), tau_high=4.0)
  np.testing.assert_array_equal(eight.tokens, one.tokens)
  np.testing.assert_array_equal(eight.parent, one.parent)
  np.testing.assert_allclose(eight.logprobs, one.logprobs, atol=1e-5)


def test_bfloat16_kv_cache_stays_close(tiny):
  _, _, config, params = tiny
  batch = _batch()
  sc = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, n=2, eos_ids=(EOS,))
  f32 = sampling.generate(config, params, batch, sc, jax.random.key(7))
  bf16 = sampling.generate(config, params, batch, dataclasses.replace(sc, cache_dtype="bfloat16"), jax.random.key(7))
  # the same key draws the same tokens unless a bf16 rounding flips a sample; compare where they agree
  agree = np.cumprod(bf16.tokens == f32.tokens, axis=1).astype(bool) & f32.mask & bf16.mask
  assert agree[:, 0].all() and agree.mean() > 0.5
  assert np.abs(bf16.logprobs - f32.logprobs)[agree].max() < 0.05
  assert np.abs(bf16.entropy - f32.entropy)[agree].max() < 0.05


def test_sample_stage_prints_marked_answers(capsys):
  from ares_jax.stages import sample as sample_stage
  from tiny_configs import load_config
  c = load_config("tiny.py")
  c.mesh.fsdp = 1
  c.sample.num_prompts = 2
  c.rollout.n = 2
  c.rollout.max_branches = 2
  c.rollout.max_response_length = 16
  c.aepo.window = 2
  out = sample_stage.run(c)
  text = capsys.readouterr().out
  assert "tau_high from a warm-up batch" in text and "[prompt 0 slot 0 root]" in text and "N_HE" in text
  assert len(out["answers"]) >= 4 and all(a["length"] > 0 for a in out["answers"])
  assert sum(a["n_he"] for a in out["answers"]) > 0


@pytest.mark.parametrize("chunk", [1, 2])
def test_chunked_rollouts_equal_one_call(tiny, chunk):
  """Random streams are keyed by (prompt, slot, position): any chunking samples the same rollouts,
  branches included (prompts with images of different sizes; the last chunk is filled up)."""
  _, _, config, params = tiny
  batch = _batch()
  sc = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, n=3, window=2, max_branches=2)
  one = sampling.generate(config, params, batch, sc, jax.random.key(3), tau_high=4.0)
  chunked = sampling.generate(config, params, batch, dataclasses.replace(sc, chunk_prompts=chunk),
                              jax.random.key(3), tau_high=4.0)
  assert (one.parent >= 0).any(), "tau chosen so that forks happen"
  for field in ("tokens", "length", "prompt_index", "parent", "fork_pos", "hwe", "window_valid"):
    np.testing.assert_array_equal(getattr(chunked, field), getattr(one, field), err_msg=field)
  for field in ("logprobs", "entropy", "window_entropy"):
    np.testing.assert_allclose(getattr(chunked, field), getattr(one, field), atol=1e-5, err_msg=field)
