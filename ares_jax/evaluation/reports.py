"""Evaluation files in `{workdir}/eval/`: `<name>.jsonl` (one row per item and sample), `report.json`,
`report.md` (benchmark x accuracy x mean tokens) and `report.png` (accuracy against tokens).

Every file is written whole to a temporary name and renamed into place (ares_jax.storage; the folder may
be `gs://`), so a run killed mid-write never leaves a half file for `eval.rescore` or a reader to trip on.
Callers write on process 0 only.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import numpy as np

from ares_jax import storage

# The fields of a `<name>.jsonl` row (issue 11); the rest (item, sample, id, category, source, extra) are
# what rescoring and regrouping need.
ROW_FIELDS = ("index", "question", "answer", "options", "prediction", "extracted", "correct", "tokens", "group")


def _json_default(x: Any) -> Any:
  """numpy scalars and arrays as their Python values (row values come from parquet / TSV readers)."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `path` whole and atomically (storage.write_bytes)."""
  storage.write_bytes(path, data if isinstance(data, bytes) else data.encode("utf-8"))


def write_records(path: str, records: Iterable[Mapping[str, Any]]) -> None:
  """`records` as JSON lines, atomically."""
  storage.write_jsonl(path, records, default=_json_default)


def read_records(path: str) -> list[dict[str, Any]]:
  return storage.read_jsonl(path)


def read_json(path: str) -> Any:
  return storage.read_json(path)


def _fmt(x: float) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def markdown(report: Mapping[str, Mapping[str, Any]]) -> str:
  """A table: benchmark, items, accuracy (worst case over groups when grouped), item accuracy, mean
  response tokens, and WeMath's strict / loose scores where they apply."""
  lines = ["| benchmark | n | accuracy | accuracy (items) | mean tokens | note |", "|---|---:|---:|---:|---:|---|"]
  for name, r in report.items():
    notes = []
    if "groups" in r:
      notes.append(f"worst case over {r['groups']} groups")
    if "wemath" in r:
      notes.append(f"WeMath strict {_fmt(r['wemath']['score_strict'])}, loose {_fmt(r['wemath']['score_loose'])}")
    if r.get("samples", 1) > 1:
      notes.append(f"avg@{r['samples']}")
    lines.append(f"| {name} | {r['n']} | {_fmt(r['accuracy'])} | {_fmt(r['accuracy_items'])} | "
                 f"{r['tokens']:.1f} | {'; '.join(notes)} |")
  return "\n".join(lines) + "\n"


def plot(report: Mapping[str, Mapping[str, Any]], path: str) -> None:
  """Accuracy against mean response tokens, one labelled point per benchmark (ARES reports both)."""
  import matplotlib  # matplotlib is slow to import: only where a plot is drawn
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # matplotlib is slow to import: only where a plot is drawn

  fig, ax = plt.subplots(figsize=(6, 4.5))
  for name, r in report.items():
    ax.scatter([r["tokens"]], [r["accuracy"]], s=40)
    ax.annotate(name, (r["tokens"], r["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ax.set_xlabel("mean response tokens")
  ax.set_ylabel("accuracy")
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.set_title("accuracy vs response length")
  fig.tight_layout()
  storage.save_figure(fig, path, dpi=100)
  plt.close(fig)


def write_reports(eval_dir: str, report: Mapping[str, Mapping[str, Any]]) -> None:
  """`report.json`, `report.md` and `report.png` of `report` ({benchmark: summary}) in `eval_dir`."""
  storage.makedirs(eval_dir)
  atomic_write(os.path.join(eval_dir, "report.json"), json.dumps(report, indent=1, default=_json_default))
  atomic_write(os.path.join(eval_dir, "report.md"), markdown(report))
  plot(report, os.path.join(eval_dir, "report.png"))
