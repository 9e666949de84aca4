"""What the training stages show at their end: the plots' panels, named in the task's own terms (what a
difficulty level counts, readable source names), and the table each stage prints last
(evaluation/summary.py), read from the records the run wrote.

  adacs  before SFT | after SFT                      (adacs_report.json's held-out evaluations)
  aepo   step 0     | its last evaluated step        (`eval/*` of metrics.jsonl)
  ares   before AdaCS | after AdaCS | after AEPO     (both of the above; as reproductions/law.py compares)
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections

from ares_jax import storage
from ares_jax.data import synthetic
from ares_jax.evaluation import summary
from ares_jax.train.curves import Panel, Series

HELD_OUT_TITLE = "held-out accuracy (fraction correct) and mean response tokens"


def difficulty_meaning(config: ml_collections.ConfigDict) -> str:
  """What a difficulty level counts in this run's data."""
  if config.data.kind == "synthetic":
    return synthetic.difficulty_meaning(config.data.task)
  return "the data's difficulty column"


def difficulty_axis(config: ml_collections.ConfigDict) -> str:
  """The label of an axis or legend of difficulty levels."""
  return f"difficulty: {difficulty_meaning(config)}"


def source_titles(config: ml_collections.ConfigDict, sources) -> dict[str, str]:
  """Readable names of AdaCS pool sources: the synthetic pool's `synthetic_<ops>` as the task it is; a
  dataset's own source names as they are."""
  ops = config.data.ops
  return {s: (f"synthetic task (mod 10, {'op' if len(ops) == 1 else 'ops'} {' '.join(ops)})"
              if s == f"synthetic_{ops}" else s) for s in sources}


def aepo_panels(config: ml_collections.ConfigDict) -> tuple[Panel, ...]:
  """`curves.png`: held-out accuracy and response length per difficulty level (and benchmark) over steps,
  N_HE per training-batch bin, then the reward, KL and tau_high each on its own axes."""
  levels = difficulty_axis(config)
  return (
      Panel("held-out accuracy per difficulty level", "accuracy (fraction correct)",
            (Series(r"eval/accuracy_d(.+)", "level {}"), Series("eval/accuracy", "all levels", dashed=True),
             Series(r"eval/(.+)/accuracy", "{}")), legend_title=levels, ylim=(-0.02, 1.02)),
      Panel("held-out response length per difficulty level", "response length (tokens, mean)",
            (Series(r"eval/length_d(.+)", "level {}"), Series("eval/length", "all levels", dashed=True),
             Series(r"eval/(.+)/tokens", "{}")), legend_title=levels),
      Panel("N_HE per training-batch difficulty bin", "N_HE (high-entropy windows per response)",
            tuple(Series(f"n_he/{b}", b) for b in ("easy", "medium", "hard")),
            legend_title="bin (by its rollouts' accuracy)"),
      Panel("training reward", "reward (mean per trajectory)", (Series("reward/mean", "batch mean"),)),
      Panel("KL to the reference policy", "KL (k3 estimate, nats per token)", (Series("kl", "batch mean"),)),
      Panel("tau_high", "window-entropy threshold (nats)", (Series("tau_high", "tau_high"),)),
  )


AEPO_STEP = "AEPO step (one rollout batch)"
SFT_PANELS = (Panel("AdaCS SFT loss", "loss (mean NLL per assistant token, nats)", (Series("sft/loss", "loss"),)),)
SFT_STEP = "SFT step (one batch of examples)"


def _level_note(config: ml_collections.ConfigDict, columns: list[summary.Column]) -> list[str]:
  """What a level of the table counts, when it has levels."""
  return [f"level = {difficulty_meaning(config)}"] if summary.levels([c.record for c in columns]) else []


def aepo_evaluations(workdir: str) -> list[dict[str, Any]]:
  """The records of `{workdir}/metrics.jsonl` that hold a held-out or benchmark evaluation (none when the
  file is missing)."""
  rows = storage.read_jsonl(os.path.join(workdir, "metrics.jsonl"), missing_ok=True)
  return [r for r in rows if any(k.startswith("eval/") for k in r)]


def aepo_table(config: ml_collections.ConfigDict, curves: str) -> str:
  """AEPO's first and last evaluation (step 0 and its last evaluated step)."""
  evals = aepo_evaluations(config.workdir)
  columns = [summary.Column(f"step {r['step']}", r) for r in evals[:1] + evals[1:][-1:]]
  notes = (_level_note(config, columns) if evals
           else [f"(config.eval.every = {config.eval.every}: nothing evaluated)"])
  where = (("plots", curves), ("metrics", os.path.join(config.workdir, "metrics.jsonl")),
           ("policy", os.path.join(config.workdir, "policy")))
  return summary.result_table(f"AEPO: {HELD_OUT_TITLE}", columns, where, notes)


def adacs_columns(report: Mapping[str, Any], labels=("before SFT", "after SFT")) -> list[summary.Column]:
  """AdaCS's held-out evaluations before and after SFT (none without held-out prompts)."""
  pairs = zip(labels, (report.get("eval_before_sft") or {}, report.get("eval_after_sft") or {}))
  return [summary.Column(label, record) for label, record in pairs if record]


def adacs_table(config: ml_collections.ConfigDict, report: Mapping[str, Any]) -> str:
  wd = config.workdir
  columns = adacs_columns(report)
  notes = _level_note(config, columns) if columns else ["(no held-out prompts: AdaCS was not evaluated)"]
  where = (("report", os.path.join(wd, "adacs_report.json")), ("plots", os.path.join(wd, "adacs_report.png")),
           ("", os.path.join(wd, "sft_curves.png")), ("metrics", os.path.join(wd, "metrics.jsonl")),
           ("policy", os.path.join(wd, "policy")))
  return summary.result_table(f"AdaCS: {HELD_OUT_TITLE}", columns, where, notes)


def ares_table(config: ml_collections.ConfigDict, adacs_workdir: str, aepo_workdir: str) -> str:
  """Before AdaCS, after AdaCS (AdaCS's report) and after AEPO (its last evaluation)."""
  path = os.path.join(adacs_workdir, "adacs_report.json")
  report = storage.read_json(path) if storage.exists(path) else {}
  columns = adacs_columns(report, ("before AdaCS", "after AdaCS"))
  evals = aepo_evaluations(aepo_workdir)
  if evals:
    columns.append(summary.Column(f"after AEPO step {evals[-1]['step']}", evals[-1]))
  where = (("plots", os.path.join(adacs_workdir, "adacs_report.png")), ("", os.path.join(aepo_workdir, "curves.png")),
           ("metrics", os.path.join(aepo_workdir, "metrics.jsonl")), ("policy", os.path.join(aepo_workdir, "policy")))
  return summary.result_table(f"ARES: {HELD_OUT_TITLE}", columns, where, _level_note(config, columns))
