"""Training curves: the metrics of `{workdir}/metrics.jsonl` against the step, one panel per `Panel`, every
axis labelled; drawn as a PNG by process 0. Stages say what their panels hold (stages/results.py)."""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

from ares_jax import sharding, storage
from ares_jax.train.metrics import read_metrics


@dataclasses.dataclass(frozen=True)
class Series:
  """Lines of a panel: one per metric whose name matches `key` (a regular expression; with a group, what it
  captures fills the `{}` of `label`). A metric missing at steps between its first and last (`eval/*`, logged
  every few steps; `kl`, absent where a step had nothing to update) is drawn with markers, as is a single
  point, so that every value shows."""

  key: str
  label: str
  dashed: bool = False


@dataclasses.dataclass(frozen=True)
class Panel:
  title: str
  ylabel: str  # with the unit
  series: tuple[Series, ...]
  legend_title: str = ""
  ylim: tuple[float, float] | None = None


def _natural(name: str) -> tuple:
  """Sorts "eval/length_d10" after "eval/length_d9"."""
  return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name))


def lines(rows: Sequence[dict[str, Any]], series: Series) -> list[tuple[str, list[int], list[float]]]:
  """(label, steps, values) of every metric in `rows` that `series` matches, in natural name order; a step
  where a metric is missing or null (not finite) is left out."""
  pattern = re.compile(series.key)
  names = sorted({k for r in rows for k in r if k != "step" and pattern.fullmatch(k)}, key=_natural)
  out = []
  for name in names:
    pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
    if pts:
      steps, values = zip(*pts)
      out.append((series.label.format(*pattern.fullmatch(name).groups()), list(steps), list(values)))
  return out


def curves_figure(rows: Sequence[dict[str, Any]], panels: Sequence[Panel], xlabel: str, columns: int = 3):
  """A matplotlib figure of `panels` drawn from `rows` (metrics.jsonl records), `columns` panels a row;
  `fig.axes` holds the panels in order. A panel with nothing to draw says so."""
  import matplotlib  # matplotlib is slow to import: only where a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn
  from matplotlib.ticker import MaxNLocator  # matplotlib is slow to import: only where a plot is drawn

  columns = max(1, min(columns, len(panels)))
  nrows = -(-len(panels) // columns)
  fig, axes = plt.subplots(nrows, columns, figsize=(4.6 * columns, 3.6 * nrows), squeeze=False)
  axes = axes.reshape(-1)
  for ax in axes[len(panels):]:
    fig.delaxes(ax)
  steps_seen = sorted({r["step"] for r in rows})
  for ax, panel in zip(axes, panels):
    drawn = 0
    for s in panel.series:
      for label, steps, values in lines(rows, s):
        between = sum(steps[0] <= r["step"] <= steps[-1] for r in rows)
        sparse = len(steps) == 1 or len(steps) < between  # gaps between its first and last step
        ax.plot(steps, values, "--" if s.dashed else "-", marker="o" if sparse else None, markersize=3, label=label)
        drawn += 1
    if drawn:
      ax.legend(fontsize=7, title=panel.legend_title or None, title_fontsize=7, framealpha=0.6)
    else:
      ax.text(0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", transform=ax.transAxes, color="gray")
    if panel.ylim is not None:
      ax.set_ylim(*panel.ylim)
    ax.set_title(panel.title, fontsize=10)
    if len(steps_seen) > 1:  # every panel over the same steps, side by side comparable
      pad = 0.03 * (steps_seen[-1] - steps_seen[0])
      ax.set_xlim(steps_seen[0] - pad, steps_seen[-1] + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole
    ax.set_xlabel(xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def plot_curves(workdir: str, panels: Sequence[Panel], xlabel: str, filename: str = "curves.png",
                columns: int = 3) -> str:
  """`curves_figure` of `{workdir}/metrics.jsonl` written to `{workdir}/{filename}` (by process 0 only);
  returns the PNG's path."""
  path = os.path.join(workdir, filename)
  if not sharding.is_primary():
    return path
  fig = curves_figure(read_metrics(workdir), panels, xlabel, columns)  # selects the file-only backend first
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)
  return path

