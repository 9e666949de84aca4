"""The paged rollout engine against the dense one (same seed: same rollouts) and against numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference as R
from ares_jax import models, sampling, sharding
from ares_jax.sampling import paged, refill

EXACT = ("tokens", "length", "prompt_index", "parent", "fork_pos", "hwe", "window_valid")
CLOSE = ("logprobs", "entropy", "window_entropy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return R.saved_and_loaded(str(tmp_path_factory.mktemp("paged")), seed=5)


def _batch():
  return R.build_batch([[3, "img", 5], [9], [2, "img", 1, "img", 4], [7, 7, 8]],
                       R.random_images([(56, 84), (84, 56), (112, 56)], seed=2), "left", seed=3)


SC = sampling.SamplingConfig(max_new_tokens=12, temperature=1.0, n=3, window=2, max_branches=2, kv_cache="dense")


@pytest.fixture(scope="module")
def dense(tiny):
  _, _, config, params = tiny
  return sampling.generate(config, params, _batch(), SC, jax.random.key(3), tau_high=4.0)


def assert_same(a: sampling.Rollouts, b: sampling.Rollouts):
  for field in EXACT:
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
  for field in CLOSE:
    np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-5, err_msg=field)


@pytest.mark.parametrize("page_size,in_flight,prefill,attention",
                         [(4, 0, 0, "per_group"), (5, 1, 1, "per_slot"), (1, 3, 2, "auto")])
def test_paged_equals_dense(tiny, dense, page_size, in_flight, prefill, attention):
  """Any page size (a page boundary inside a window, at a fork, or one page for everything), prompts in
  flight (refilled one by one, or all at once), prefill size and decode attention: the same tokens, forks
  and scores."""
  _, _, config, params = tiny
  sc = dataclasses.replace(SC, kv_cache="paged", page_size=page_size, prompts_in_flight=in_flight,
                           chunk_prompts=prefill, decode_attention=attention)
  out = sampling.generate(config, params, _batch(), sc, jax.random.key(3), tau_high=4.0)
  assert (dense.parent >= 0).sum() >= 4, "tau chosen so that forks happen"
  assert_same(out, dense)


def test_greedy_budgets_and_reports(tiny):
  """Greedy decoding, per-prompt budgets and `on_done`: both engines agree, every group is reported once,
  and what is reported is what the call returns."""
  _, _, config, params = tiny
  batch = _batch()
  sc = dataclasses.replace(SC, temperature=0.0, n=2, max_branches=0, eos_ids=(1,))
  budgets = np.array([12, 3, 7, 1])
  seen = {}

  def on_done(rows, part):
    for i, row in enumerate(rows):
      assert row not in seen
      seen[int(row)] = {k: getattr(part, k)[part.prompt_index == i] for k in ("tokens", "length", "parent")}

  d = sampling.generate(config, params, batch, sc, jax.random.key(0), budgets=budgets)
  p = sampling.generate(config, params, batch, dataclasses.replace(sc, kv_cache="paged", prompts_in_flight=2,
                                                                   chunk_prompts=1, page_size=4),
                        jax.random.key(0), budgets=budgets, on_done=on_done)
  assert_same(p, d)
  assert (p.length <= np.repeat(budgets, 2)).all() and (p.length[p.prompt_index == 3] == 1).all()
  assert sorted(seen) == [0, 1, 2, 3]
  for row, got in seen.items():
    np.testing.assert_array_equal(got["tokens"], p.tokens[p.prompt_index == row])
    np.testing.assert_array_equal(got["length"], p.length[p.prompt_index == row])
  with pytest.raises(ValueError, match="budgets"):
    sampling.generate(config, params, batch, sc, jax.random.key(0), budgets=[3, 3])


def test_draining_the_tail_keeps_the_rollouts(tiny, monkeypatch):
  """Groups that end at different times: the busy ones are moved into half as many groups (4 -> 2 -> 1 in
  flight), and the rollouts are the dense engine's, as with no draining."""
  _, _, config, params = tiny
  budgets = np.array([12, 2, 5, 1])
  d = sampling.generate(config, params, _batch(), SC, jax.random.key(3), tau_high=4.0, budgets=budgets)
  drained, drain = [], refill.drain
  monkeypatch.setattr(refill, "drain", lambda state, keep: drained.append(len(keep)) or drain(state, keep))
  for halvings, sizes in ((0, []), (3, [2, 1])):
    drained.clear()
    sc = dataclasses.replace(SC, kv_cache="paged", page_size=4, drain_halvings=halvings)
    assert_same(sampling.generate(config, params, _batch(), sc, jax.random.key(3), tau_high=4.0, budgets=budgets), d)
    assert drained == sizes
  assert (d.parent >= 0).sum() >= 4


@pytest.mark.parametrize("attention", ["per_group", "per_slot"])
def test_paged_on_eight_devices_equals_dense_on_one(tiny, dense, attention):
  """Groups sharded over `data` (3 groups in flight over 2: uneven), heads over `tensor`."""
  _, path, config, _ = tiny
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
  _, params8 = models.load_hf(path, mesh=mesh)
  sc = dataclasses.replace(SC, kv_cache="paged", page_size=4, prompts_in_flight=3, chunk_prompts=1,
                           decode_attention=attention)
  assert_same(sampling.generate(config, params8, _batch(), sc, jax.random.key(3), tau_high=4.0), dense)


