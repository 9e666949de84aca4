"""What a training stage shows at its end, from small hand-made records: the result table (evaluation/summary.py,
stages/results.py) and the figures' panels, axis labels, titles and ticks (train/curves.py, adacs/report.py)."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest

from ares_jax.adacs.report import report_figure
from ares_jax.evaluation import summary
from ares_jax.stages import results
from ares_jax.train.curves import curves_figure
from tiny_configs import load_config

matplotlib.use("Agg")

BEFORE = {"eval/accuracy": 0.5, "eval/length": 80.0, "eval/accuracy_d1": 0.75, "eval/length_d1": 80.25,
          "eval/accuracy_d2": 0.5, "eval/length_d2": 79.0, "eval/accuracy_d3": 0.25, "eval/length_d3": 80.75,
          "eval/spearman_length_vs_difficulty": 0.0123}
AFTER = {"eval/accuracy": 0.625, "eval/length": 81.5, "eval/accuracy_d1": 0.875, "eval/length_d1": 60.0,
         "eval/accuracy_d2": 0.5, "eval/length_d2": 82.5, "eval/accuracy_d3": 0.5, "eval/length_d3": 102.0,
         "eval/spearman_length_vs_difficulty": 0.6}


def test_result_table_has_accuracy_and_tokens_per_level_spearman_and_paths():
  text = summary.result_table("T", [summary.Column("before", BEFORE), summary.Column("after", AFTER)],
                              where=(("plots", "w/a.png"), ("", "w/b.png"), ("policy", "w/policy")),
                              notes=("level: what a level counts",))
  # 28 columns of row labels (the Spearman one's width), then per column a 9-wide accuracy and a 9-wide tokens
  # cell, one space before each; a heading right-aligned over its two cells
  assert text.splitlines() == [
      "T",
      " " * 42 + "before" + " " * 15 + "after",
      " " * 30 + "accuracy    tokens  accuracy    tokens",
      "level 1" + " " * 26 + "0.750      80.2     0.875      60.0",
      "level 2" + " " * 26 + "0.500      79.0     0.500      82.5",
      "level 3" + " " * 26 + "0.250      80.8     0.500     102.0",  # 80.75 rounds half to even
      "all levels" + " " * 23 + "0.500      80.0     0.625      81.5",
      "Spearman(tokens, difficulty)" + " " * 15 + "0.012" + " " * 15 + "0.600",
      "level: what a level counts",
      "plots:  w/a.png",
      "        w/b.png",
      "policy: w/policy",
  ]


def test_result_table_orders_levels_numerically_marks_what_is_missing_and_lists_benchmarks():
  first = {"eval/accuracy_d2": 1.0, "eval/length_d2": 5.0, "eval/accuracy_d10": 0.0, "eval/length_d10": None,
           "eval/mathvista/accuracy": 0.5, "eval/mathvista/tokens": 300.0}
  second = {"eval/accuracy_d2": 0.5, "eval/length_d2": 6.0}
  lines = summary.result_table("T", [summary.Column("a", first), summary.Column("b", second)]).splitlines()
  assert [ln.split()[0:2] for ln in lines[3:]] == [["level", "2"], ["level", "10"], ["mathvista", "0.500"]]
  assert lines[4].split() == ["level", "10", "0.000", "-", "-", "-"]  # null in metrics.jsonl, absent in b
  assert lines[5].split() == ["mathvista", "0.500", "300.0", "-", "-"]
  assert not any("Spearman" in ln for ln in lines)


def test_result_table_without_evaluations_says_so():
  text = summary.result_table("T", [], where=(("policy", "p"),), notes=("why",))
  assert text.splitlines() == ["T", "  no held-out evaluation was recorded", "why", "policy: p"]


def _write_metrics(workdir, rows):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_aepo_and_ares_tables_read_the_evaluations_the_run_wrote(tmp_path):
  c = load_config("tiny.py")
  c.workdir = str(tmp_path / "aepo")
  middle = dict(BEFORE, **{"eval/accuracy_d1": 0.1})
  _write_metrics(tmp_path / "aepo", [dict(BEFORE, step=0), {"step": 1, "kl": 0.1, "accuracy/easy": 0.9},
                                     dict(middle, step=2), {"step": 3, "kl": 0.2}, dict(AFTER, step=4),
                                     {"step": 5, "kl": 0.3}])
  lines = results.aepo_table(c, str(tmp_path / "aepo" / "curves.png")).splitlines()
  assert lines[0].startswith("AEPO: held-out accuracy")
  assert lines[1].split() == ["step", "0", "step", "4"]  # the first and the last evaluation, not step 2
  assert lines[3].split() == ["level", "1", "0.750", "80.2", "0.875", "60.0"]
  assert "level = the operand's level (operands 1-3, 4-6, 7-9)" in lines
  assert f"plots:   {tmp_path}/aepo/curves.png" in lines and f"policy:  {tmp_path}/aepo/policy" in lines

  adacs_dir = tmp_path / "adacs"
  adacs_dir.mkdir()
  (adacs_dir / "adacs_report.json").write_text(json.dumps({"eval_before_sft": BEFORE, "eval_after_sft": middle}))
  lines = results.ares_table(c, str(adacs_dir), str(tmp_path / "aepo")).splitlines()
  assert lines[1].split() == ["before", "AdaCS", "after", "AdaCS", "after", "AEPO", "step", "4"]
  assert lines[3].split() == ["level", "1", "0.750", "80.2", "0.100", "80.2", "0.875", "60.0"]
  assert lines[7].split() == ["Spearman(tokens,", "difficulty)", "0.012", "0.012", "0.600"]


def test_aepo_table_without_held_out_evaluation_names_the_setting(tmp_path):
  c = load_config("tiny.py")
  c.workdir = str(tmp_path)
  c.eval.every = 0
  _write_metrics(tmp_path, [{"step": 1, "kl": 0.1}])
  lines = results.aepo_table(c, "curves.png").splitlines()
  assert lines[1:3] == ["  no held-out evaluation was recorded", "(config.eval.every = 0: nothing evaluated)"]


# A few AEPO steps as metrics.jsonl holds them: held-out evaluations at steps 0 and 2; every step the training
# batch's bins, with values no held-out line has.
HELD_OUT = {0: {"eval/accuracy_d1": 0.5, "eval/accuracy_d2": 0.25, "eval/accuracy_d3": 0.125, "eval/accuracy": 0.3,
                "eval/length_d1": 51.0, "eval/length_d2": 52.0, "eval/length_d3": 53.0, "eval/length": 52.0},
            2: {"eval/accuracy_d1": 0.75, "eval/accuracy_d2": 0.5, "eval/accuracy_d3": 0.375, "eval/accuracy": 0.5,
                "eval/length_d1": 41.0, "eval/length_d2": 62.0, "eval/length_d3": 87.0, "eval/length": 63.0}}
AEPO_ROWS = [dict(HELD_OUT.get(s, {}), step=s) for s in (0, 1, 2)]
for row in AEPO_ROWS[1:]:
  s = row["step"]
  row.update({"reward/mean": 0.5 + s, "kl": 0.25 * s, "tau_high": 1.5 + s, "accuracy/easy": 0.99,
              "length/easy": 999.0, "n_he/easy": 2.0, "n_he/medium": 3.0, "n_he/hard": 4.0})


def _lines(ax):
  return {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}


def test_curves_plot_held_out_levels_and_keep_kl_and_tau_high_off_the_reward_axis():
  import matplotlib.pyplot as plt
  fig = curves_figure(AEPO_ROWS, results.aepo_panels(load_config("tiny.py")), results.AEPO_STEP)
  try:
    acc, tokens, n_he, reward, kl, tau = fig.axes
    for ax in fig.axes:  # every axis labelled, the y axes with their unit
      assert ax.get_xlabel() == "AEPO step (one rollout batch)" and ax.get_title()
      assert "(" in ax.get_ylabel(), ax.get_ylabel()
    assert acc.get_ylabel() == "accuracy (fraction correct)"
    assert tokens.get_ylabel() == "response length (tokens, mean)"
    # held-out levels over steps, not the training batch's bins
    assert _lines(acc) == {"level 1": ([0, 2], [0.5, 0.75]), "level 2": ([0, 2], [0.25, 0.5]),
                           "level 3": ([0, 2], [0.125, 0.375]), "all levels": ([0, 2], [0.3, 0.5])}
    assert _lines(tokens) == {"level 1": ([0, 2], [51.0, 41.0]), "level 2": ([0, 2], [52.0, 62.0]),
                              "level 3": ([0, 2], [53.0, 87.0]), "all levels": ([0, 2], [52.0, 63.0])}
    for ax in (acc, tokens):
      assert ax.get_legend().get_title().get_text() == "difficulty: the operand's level (operands 1-3, 4-6, 7-9)"
    assert list(_lines(n_he)) == ["easy", "medium", "hard"] and "training-batch" in n_he.get_title()
    # reward, KL and tau_high each on an axis of its own
    assert _lines(reward) == {"batch mean": ([1, 2], [1.5, 2.5])}
    assert _lines(kl) == {"batch mean": ([1, 2], [0.25, 0.5])} and "KL" in kl.get_ylabel()
    assert acc.get_lines()[0].get_marker() == "o" and reward.get_lines()[0].get_marker() == "None"  # sparse: dots
    assert _lines(tau) == {"tau_high": ([1, 2], [2.5, 3.5])} and "nats" in tau.get_ylabel()
  finally:
    plt.close(fig)


def test_sft_curves_label_the_loss_axis():
  import matplotlib.pyplot as plt
  fig = curves_figure([{"step": 1, "sft/loss": 2.0}, {"step": 2, "sft/loss": 1.5}], results.SFT_PANELS,
                      results.SFT_STEP)
  try:
    (ax,) = fig.axes
    assert ax.get_ylabel() == "loss (mean NLL per assistant token, nats)"
    assert ax.get_xlabel() == "SFT step (one batch of examples)"
    assert _lines(ax) == {"loss": ([1, 2], [2.0, 1.5])}
  finally:
    plt.close(fig)


@pytest.mark.parametrize("task, meaning", [("checks", "the operand's level (operands 1-3, 4-6, 7-9)"),
                                           ("steps", "the number of steps k")])
def test_adacs_report_names_the_tasks_difficulty_and_its_sources(task, meaning):
  import matplotlib.pyplot as plt
  c = load_config("tiny.py")
  c.data.task = task
  tiers = {"0.250": {"n": 2, "median": 90.0, "mean": 90.0}, "0.875": {"n": 3, "median": 60.0, "mean": 61.0}}
  report = {"length_vs_pass_rate": {"before_selection": {"synthetic_+": tiers},
                                    "after_selection": {"synthetic_+": tiers}},
            "anchors": {"synthetic_+": [100.0, 50.0]},
            "policy_length_by_difficulty": {"before SFT": {"1": 80.0, "2": 81.0, "3": 79.0},
                                            "after SFT": {"1": 60.0, "2": 80.0, "3": 100.0}},
            "difficulty": results.difficulty_axis(c),
            "source_titles": results.source_titles(c, ["synthetic_+"])}
  fig = report_figure(report)
  try:
    source, policy = fig.axes
    assert source.get_title() == "teacher traces: synthetic task (mod 10, op +)"
    assert source.get_xlabel() == "pass rate p (fraction of samples correct)"
    assert source.get_ylabel() == "response length (tokens, median)"
    assert policy.get_xlabel() == f"difficulty: {meaning}"
    np.testing.assert_array_equal(policy.get_xticks(), [1, 2, 3])  # the levels present, not 1.5 and 2.5
    assert [t.get_text() for t in policy.get_xticklabels()] == ["1", "2", "3"]
    assert _lines(policy)["after SFT"] == ([1.0, 2.0, 3.0], [60.0, 80.0, 100.0])
  finally:
    plt.close(fig)


def test_source_titles_keep_a_datasets_own_names():
  c = load_config("tiny.py")
  c.data.ops = "+-*"
  assert results.source_titles(c, ["synthetic_+-*", "ViRL39K"]) == {
      "synthetic_+-*": "synthetic task (mod 10, ops + - *)", "ViRL39K": "ViRL39K"}
