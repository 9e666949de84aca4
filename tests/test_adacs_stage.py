"""The AdaCS stage: teacher candidates, resumable pass rates, SFT on assistant tokens only with a frozen
vision tower, the stage end to end (report, plot, policy, resume) and the AdaCS -> AEPO pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from ares_jax import settings as settings_lib
from ares_jax import models
from ares_jax.adacs import report as report_lib
from ares_jax.adacs.pass_rates import estimate_pass_rates, read_progress
from ares_jax.data import synthetic
from ares_jax.data.coldstart import question_row
from ares_jax.data.grading import Grader, Grades, grade_one
from ares_jax.data.prompts import PromptStream, RowSource
from ares_jax.stages import adacs as adacs_stage
from ares_jax.stages import aepo as aepo_stage
from ares_jax.stages import pipeline, setup
from ares_jax.train import sft
from ares_jax.train.checkpoint import Checkpointer
from ares_jax.train.sequences import pack
from tiny_configs import load_config, small_rl



def _pool_stream(c, pool, proc) -> PromptStream:
  return PromptStream(RowSource([question_row(q) for q in pool]), proc, setup.prompt_template(c, proc.tokenizer),
                      c.rollout.max_prompt_length)


def tiny_adacs_config(workdir: str, **adacs):
  c = load_config("tiny.py")
  c.stage = "adacs"
  c.workdir = workdir
  c.mesh.fsdp = 1
  c.checkpoint_every = 2
  c.warm_start.steps = 0
  c.data.min_steps, c.data.max_steps = 1, 3
  c.rollout.max_response_length = 32
  c.adacs.synthetic_questions = 12
  c.adacs.max_checks = 2
  c.adacs.pass_rate_samples = 2
  c.adacs.pass_rate_batch = 4
  c.adacs.budget = 8
  c.adacs.batch_size = 4
  c.adacs.micro_batch_size = 2
  c.adacs.epochs = 2
  c.adacs.lr = 1e-3
  c.adacs.eval_prompts = 6
  c.adacs.update(adacs)
  return c


@pytest.fixture(scope="module")
def tiny_parts():
  c = tiny_adacs_config("/unused")
  mcfg = settings_lib.model(c.model)
  tok = setup.build_tokenizer(c)
  proc = setup.build_processor(c, tok, mcfg)
  params = models.init_params(mcfg, jax.random.key(0))
  return c, mcfg, tok, proc, params


def test_teacher_candidates_vary_in_length_and_slips_are_wrong():
  p = synthetic.problem(0, 5, 3, 3, "+")
  rng = np.random.default_rng(0)
  clean = p.teacher_candidates(3, 0.0, rng)
  assert clean[0] == p.trace()
  assert [len(t) for t in clean] == sorted(len(t) for t in clean) and len(set(map(len, clean))) == 4
  assert all(grade_one(t, p.answer) == 1.0 for t in clean)
  assert [ln.split(":")[0] for ln in clean[0].split(". ")[:3]] == ["<think> 3", "2", "1"]  # counts down
  slipped = p.teacher_candidates(3, 1.0, rng)
  assert all(grade_one(t, p.answer) == 0.0 for t in slipped)
  assert grade_one(p.trace(boxed=False), p.answer) == 0.0


def test_spearman_and_length_tables():
  assert report_lib.spearman([1, 2, 3, 4], [10, 20, 20, 40]) == pytest.approx(0.9486833, abs=1e-6)
  assert np.isnan(report_lib.spearman([1, 1, 1], [1, 2, 3]))
  qs = [{"id": "a", "source": "s", "pass_rate": 0.0, "candidates": [{"length": 10, "correct": True},
                                                                    {"length": 30, "correct": True},
                                                                    {"length": 5, "correct": False}]},
        {"id": "b", "source": "s", "pass_rate": 1.0, "candidates": [{"length": 4, "correct": True}]}]
  before = report_lib.length_by_pass_rate(qs)
  assert before == {"s": {"0.000": {"n": 2, "median": 20.0, "mean": 20.0},
                          "1.000": {"n": 1, "median": 4.0, "mean": 4.0}}}
  after = report_lib.length_by_pass_rate(qs, {"a": 1})
  assert after == {"s": {"0.000": {"n": 1, "median": 30.0, "mean": 30.0}}}


@pytest.mark.parametrize("where", ["local", "gs"])
def test_pass_rates_resume_equals_uninterrupted(tmp_path, tiny_parts, where, request):
  """Locally, and in a gs:// bucket (the GCS emulator), where progress lines are appended by uploading again."""
  from ares_jax import storage  # pylint: disable=g-import-not-at-top
  base = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
  c, mcfg, tok, proc, params = tiny_parts
  pool = adacs_stage.synthetic_pool(c)[:10]
  ids = [q.id for q in pool]
  sc = settings_lib.sampling(c, mcfg, tok.pad_token_id or 0, n=3, max_branches=0)
  stream = lambda: _pool_stream(c, pool, proc)
  with Grader(workers=1) as grader:
    full_path = f"{base}/full.jsonl"
    full = estimate_pass_rates(mcfg, params, stream(), ids, list(range(10)), tok, grader, sc, key=jax.random.key(3),
                               progress_path=full_path, batch_size=4)
    lines = storage.read_text(full_path).splitlines()
    assert len(lines) == 10 and all(r in {0.0, 1 / 3, 2 / 3, 1.0} for r in full.values())
    # Killed during batch 2 (rows 4..7): its first line made it, the second was cut off mid-write.
    part_path = f"{base}/part.jsonl"
    storage.write_text(part_path, "\n".join(lines[:5]) + "\n" + lines[5][:7])
    assert len(read_progress(part_path)) == 5
    resumed = estimate_pass_rates(mcfg, params, stream(), ids, list(range(10)), tok, grader, sc,
                                  key=jax.random.key(3), progress_path=part_path, batch_size=4)
  assert resumed == full