def _cache(rng, n_groups, group, t_prompt, n_max, page_size, attention="per_group"):
  kv_heads, head_dim = 2, 8
  c = paged.empty_cache(1, n_groups, group, t_prompt, n_max, page_size=page_size, kv_heads=kv_heads,
                        head_dim=head_dim, dtype=jnp.float32, attention=attention)
  return c.replace(prompt_k=(jnp.asarray(rng.normal(size=c.prompt_k[0].shape), jnp.float32),),
                   prompt_v=(jnp.asarray(rng.normal(size=c.prompt_v[0].shape), jnp.float32),),
                   prompt_valid=jnp.asarray(rng.random(c.prompt_valid.shape) < 0.7))


def _step(c, k, v, length, active, q=None):
  """One decode step of a one-layer cache: the tokens' k, v [S, K, D] written at `length`; (cache, out)."""
  q = jnp.zeros((k.shape[0], 1, 2 * k.shape[1], k.shape[2])) if q is None else q
  cache, attend = c.attention(jnp.asarray(length), jnp.asarray(active))
  out, update = attend[0](q, jnp.asarray(k)[:, None], jnp.asarray(v)[:, None])
  return cache.absorb([update], length, active), out


@pytest.mark.parametrize("attention", ["per_group", "per_slot"])
def test_writes_forks_and_attention_against_numpy(attention):
  """Responses written token by token through `write` (pages taken as they start), a fork copying one
  partly filled page, then `paged_attention` against softmax over each slot's keys rebuilt in numpy."""
  rng = np.random.default_rng(0)
  n_groups, group, t_prompt, n_max, ps = 2, 3, 6, 11, 3
  c = _cache(rng, n_groups, group, t_prompt, n_max, ps, attention)
  s_slots, kvh, d = n_groups * group, 2, 8
  keys = rng.normal(size=(n_max, s_slots, kvh, d)).astype(np.float32)
  vals = rng.normal(size=(n_max, s_slots, kvh, d)).astype(np.float32)
  active = np.array([True, True, False] * n_groups)  # slot 2 of each group: a branch slot, unused yet
  for t in range(7):
    length = np.full((s_slots,), t, np.int32)
    c, _ = _step(c, keys[t], vals[t], length, active)
  assert np.asarray(c.next_free).tolist() == [2 * 3, 2 * 3]  # 7 tokens: 3 pages for each of 2 slots
  # slot 2 of group 0 forks from slot 1 at t = 4 (mid-page: page 1 is copied), group 1's at t = 3 (a boundary)
  src = jnp.asarray([[0, 1, 1], [0, 1, 1]])
  is_child = jnp.asarray([[False, False, True], [False, False, True]])
  t_child = jnp.asarray([[0, 0, 4], [0, 0, 3]])
  c = c.fork(jnp.bool_(True), src, is_child, t_child, 2)
  table = np.asarray(c.table)
  assert table[0, 2, 0] == table[0, 1, 0] and table[0, 2, 1] not in table[0, :2] and table[0, 2, 2] == -1
  assert table[1, 2, 0] == table[1, 1, 0] and (table[1, 2, 1:] == -1).all()
  assert np.asarray(c.next_free).tolist() == [7, 6]
  copied = np.asarray(c.pool_k[0])[0, table[0, 2, 1]]
  np.testing.assert_array_equal(copied[:1], keys[3:4, 1])  # position 3 of the parent, now the child's
  # the children write their own continuation from their fork position; the parent's pages are untouched
  hist_k = keys[:7].copy()
  hist_v = vals[:7].copy()
  for s, t0 in ((2, 4), (5, 3)):
    parent = s - 1
    hist_k[:t0, s], hist_v[:t0, s] = keys[:t0, parent], vals[:t0, parent]
  for t in range(3, 7):
    length = np.array([7, 7, max(t, 4), 7, 7, t], np.int32)
    mask = np.array([False, False, t >= 4, False, False, True])
    new_k, new_v = rng.normal(size=(2, s_slots, kvh, d)).astype(np.float32)
    c, _ = _step(c, new_k, new_v, length, mask)
    for s in np.flatnonzero(mask):
      hist_k[length[s], s], hist_v[length[s], s] = new_k[s], new_v[s]
  np.testing.assert_array_equal(np.asarray(c.table)[0, :2], table[0, :2])

  heads = 4
  q = rng.normal(size=(s_slots, 1, heads, d)).astype(np.float32)
  kn, vn = rng.normal(size=(2, s_slots, kvh, d)).astype(np.float32)
  length = np.array([7, 7, 7, 7, 7, 7], np.int32)
  _, out = _step(c, kn, vn, length, np.ones((s_slots,), bool), jnp.asarray(q))
  out = np.asarray(out)
  kn, vn = kn[:, None], vn[:, None]
  pk, pv, pvalid = (np.asarray(x) for x in (c.prompt_k[0], c.prompt_v[0], c.prompt_valid))
  for s in range(s_slots):
    f = s // group
    ks = np.concatenate([pk[f][pvalid[f]], hist_k[:length[s], s], kn[s]])
    vs = np.concatenate([pv[f][pvalid[f]], hist_v[:length[s], s], vn[s]])
    for h in range(heads):
      sc = ks[:, h // 2] @ q[s, 0, h] / np.sqrt(d)
      p = np.exp(sc - sc.max())
      np.testing.assert_allclose(out[s, 0, h], (p / p.sum()) @ vs[:, h // 2], atol=1e-5)
