"""Step metrics to `{workdir}/metrics.jsonl` and TensorBoard event files."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

from ares_jax import sharding


class MetricsWriter:
  """Appends one JSON object per step; mirrors scalars to TensorBoard (tensorboardX) when available.

  On resume, lines for steps after the restored checkpoint are dropped first, so the file reads as
  one uninterrupted run.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._primary = sharding.is_primary()  # one writer in a multi-process run
    if not self._primary:
      return
    os.makedirs(workdir, exist_ok=True)
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(keep)
    elif resume_step is None and os.path.exists(self.path):
      os.remove(self.path)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # metrics.jsonl is always written
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> dict:
    row = {"step": int(step)}
    for k, v in sorted(metrics.items()):
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else None
    if not self._primary:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


CURVES = (("accuracy", ("accuracy/easy", "accuracy/medium", "accuracy/hard", "accuracy/mean", "eval/accuracy")),
          ("response length", ("length/easy", "length/medium", "length/hard")),
          ("N_HE", ("n_he/easy", "n_he/medium", "n_he/hard")),
          ("reward / KL", ("reward/mean", "kl", "tau_high")))


def plot_curves(workdir: str, panels=CURVES, filename: str = "curves.png") -> str:
  """Draws the metrics of `metrics.jsonl` against the step, one panel per group; returns the PNG path
  (drawn by process 0 only)."""
  path = os.path.join(workdir, filename)
  if not sharding.is_primary():
    return path
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_metrics(workdir)
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  for ax, (title, keys) in zip(np.atleast_1d(axes), panels):
    for key in keys:
      pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), marker="o" if key.startswith("eval/") else None, markersize=3, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