def test_sft_loss_is_the_mean_nll_of_assistant_tokens_only(tiny_parts):
  c, mcfg, tok, proc, params = tiny_parts
  pool = adacs_stage.synthetic_pool(c)[:3]
  stream = _pool_stream(c, pool, proc)
  prompts = [stream.encode(i).prompt for i in range(3)]
  responses = [np.array(tok(q.responses[0])["input_ids"] + [1], np.int32) for q in pool]
  (arrays, settings, weight), = sft.micro_batches(mcfg, prompts, responses, settings_lib.packing(c, "adacs"), 0)
  loss, _ = jax.jit(sft.sft_loss(mcfg), static_argnums=2)(params, arrays, settings)
  packed = pack(mcfg, prompts, responses, 0)
  width = packed.prompt_width
  logits = np.asarray(models.forward(mcfg, params, packed.inputs.ids, packed.inputs.mask), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  nll = []
  for b, r in enumerate(responses):  # token j of the response is predicted at position P + j - 1
    nll += [-logp[b, width + j - 1, r[j]] for j in range(len(r))]
  assert weight == 1.0
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


@pytest.mark.slow
def test_adacs_stage_end_to_end_freezes_vision_and_resumes(tmp_path, capsys):
  c = tiny_adacs_config(str(tmp_path / "run"))
  c.data.images = True  # half the pool shows its problem as an image: the frozen tower is exercised
  report = adacs_stage.run(c)
  work = Path(c.workdir)
  table = capsys.readouterr().out.split("AdaCS: held-out accuracy", 1)[1].splitlines()
  assert table[1].split() == ["before", "SFT", "after", "SFT"] and table[3].startswith("level ")
  assert table[-1] == f"policy:  {work}/policy"
  for name in ("adacs_report.json", "adacs_report.png", "sft_curves.png", "selection.jsonl", "pass_rates.jsonl",
               "policy/config.json", "policy/model.safetensors"):
    assert (work / name).exists(), name
  saved = json.loads((work / "adacs_report.json").read_text())
  assert saved["selected"] == report["selected"] <= c.adacs.budget
  assert set(saved["length_vs_pass_rate"]) == {"before_selection", "after_selection"}
  assert "spearman_length_vs_difficulty" in saved
  assert any(k.startswith("eval/length_d") for k in saved["eval_after_sft"])  # per difficulty level
  rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  total = c.adacs.epochs * -(-report["selected"] // c.adacs.batch_size)
  assert [r["step"] for r in rows] == list(range(1, total + 1))
  assert rows[-1]["sft/loss"] < rows[0]["sft/loss"]  # SFT loss falls

  mcfg, policy = models.load_hf(str(work / "policy"))
  init = models.init_params(settings_lib.model(c.model), jax.random.key(c.seed))  # build_params' init
  for path, a in jax.tree_util.tree_leaves_with_path(policy["visual"]):
    b = init["visual"]
    for k in path:
      b = b[k.key]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))  # frozen
  assert not np.allclose(np.asarray(policy["lm_head"]), np.asarray(init["lm_head"]))

  # A second run resumes from the last SFT checkpoint: no new step, the same selection and policy.
  assert Checkpointer(str(work / "checkpoints")).latest_step() == total
  again = adacs_stage.run(c)
  assert again["selected_per_tier"] == report["selected_per_tier"]
  assert len((work / "metrics.jsonl").read_text().splitlines()) == total


