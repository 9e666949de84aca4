"""The AEPO stage: runs end to end on the tiny config, resumes step for step, lowers at 3B/7B shapes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ares_jax import settings as settings_lib
from ares_jax import models
from ares_jax.stages import aepo as aepo_stage
from ares_jax.train import optimizer as optim_lib
from ares_jax.aepo.step import (AepoBatch, LossSettings, UpdateRows, aepo_loss_fn, micro_batches,
                                old_and_ref_logprobs)
from ares_jax.data.batching import Prompt
from ares_jax.data.grading import GradingBatch
from ares_jax.train.packing import PackingSettings, layout
from ares_jax.train.update import MicroBatch, Updater
from tiny_configs import load_config, small_rl



def tiny_rl_config(workdir: str, total_steps: int):
  c = small_rl(load_config("tiny.py"))
  c.stage = "aepo"
  c.workdir = workdir
  c.total_steps = total_steps
  c.checkpoint_every = 2
  c.mesh.fsdp = 1  # one of the 8 simulated devices: the loop, not sharding, is under test here
  c.warm_start.steps = 3
  c.rollout.max_response_length = 24
  c.optim.lr = 1e-3
  c.data.min_steps, c.data.max_steps = 1, 3
  c.data.images = True  # every other prompt carries an image: the vision path runs in rollouts and updates
  return c


def _rows(workdir):
  with open(Path(workdir) / "metrics.jsonl") as f:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


# What every AEPO step writes to metrics.jsonl (beside its timings).
STEP_METRICS = ("loss", "reward/mean", "accuracy/mean", "tau_high", "kl", "clip_frac", "entropy/mean", "branches",
                "filtered_groups", *(f"{m}/{b}" for m in ("accuracy", "length", "n_he", "lambda")
                                     for b in ("easy", "medium", "hard")))


def test_one_short_aepo_step(tmp_path, monkeypatch, capsys):
  """The quick tier's AEPO step: the stage runs one step (rollout, grading, statistics, update, metrics,
  checkpoint, export) on the tiny config, text only and without its warm start (compiling is most of it);
  every step metric is written, and the stage ends by printing its result table. The groups put to the grader
  as they ended are exactly the used slots' texts and answers, and their grades are what grading every slot
  after decoding gives (so the overlap leaves the metrics as they were)."""
  c = tiny_rl_config(str(tmp_path), 1)
  c.warm_start.steps = 0
  c.rollout.max_response_length = 16
  c.data.images = False
  early_puts, compared = [], []
  real_put, real_grade = GradingBatch.put, aepo_stage.grade

  def recording_put(self, responses, golds, extra=None, keys=None):
    if keys is not None:  # the step's groups (grading afterwards and held-out evaluation put no keys)
      early_puts.append((np.asarray(keys), list(responses), list(golds)))
    return real_put(self, responses, golds, extra, keys)

  def grade_both_ways(grader, rollouts, answers, tokenizer, early=None):
    out = real_grade(grader, rollouts, answers, tokenizer, early)
    assert early is not None and early_puts
    keys = np.concatenate([k for k, _, _ in early_puts])
    responses = [r for _, rs, _ in early_puts for r in rs]
    golds = [g for _, _, gs in early_puts for g in gs]
    order = np.argsort(keys)
    used, texts = rollouts.texts(tokenizer)
    np.testing.assert_array_equal(keys[order], used)
    assert [responses[i] for i in order] == texts
    assert [golds[i] for i in order] == [answers[p] for p in rollouts.prompt_index[used]]
    after = real_grade(grader, rollouts, answers, tokenizer)  # every used slot graded now, as before the overlap
    np.testing.assert_array_equal(out[0], after[0])
    np.testing.assert_array_equal(out[1], after[1])
    assert_same_grades(out[2], after[2])
    compared.append(len(early_puts))
    return out

  monkeypatch.setattr(GradingBatch, "put", recording_put)
  monkeypatch.setattr(aepo_stage, "grade", grade_both_ways)
  out = aepo_stage.run(c)
  assert compared  # the step graded through the early path
  rows = _rows(c.workdir)
  assert [r["step"] for r in rows] == [1] and rows[0]["update_skipped"] == 0
  for key in STEP_METRICS:
    assert key in rows[0], key
  assert np.isfinite(rows[0]["loss"]) and out["skipped_rows"] == {}
  assert (Path(c.workdir) / "policy" / "config.json").exists()
  table = capsys.readouterr().out.split("AEPO: held-out accuracy", 1)[1].splitlines()
  assert table[1:3] == ["  no held-out evaluation was recorded", "(config.eval.every = 0: nothing evaluated)"]
  assert table[-1] == f"policy:  {c.workdir}/policy" and (Path(c.workdir) / "curves.png").exists()


def assert_same_grades(a, b) -> None:
  np.testing.assert_array_equal(a.accuracy, b.accuracy)
  np.testing.assert_array_equal(a.format, b.format)
  assert (a.timeouts, a.errors) == (b.timeouts, b.errors)


class LetterTokenizer:
  """Token t decodes to letter t ("a" = 0): enough of a tokenizer for `Rollouts.texts`."""

  def batch_decode(self, ids, skip_special_tokens=True):
    return ["".join(chr(ord("a") + t) for t in row) for row in ids]


def test_groups_graded_as_they_end_give_the_grades_of_grading_afterwards():
  """`EarlyGrading.on_done` gets groups of prompts in the order they end, each numbered from 0 as `generate`
  reports them (unused branch slots among them); `grade` then returns what grading every slot afterwards does."""
  import test_grading  # pylint: disable=g-import-not-at-top

  group, n_prompts, width = 3, 5, 4
  rng = np.random.default_rng(0)
  s = n_prompts * group
  tokens = rng.integers(0, 2, (s, width)).astype(np.int32)  # responses over {a, b}
  length = rng.integers(1, width + 1, s).astype(np.int32)
  length[[2, 8, 14]] = 0  # branch slots never forked
  zeros = np.zeros((s, width), np.float32)
  rollouts = aepo_stage.sampling.Rollouts(
      tokens=tokens, logprobs=zeros, entropy=zeros, window_entropy=zeros, window_valid=zeros > 0, hwe=zeros > 0,
      length=length, prompt_index=np.repeat(np.arange(n_prompts), group).astype(np.int32),
      parent=np.full(s, -1, np.int32), fork_pos=np.full(s, -1, np.int32))
  tok = LetterTokenizer()
  answers = tok.batch_decode([rollouts.response(g * group).tolist() for g in range(n_prompts)])  # root 0 is right
  with aepo_stage.Grader(workers=2, timeout_s=20, fn=test_grading.suffixed) as grader:
    early = aepo_stage.EarlyGrading(grader.batch(), answers, tok)
    for rows in ([3], [0, 4], [2], [1]):  # as the groups end
      rows = np.asarray(rows)
      slots = (rows[:, None] * group + np.arange(group)).reshape(-1)
      part = {f.name: getattr(rollouts, f.name)[slots] for f in dataclasses.fields(rollouts)}
      part["prompt_index"] = np.repeat(np.arange(len(rows)), group).astype(np.int32)
      early.on_done(rows, aepo_stage.sampling.Rollouts(**part))
    got = aepo_stage.grade(grader, rollouts, answers, tok, early)
    want = aepo_stage.grade(grader, rollouts, answers, tok)
  assert 0 < want[0].sum() < len(rollouts.used.nonzero()[0])  # some right, some wrong
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  assert_same_grades(got[2], want[2])


@pytest.mark.slow
def test_tiny_aepo_runs_and_resumes_step_for_step(tmp_path):
  straight = tiny_rl_config(str(tmp_path / "straight"), 3)
  out = aepo_stage.run(straight)
  rows = _rows(straight.workdir)
  assert [r["step"] for r in rows] == [1, 2, 3]
  for key in STEP_METRICS:
    assert key in rows[-1], key
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert any(r["branches"] > 0 for r in rows)
  assert (Path(straight.workdir) / "tensorboard").is_dir()
  assert (Path(straight.workdir) / "curves.png").stat().st_size > 10_000
  assert out["skipped_rows"] == {}

  stopped = tiny_rl_config(str(tmp_path / "resumed"), 2)
  aepo_stage.run(stopped)  # "killed" after its step-2 checkpoint
  resumed = tiny_rl_config(str(tmp_path / "resumed"), 3)
  aepo_stage.run(resumed)
  assert _rows(resumed.workdir) == rows


@pytest.mark.slow
def test_paged_and_dense_engines_run_the_same_steps(tmp_path):
  """The tiny AEPO stage's first steps are the same on either rollout engine (the paged one refilling
  three groups in flight two at a time and draining its tail, the dense one in chunks of two): every
  metric of every step, to float rounding: the engines' attention sums in different orders, so a rollout's
  entropies can differ in the last bit (measured: tau_high 6.2266378 vs 6.2266374 at step 2, with the
  same sampled tokens and parameters equal after the step)."""
  runs = {}
  for kv, extra in (("dense", dict(chunk_prompts=2)), ("paged", dict(prompts_in_flight=3, chunk_prompts=2,
                                                                      page_size=4, drain_halvings=2))):
    c = tiny_rl_config(str(tmp_path / kv), 2)
    c.warm_start.steps = 0
    c.rollout.max_response_length = 24
    c.rollout.kv_cache = kv
    c.rollout.update(extra)
    aepo_stage.run(c)
    runs[kv] = _rows(c.workdir)
  assert any(r["branches"] > 0 for r in runs["dense"])
  assert len(runs["paged"]) == len(runs["dense"])
  for paged, dense in zip(runs["paged"], runs["dense"]):
    assert paged.keys() == dense.keys()
    assert {k: v for k, v in paged.items() if not isinstance(v, float)} == {
        k: v for k, v in dense.items() if not isinstance(v, float)}
    assert {k: v for k, v in paged.items() if isinstance(v, float)} == pytest.approx(
        {k: v for k, v in dense.items() if isinstance(v, float)}, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("name", ["aepo_3b.py", "aepo_7b.py"])
def test_full_update_lowers_at_real_shapes(name):
  """The compiled micro-step (AEPO loss, gradients, accumulation) and apply lower at real shapes."""
  c = load_config(name)
  mcfg = settings_lib.model(c.model)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(models.abstract_params(mcfg)))
  tx = optim_lib.make_optimizer(settings_lib.optim(c), c.total_steps)
  updater = Updater(aepo_loss_fn(mcfg), tx, params)
  b, r = 2, 64
  grid = np.array([[1, 28, 28]])  # one 392 x 392 image
  prompt = Prompt(np.concatenate([np.full(196, mcfg.image_token_id), np.arange(100, 140)]).astype(np.int32),
                  np.zeros((784, mcfg.vision.patch_dim), np.float32), grid)
  rows, = layout(mcfg, [prompt], np.zeros(b, int), [np.arange(r, dtype=np.int32)] * b, 0,
                  PackingSettings(packing="shared_prompt", row_tokens=512, tokens_per_micro_batch=512))
  zeros = np.zeros(rows.src.shape, np.float32)
  arrays = AepoBatch(rows.inputs, rows.src, old_logp=zeros, ref_logp=zeros, adv=zeros + 1, loss_mask=rows.scored,
                     weights=zeros + 1, seq_weight=zeros + 1 / r)
  settings = LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=None, loss_agg="token_mean")
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), arrays)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  accum, loss, metrics = updater.micro_step.lower(params, updater.trainable(params), abstract, scalar,
                                                  settings).out_info
  assert loss.shape == () and "kl" in metrics and jax.tree.structure(accum) == jax.tree.structure(params)
  jax.tree.map(lambda g, q: (g.shape, g.dtype) == (q.shape, q.dtype) or pytest.fail(f"{g} vs {q}"), accum, params)
  state = jax.eval_shape(lambda p_: updater.init_state(p_, jax.random.key(0)), params)
  new_state, ok, _ = updater.apply.lower(state, accum, loss).out_info
  assert jax.tree.structure(new_state.params) == jax.tree.structure(params) and ok.dtype == jnp.bool_
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert n > (3e9 if "3b" in name else 8e9)


def test_update_moves_logprobs_along_the_advantages():
  """One real AEPO update raises log pi of positive-advantage responses and lowers the others."""
  c = load_config("tiny.py")
  mcfg = settings_lib.model(c.model)
  params = models.init_params(mcfg, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [Prompt(rng.integers(5, 400, 20).astype(np.int32)) for _ in range(2)]
  mask = np.zeros((4, 16), bool)
  mask[:, :12] = True
  adv = np.array([1.0, -1.0, 1.0, -1.0], np.float32)
  rows = UpdateRows(mcfg, prompts, np.array([0, 0, 1, 1]), [rng.integers(5, 400, 12).astype(np.int32) for _ in range(4)],
                    adv, mask, np.full((4, 16), 0.01, np.float32), settings_lib.packing(c, "aepo"), 16, 0)
  old, _ = old_and_ref_logprobs(rows, params, params, 1.0)
  c.optim.lr = 1e-3
  tx = optim_lib.make_optimizer(settings_lib.optim(c), 10)
  updater = Updater(aepo_loss_fn(mcfg), tx, params)
  state = updater.init_state(jax.tree.map(jnp.copy, params), jax.random.key(0))
  settings = LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=None, loss_agg="token_mean")
  state, m = updater.update(state, micro_batches(rows, np.arange(4), old, old, settings))
  assert m["update_skipped"] == 0 and m["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
  new, _ = old_and_ref_logprobs(rows, state.params, state.params, 1.0)
  delta = ((new - old) * mask).sum(1)
  assert (np.sign(delta) == adv).all()


def test_non_finite_loss_skips_the_update():
  c = load_config("tiny.py")
  mcfg = settings_lib.model(c.model)
  params = models.init_params(mcfg, jax.random.key(1))
  tx = optim_lib.make_optimizer(settings_lib.optim(c), 10)
  bad = Updater(lambda prm, batch, settings, key: (jnp.sum(prm["norm"]["scale"]) * jnp.nan, {}), tx, params)
  state = bad.init_state(jax.tree.map(jnp.copy, params), jax.random.key(0))
  state2, m = bad.update(state, [MicroBatch({}, None, 1.0)])
  assert m["update_skipped"] == 1 and int(state2.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, state2.params, params)


def _warm_start_texts(c, monkeypatch):
  """The responses of the first warm-start batch (SFT itself replaced), the RL prompt stream and the
  warm start's optimizer config."""
  from ares_jax.stages import setup
  from ares_jax.train import sft

  mcfg = settings_lib.model(c.model)
  tok = setup.build_tokenizer(c)
  rl_stream = setup.prompt_stream(c, setup.build_processor(c, tok, mcfg), 0)
  seen = {}

  def fake_run_sft(mcfg_, params, batches, *args, **kwargs):
    seen["responses"], seen["optim"] = batches(0)[1], args[0].optim  # run_sft(..., batches, SftSettings, steps)
    return params, [0.0]

  monkeypatch.setattr(sft, "run_sft", fake_run_sft)
  setup.warm_start(c, mcfg, {}, rl_stream, 0, tok)
  texts = tok.batch_decode([r.tolist() for r in seen["responses"]], skip_special_tokens=True)
  return texts, rl_stream, seen["optim"]


