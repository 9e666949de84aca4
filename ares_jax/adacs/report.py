"""The AdaCS report: response length against pass rate per source, before and after selection, and
the policy's length-difficulty correlation; `adacs_report.json` and `adacs_report.png` in the workdir."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from scipy import stats

from ares_jax import storage


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (ties get average ranks); NaN when either side is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  return float(stats.spearmanr(x, y).statistic)


def length_by_pass_rate(questions: Sequence[dict], chosen: dict[str, int] | None = None) -> dict[str, dict]:
  """source -> {pass rate: {"n", "median", "mean"}} of token lengths.

  Before selection (`chosen` None): every correct candidate of every question. After: the chosen
  candidate of each selected question (`chosen`: id -> candidate index).
  """
  out: dict[str, dict[float, list[int]]] = {}
  for q in questions:
    if q["pass_rate"] is None:
      continue
    if chosen is None:
      lengths = [c["length"] for c in q["candidates"] if c["correct"]]
    elif q["id"] in chosen:
      lengths = [q["candidates"][chosen[q["id"]]]["length"]]
    else:
      continue
    out.setdefault(q["source"], {}).setdefault(float(q["pass_rate"]), []).extend(lengths)
  return {s: {f"{p:.3f}": {"n": len(v), "median": float(np.median(v)), "mean": float(np.mean(v))}
              for p, v in sorted(tiers.items()) if v}
          for s, tiers in out.items()}


def write_report(workdir: str, report: dict[str, Any]) -> tuple[str, str]:
  """Writes the JSON report and its plot, each atomically (`workdir` may be `gs://`); returns both paths."""
  path = os.path.join(workdir, "adacs_report.json")
  storage.write_json(path, report, indent=1)
  return path, plot_report(workdir, report)


def report_figure(report: dict[str, Any]):
  """One panel per source: median response length against pass rate, before and after selection; a last
  panel with the policy's mean response length per held-out difficulty level before and after SFT, its x axis
  named by `report["difficulty"]` (what a level counts) with a tick at each level. Panel titles name sources
  by `report["source_titles"]` where it has them."""
  import matplotlib  # matplotlib is slow to import: only where a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn

  sources = sorted(report["length_vs_pass_rate"]["before_selection"])
  titles = report.get("source_titles", {})
  by_stage = report.get("policy_length_by_difficulty") or {}
  panels = len(sources) + (1 if any(by_stage.values()) else 0)
  fig, axes = plt.subplots(1, max(panels, 1), figsize=(4.6 * max(panels, 1), 3.6))
  axes = np.atleast_1d(axes)
  for ax, source in zip(axes, sources):
    for stage, style in (("before_selection", "o--"), ("after_selection", "s-")):
      tiers = report["length_vs_pass_rate"][stage].get(source, {})
      if tiers:
        ax.plot([float(p) for p in tiers], [t["median"] for t in tiers.values()], style,
                label=stage.replace("_", " "))
    l0, l1 = report["anchors"].get(source, (None, None))
    if l0 is not None:
      ax.plot([0, 1], [l0, l1], ":", color="gray", label="target length L(p)")
    ax.set_title(f"teacher traces: {titles.get(source, source)}", fontsize=10)
    ax.set_xlabel("pass rate p (fraction of samples correct)")
    ax.set_ylabel("response length (tokens, median)")
    ax.legend(fontsize=7)
  if any(by_stage.values()):
    ax = axes[-1]
    levels = set()
    for stage, by_d in by_stage.items():
      ds = sorted(by_d, key=float)
      levels.update(float(d) for d in ds)
      ax.plot([float(d) for d in ds], [by_d[d] for d in ds], "o-", label=stage)
    ax.set_xticks(sorted(levels))
    ax.set_xticklabels([f"{d:g}" for d in sorted(levels)])
    ax.set_title("policy on held-out problems", fontsize=10)
    ax.set_xlabel(report.get("difficulty", "difficulty level"))
    ax.set_ylabel("response length (tokens, mean)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_report(workdir: str, report: dict[str, Any]) -> str:
  """`report_figure` as `{workdir}/adacs_report.png`; returns its path."""
  fig = report_figure(report)  # selects matplotlib's file-only backend before pyplot is imported here
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn
  path = os.path.join(workdir, "adacs_report.png")
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return path