@pytest.mark.slow
def test_ares_pipeline_runs_adacs_then_aepo_from_its_policy(tmp_path, capsys):
  c = tiny_adacs_config(str(tmp_path / "ares"))
  c = small_rl(c)
  c.stage = "ares"
  c.total_steps = 2
  out = pipeline.run(c)
  assert out["adacs"]["selected"] > 0
  assert [h["step"] for h in out["aepo"]["history"]] == [1, 2]
  assert (tmp_path / "ares" / "adacs" / "adacs_report.json").exists()
  assert (tmp_path / "ares" / "aepo" / "metrics.jsonl").exists()
  printed = capsys.readouterr().out
  assert "AEPO: held-out" not in printed  # the pipeline's table covers AEPO: AdaCS's, then the pipeline's
  table = printed.split("ARES: held-out accuracy", 1)[1].splitlines()
  assert table[1].split() == ["before", "AdaCS", "after", "AdaCS"]  # small_rl evaluates nothing during AEPO
  assert table[-1] == f"policy:  {tmp_path}/ares/aepo/policy"


def test_ares_pipeline_hands_the_adacs_policy_to_aepo_and_skips_a_finished_adacs(tmp_path, monkeypatch):
  """The `ares` stage's wiring with both halves replaced (the real ones run in the test above): AdaCS in
  {workdir}/adacs, then AEPO in {workdir}/aepo from AdaCS's policy and tokenizer without a warm start; a
  relaunch after AdaCS finished (report and policy written) goes straight to AEPO."""
  calls = []

  def fake_adacs(c):
    calls.append(("adacs", c.workdir, c.warm_start.steps))
    (Path(c.workdir) / "policy").mkdir(parents=True)
    (Path(c.workdir) / "policy" / "config.json").write_text("{}")
    (Path(c.workdir) / "adacs_report.json").write_text("{}")
    return {"selected": 1}

  def fake_aepo(c, print_result=True):
    calls.append(("aepo", c.workdir, c.warm_start.steps, c.model.hf_path, c.tokenizer.path, print_result))
    return {"history": []}

  monkeypatch.setattr(adacs_stage, "run", fake_adacs)
  monkeypatch.setattr(aepo_stage, "run", fake_aepo)
  c = tiny_adacs_config(str(tmp_path))
  c.stage = "ares"
  c.warm_start.steps = 5
  policy = str(tmp_path / "adacs" / "policy")
  assert pipeline.run(c) == {"adacs": {"selected": 1}, "aepo": {"history": []}}
  # AEPO prints no table of its own: the pipeline prints one for both halves
  assert calls == [("adacs", str(tmp_path / "adacs"), 5),
                   ("aepo", str(tmp_path / "aepo"), 0, policy, policy, False)]
  assert c.workdir == str(tmp_path) and c.warm_start.steps == 5 and not c.model.hf_path  # the caller's config
  calls.clear()
  assert pipeline.run(c) == {"adacs": None, "aepo": {"history": []}}
  assert [call[0] for call in calls] == ["aepo"]