def test_warm_start_can_cover_a_wider_difficulty_range_than_the_rl_prompts(monkeypatch):
  from ares_jax.data.synthetic import Problem

  c = load_config("tiny.py")
  c.data.task = "steps"
  c.data.min_steps = c.data.max_steps = 1
  c.warm_start.max_steps = 8
  c.warm_start.steps = 1
  texts, rl_stream, _ = _warm_start_texts(c, monkeypatch)
  steps = {t.count(": ") for t in texts}
  assert len(texts) == c.warm_start.batch_size and max(steps) > 1 and steps <= set(range(1, 9))
  assert {rl_stream.take(i, 1)[0][0].difficulty for i in range(20)} == {1}
  assert isinstance(rl_stream.source.problem(0), Problem)


def test_warm_start_traces_slip_at_the_configured_rate(monkeypatch):
  c = load_config("tiny.py")
  c.data.task, c.data.min_steps, c.data.max_steps = "steps", 1, 8
  c.warm_start.steps, c.warm_start.batch_size, c.warm_start.slip_rate = 1, 64, 0.3
  texts, _, optim = _warm_start_texts(c, monkeypatch)
  assert (optim.lr, optim.weight_decay) == (c.warm_start.lr, c.warm_start.weight_decay) == (3e-3, 0.1)
  assert c.optim.weight_decay == 1e-2  # the RL optimizer keeps its own
  steps = [(int(x), int(d), int(y)) for t in texts for x, d, y in re.findall(r"(\d)\+(\d)=(\d)\.", t)]
  slipped = np.mean([y == (x + d + 1) % 10 for x, d, y in steps])
  assert len(steps) > 150 and all(y in ((x + d) % 10, (x + d + 1) % 10) for x, d, y in steps)
  assert 0.2 < slipped < 0.4  # 0.3 per step (binomial sd ~0.03 here)


def test_checks_task_warm_start_is_careful_about_half_the_time_whatever_the_difficulty(monkeypatch):
  c = load_config("tiny.py")  # task=checks: 5 steps, the operand's level is the difficulty
  c.warm_start.steps, c.warm_start.batch_size = 1, 96
  texts, _, _ = _warm_start_texts(c, monkeypatch)
  assert all(t.count(": ") == 5 for t in texts)
  checks = np.array([t.count("check ") for t in texts])
  operands = np.array([int(re.search(r"\+(\d)=", t).group(1)) for t in texts])
  assert set(checks) == {0, 5} and abs(checks.mean() - 2.5) < 0.6
  assert abs(checks[operands <= 3].mean() - checks[operands >= 7].mean()) < 1.0  # not by difficulty
