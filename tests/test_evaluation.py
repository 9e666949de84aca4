"""Benchmark evaluation: the judge's hard cases, group and WeMath scores, the report files, and the `eval`
stage end to end on two benchmarks built here (a VLMEvalKit TSV with base64 images and options, a
free-form JSONL) followed by a rescore that re-judges an edited prediction without loading a model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ares_jax.evaluation import judge as J
from ares_jax.evaluation import reports, scores

OPTIONS = {"A": "12", "B": "21", "C": r"\frac{1}{2}", "D": "none of these"}


@pytest.mark.parametrize("response,gold,want", [
    (r"so \boxed{\frac{1}{2}} here", "0.5", 1),  # nested braces survive, values compared by math-verify
    (r"\boxed{0.5}", r"\frac{1}{2}", 1),
    (r"\boxed{x^{2}+\frac{1}{2}}", r"x^2+\frac12", 1),
    (r"\boxed{12}", "21", 0),  # sorted characters would make these equal
    (r"\boxed{3}", "5", 0),  # a letters-only comparison would make any two numbers equal
    (r"\boxed{1000}", "10", 0),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{3}", 0),
    ("The answer is 5.", "5", 0),  # free form needs a boxed answer
    ("", "5", 0),
    (r"\boxed{}", "5", 0),
    (r"\boxed{A}", "A", 1),  # a bare letter does not parse as math: compared as a string
    (r"\boxed{A}", "B", 0),
    (r"first \boxed{5} then \boxed{7}", "7", 1),  # the last boxed answer counts
    (r"first \boxed{7} then \boxed{5}", "7", 0),
    (r"\boxed{7", "7", 0),  # unbalanced: no answer
])
def test_free_form_judge(response, gold, want):
  assert J.judge(response, gold) == want
  assert J.judge(response, gold, {}) == want  # empty options = free form


@pytest.mark.parametrize("response,gold,want", [
    (r"\boxed{B}", "B", 1),
    (r"\boxed{B}", "21", 1),  # letter vs the gold option's text
    (r"\boxed{21}", "B", 1),  # the option's text vs the gold letter
    (r"\boxed{12}", "B", 0),  # the text of another option
    (r"\boxed{0.5}", "C", 1),  # a value equal to exactly one option under math-verify
    (r"\boxed{(B)}", "B", 1),
    (r"\boxed{\text{B. 21}}", "B", 1),
    (r"\boxed{A}", "B", 0),
    ("so the answer is (B).", "B", 1),
    ("so the answer is (A).", "B", 0),
    ("Answer: B", "B", 1),
    ("I considered (A) at first.\nB", "B", 1),  # a lone letter on the last line
    ("I considered B at first, then stopped", "B", 0),  # a letter inside prose is no choice
    ("no choice at all", "B", 0),
    (r"\boxed{E}", "E", 0),  # not one of the options
])
def test_multiple_choice_judge(response, gold, want):
  assert J.judge(response, gold, OPTIONS) == want


def test_extracted_answer_and_gold_choice():
  assert J.extract(r"\boxed{21}", OPTIONS) == "B" and J.extract("the answer is (C)", OPTIONS) == "C"
  assert J.extract(r"\boxed{\frac{1}{2}+1}") == r"\frac{1}{2}+1" and J.extract("nothing") is None
  assert J.gold_choice("(D)", OPTIONS) == "D" and J.gold_choice("none of these", OPTIONS) == "D"
  assert J.gold_choice("42", OPTIONS) is None
  assert J.normalize(r" \text{Yes}. ") == "yes" and J.normalize("12") != J.normalize("21")


def test_judge_in_the_grading_pool_gets_the_options():
  from ares_jax.data.grading import Grader

  with Grader(workers=1, timeout_s=30, fn=J.judge) as g:
    out = g.grade([r"\boxed{21}", r"\boxed{21}", r"\boxed{0.5}"], ["B", "21", r"\frac12"],
                  extra=[(OPTIONS,), ({},), ({},)])
  np.testing.assert_array_equal(out.accuracy, [1, 1, 1])


def _record(item, correct, group=None, sample=0, tokens=10, category=None, extra=None):
  return dict(item=item, sample=sample, correct=correct, tokens=tokens, group=group, category=category,
              extra=extra or {})


def test_dynamath_group_with_one_wrong_variant_is_wrong():
  rows = [_record(0, True, "q1"), _record(1, False, "q1"), _record(2, True, "q1"),
          _record(3, True, "q2"), _record(4, True, "q2"), _record(5, True, None)]
  out = scores.summarize(rows, grouped=True)
  assert out["accuracy_items"] == pytest.approx(5 / 6)
  assert out["groups"] == 3 and out["accuracy"] == pytest.approx(2 / 3)  # q1 wrong, q2 right, item 5 alone
  assert scores.summarize(rows, grouped=False)["accuracy"] == pytest.approx(5 / 6)
  # a wrong sample of an otherwise right group also sinks it
  two = [_record(0, True, "q", 0), _record(0, False, "q", 1), _record(1, True, "p", 0), _record(1, True, "p", 1)]
  out = scores.summarize(two, grouped=True)
  assert out["accuracy"] == 0.5 and out["accuracy_items"] == 0.75 and out["n"] == 2 and out["samples"] == 2


def test_per_category_and_tokens():
  rows = [_record(0, True, tokens=10, category="geo"), _record(1, False, tokens=30, category="geo"),
          _record(2, True, tokens=20, category="alg")]
  out = scores.summarize(rows, grouped=False)
  assert out["tokens"] == 20 and out["n"] == 3
  assert out["per_category"] == {"alg": {"accuracy": 1.0, "tokens": 20.0, "n": 1},
                                 "geo": {"accuracy": 0.5, "tokens": 20.0, "n": 2}}


def _wemath_rows(table):
  rows = []
  for pid, key, ok in table:
    rows.append(_record(len(rows), ok, extra={"ID": pid, "key": key, "knowledge concept": "x"}))
  return rows


def test_wemath_four_dimensional_score_on_a_hand_computed_table():
  T, F = True, False
  table = [("p1", "2steps_1", T), ("p1", "2steps_2", T), ("p1", "2steps_multi", T),  # CM (strict and loose)
           ("p2", "2steps_1", T), ("p2", "2steps_2", F), ("p2", "2steps_multi", T),  # RM strict, CM loose
           ("p3", "2steps_1", F), ("p3", "2steps_2", F), ("p3", "2steps_multi", T),  # RM strict and loose
           ("p4", "2steps_1", T), ("p4", "2steps_2", T), ("p4", "2steps_multi", F),  # IG
           ("p5", "3steps_1", T), ("p5", "3steps_2", F), ("p5", "3steps_3", T), ("p5", "3steps_multi", F),  # IK
           ("p6", "3steps_1", T), ("p6", "3steps_2", T), ("p6", "3steps_multi", T)]  # no 3steps_3: left out
  out = scores.summarize(_wemath_rows(table), grouped=False)["wemath"]
  # By hand: N = 5 complete problems; IG = 1 (p4), IK = 1 (p5), RM strict = 2 (p2, p3), RM loose = 1 (p3).
  assert (out["problems"], out["IG"], out["IK"], out["RM_strict"], out["RM_loose"]) == (5, 1, 1, 2, 1)
  assert (out["CM_strict"], out["CM_loose"]) == (1, 2)
  assert out["score_strict"] == pytest.approx((5 - 0.5 * 1 - 2 - 1) / 5)  # 0.3
  assert out["score_loose"] == pytest.approx((5 - 0.5 * 1 - 1 - 1) / 5)  # 0.5
  assert "wemath" not in scores.summarize([_record(0, True)], grouped=False)
  # the ID as the row id (a lowercase `id` column is read as the id); rows of unique ids form no problem
  as_ids = [dict(r, id=r["extra"].pop("ID")) for r in _wemath_rows(table)]
  assert scores.summarize(as_ids, grouped=False)["wemath"] == out
  unique = [dict(r, id=str(k)) for k, r in enumerate(as_ids)]
  assert "wemath" not in scores.summarize(unique, grouped=False)


def test_benchmark_and_group_by_specs():
  from ares_jax.data.reader import Columns
  from ares_jax.evaluation import benchmarks as B

  assert B.group_column("", "dyna") == (None, False) and B.group_column("qid", "dyna") == ("qid", False)
  assert B.group_column("qid, dyna=seed", "dyna") == ("seed", True)
  assert B.group_column("dyna=seed", "we") == (None, False)
  assert B.groups_of([({"seed": 3}, {}), ({}, {})], "seed", True, "dyna") == ["3", None]
  assert B.groups_of([({}, {"category": "geo"})], "category", False, "x") == ["geo"]
  assert B.groups_of([({}, {"id": "7"})], "qid", False, "dyna") is None  # a generic column the rows lack
  with pytest.raises(ValueError, match="no row"):
    B.groups_of([({}, {})], "seed", True, "dyna")
  assert "qid" not in B.keeping(Columns(), "qid").id and B.keeping(Columns(), None) == Columns()
  assert B.parse_specs(["mathverse=/x.tsv", " we = /y "]) == [("mathverse", "/x.tsv"), ("we", "/y")]
  for bad in (["a/b=/x"], ["a=/x", "a=/y"], ["no_path"], ["a="]):
    with pytest.raises(ValueError):
      B.parse_specs(bad)


def test_report_files(tmp_path):
  report = {"mathvista": scores.summarize([_record(0, True, tokens=12), _record(1, False, tokens=8)], False),
            "dynamath": scores.summarize([_record(0, True, "g"), _record(1, False, "g")], True)}
  reports.write_reports(str(tmp_path), report)
  assert json.loads((tmp_path / "report.json").read_text())["dynamath"]["accuracy"] == 0.0
  md = (tmp_path / "report.md").read_text()
  assert "| mathvista | 2 | 0.5000 | 0.5000 | 10.0 |" in md and "worst case over 1 groups" in md
  assert (tmp_path / "report.png").stat().st_size > 5_000
  assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
  reports.write_records(str(tmp_path / "x.jsonl"), [{"a": np.int64(3), "b": np.float32(0.5)}])
  assert reports.read_records(str(tmp_path / "x.jsonl")) == [{"a": 3, "b": 0.5}]


# The `eval` stage end to end on the tiny model.

def _png_base64(seed: int) -> str:
  import base64
  import io

  from PIL import Image

  pixels = np.random.default_rng(seed).integers(0, 255, (56, 56, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def _benchmarks(tmp_path):
  """A VLMEvalKit-style multiple-choice TSV (base64 images, options A-D, DynaMath-like `qid` variants) and
  a free-form JSONL."""
  tsv = tmp_path / "mc.tsv"
  lines = ["index\timage\tquestion\tanswer\tA\tB\tC\tD\tcategory\tqid"]
  for i, (gold, qid) in enumerate([("A", "s1"), ("C", "s1"), ("B", "s2")]):
    lines.append(f"{10 + i}\t{_png_base64(i)}\tWhich number is shown?\t{gold}\t1\t2\t3\t4\t"
                 f"{'geo' if i < 2 else 'alg'}\t{qid}")
  tsv.write_text("\n".join(lines) + "\n")
  jsonl = tmp_path / "free.jsonl"
  jsonl.write_text("".join(json.dumps({"question": f"What is {k} + {k}?", "answer": f"\\boxed{{{2 * k}}}"}) + "\n"
                           for k in (1, 2, 3)))
  return f"mc={tsv}", f"free={jsonl}"


def _eval_config(workdir, benchmarks):
  from tiny_configs import load_config

  c = load_config("tiny.py")
  c.stage = "eval"
  c.workdir = str(workdir)
  c.mesh.fsdp = 1
  c.rollout.max_response_length = 6
  c.eval.samples = 0
  c.eval.benchmarks = benchmarks
  c.eval.batch_prompts = 2
  c.eval.group_by = "mc=qid"
  c.grading_workers = 1
  c.aepo.grading_timeout_s = 30.0
  return c


def test_eval_stage_on_two_benchmarks_then_rescore(tmp_path):
  from ares_jax.stages import evaluate as eval_stage

  c = _eval_config(tmp_path / "run", _benchmarks(tmp_path))
  report = eval_stage.run(c)
  out = tmp_path / "run" / "eval"
  saved = json.loads((out / "report.json").read_text())
  assert set(saved) == {"mc", "free"} and saved == json.loads(json.dumps(report))
  for name, n in (("mc", 3), ("free", 3)):
    r = saved[name]
    assert r["n"] == n and r["samples"] == 1 and r["skipped"] == {}
    assert {"accuracy", "accuracy_items", "tokens", "n", "per_category"} <= set(r)
    assert 1 <= r["tokens"] <= 6
  assert saved["mc"]["groups"] == 2 and saved["mc"]["group_by"] == "qid"
  assert set(saved["mc"]["per_category"]) == {"geo", "alg"} and saved["free"]["per_category"] == {}
  assert "groups" not in saved["free"] and saved["free"]["accuracy"] == saved["free"]["accuracy_items"]
  rows = {name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text().splitlines()]
          for name in ("mc", "free")}
  for name, rs in rows.items():
    assert len(rs) == 3
    for r in rs:
      assert set(reports.ROW_FIELDS) <= set(r) and isinstance(r["prediction"], str)
  assert [r["index"] for r in rows["mc"]] == [10, 11, 12] and [r["index"] for r in rows["free"]] == [0, 1, 2]
  assert rows["mc"][0]["options"] == {"A": "1", "B": "2", "C": "3", "D": "4"} and rows["free"][0]["options"] == {}
  assert [r["group"] for r in rows["mc"]] == ["s1", "s1", "s2"] and rows["free"][0]["group"] is None
  assert rows["free"][1]["answer"] == "4" and rows["mc"][1]["question"] == "Which number is shown?"
  md = (out / "report.md").read_text()
  assert "| mc | 3 |" in md and "| free | 3 |" in md
  assert (out / "report.png").stat().st_size > 5_000

  # Rescore: make every answer right by editing the predictions; no model is built.
  for name, rs in rows.items():
    for r in rs:
      r["prediction"] = f"so the answer is \\boxed{{{r['answer']}}}"
    rs[0]["prediction"] = "I do not know"  # one wrong row: item 0 of group s1 sinks s1
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
  rc = _eval_config(tmp_path / "run", ())
  rc.eval.rescore = True
  rc.eval.group_by = "qid"  # a bare column: only the benchmark whose rows carry it is grouped
  rc.model.hf_path = str(tmp_path / "no_such_checkpoint")  # would fail if a model were loaded
  again = eval_stage.run(rc)
  assert again["free"]["accuracy"] == again["free"]["accuracy_items"] == pytest.approx(2 / 3)
  assert "groups" not in again["free"] and again["mc"]["groups"] == 2
  assert again["mc"]["accuracy_items"] == pytest.approx(2 / 3) and again["mc"]["accuracy"] == 0.5
  assert again["mc"]["per_category"]["alg"]["accuracy"] == 1.0
  rescored = [json.loads(line) for line in (out / "mc.jsonl").read_text().splitlines()]
  assert [r["correct"] for r in rescored] == [False, True, True]
  assert [r["extracted"] for r in rescored] == [None, "C", "B"]
  assert json.loads((out / "report.json").read_text())["mc"]["accuracy"] == 0.5


@pytest.mark.slow
def test_aepo_scores_benchmarks_and_exports_a_policy_that_eval_loads(tmp_path):
  from tiny_configs import small_rl

  from ares_jax.stages import aepo as aepo_stage
  from ares_jax.stages import evaluate as eval_stage

  _, free = _benchmarks(tmp_path)
  c = small_rl(_eval_config(tmp_path / "rl", (free,)))
  c.stage, c.total_steps, c.checkpoint_every = "aepo", 2, 2
  c.warm_start.steps, c.data.min_steps, c.data.max_steps = 0, 1, 3
  c.rollout.max_response_length = 8
  c.eval.every, c.eval.prompts = 2, 2
  c.export_every = 1
  aepo_stage.run(c)
  rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
  scored = [r for r in rows if "eval/free/accuracy" in r]
  assert [r["step"] for r in scored] == [0, 2] and all(1 <= r["eval/free/tokens"] <= 8 for r in scored)
  assert json.loads((tmp_path / "rl" / "eval" / "step_2" / "report.json").read_text())["free"]["n"] == 3
  policy = tmp_path / "rl" / "policy"
  assert (policy / "config.json").exists() and list(policy.glob("*.safetensors"))

  e = _eval_config(tmp_path / "ev", (free,))
  e.model.hf_path = str(policy)
  assert eval_stage.run(e)["free"]["n"] == 3