def test_adacs_7b_holds_paper_values_and_its_sft_step_lowers_at_7b_shapes():
  """The compiled SFT micro-step and the frozen-vision apply lower at 7B shapes: no gradient, accumulator or
  optimizer buffers for the vision tower."""
  import jax.numpy as jnp
  from flax import linen as nn

  from ares_jax.train.sequences import Prompt

  c = load_config("adacs_7b.py")
  assert (c.stage, c.adacs.epochs, c.adacs.lr, c.adacs.batch_size, c.adacs.freeze_vision) == ("adacs", 2, 2e-5, 256,
                                                                                             True)
  mcfg = settings_lib.model(c.model)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(models.abstract_params(mcfg)))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(params)) > 8e9
  b, r = 2, 64
  prompt = Prompt(np.concatenate([np.full(196, mcfg.image_token_id), np.arange(100, 140)]).astype(np.int32),
                  np.zeros((784, mcfg.vision.patch_dim), np.float32), np.array([[1, 28, 28]]))
  (arrays, settings, _), = sft.micro_batches(mcfg, [prompt] * b, [np.arange(r, dtype=np.int32)] * b,
                                             settings_lib.packing(c, "adacs"), 0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), arrays)
  updater = sft.make_sft(mcfg, params, c.optim, 100, frozen=("visual",))
  trainable = updater.trainable(params)
  assert "visual" not in trainable and set(trainable) == set(params) - {"visual"}
  accum, loss, _ = updater.micro_step.lower(params, trainable, abstract, jax.ShapeDtypeStruct((), jnp.float32),
                                            settings).out_info
  assert loss.shape == () and jax.tree.structure(accum) == jax.tree.structure(trainable)
  state = jax.eval_shape(lambda p_: updater.init_state(p_, jax.random.key(0)), params)
  moments = sum(np.prod(x.shape) for x in jax.tree.leaves(state.opt_state) if x.ndim)
  n_visual = sum(np.prod(x.shape) for x in jax.tree.leaves(params["visual"]))
  n_all = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert moments == 2 * (n_all - n_visual)  # Adam moments for the trainable part only
  new_state, ok, _ = updater.apply.lower(state, accum, loss).out_info
  assert jax.tree.structure(new_state.params) == jax.tree.structure(params) and ok.dtype == jnp.bool_


def test_eval_stage_writes_accuracy_and_length_per_difficulty(tmp_path, capsys):
  from ares_jax.stages import evaluate as eval_policy

  c = tiny_adacs_config(str(tmp_path / "eval"))
  c.stage = "eval"
  c.eval.prompts = 6
  out = eval_policy.run(c)
  saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
  assert saved["policy"] == "random initialisation" and saved["prompts"] == 6
  assert 0.0 <= saved["accuracy"] <= 1.0 and saved["length"] > 0 and out["accuracy"] == saved["accuracy"]
  levels = {k for k in saved if k.startswith("length_d")}
  assert levels and levels <= {f"length_d{d}" for d in range(1, 4)}
  printed = capsys.readouterr().out
  assert "mean@4 accuracy" in printed and "difficulty" in printed and saved["samples"] == c.eval.samples == 4


def test_sampled_evaluation_grades_every_sample_against_its_own_prompt(tiny_parts):
  from ares_jax.evaluation.held_out import evaluate

  c, mcfg, tok, proc, params = tiny_parts
  stream = setup.prompt_stream(c, proc, 1)
  exs, _ = stream.take(0, 5)
  seen = {}

  class Recorder:  # accuracy 1 exactly for the samples of prompts 0 and 3
    def grade(self, texts, golds):
      seen["golds"] = list(golds)
      return Grades(np.array([g in (exs[0].answer, exs[3].answer) for g in golds], np.float32),
                    np.zeros(len(golds), np.float32), 0, 0)

  sc = settings_lib.sampling(c, mcfg, tok.pad_token_id or 0, max_new_tokens=8)
  out = evaluate(mcfg, params, stream, Recorder(), tok, sc, prompts=5, key=jax.random.key(0), samples=3)
  assert sorted(seen["golds"]) == sorted([e.answer for e in exs] * 3)
  want = np.mean([e.answer in (exs[0].answer, exs[3].answer) for e in exs])
  assert out["eval/accuracy"] == pytest.approx(want)
  for d in {e.difficulty for e in exs}:
    of_d = [e for e in exs if e.difficulty == d]
    assert out[f"eval/accuracy_d{d}"] == pytest.approx(np.mean([e.answer in (exs[0].answer, exs[3].answer)
                                                                for e in of_d]))
  greedy = evaluate(mcfg, params, stream, Recorder(), tok, sc, prompts=5, key=jax.random.key(0))
  assert len(seen["golds"]) == 5 and greedy["eval/accuracy"] == pytest.approx(want)
