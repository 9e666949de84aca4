"""The short table a training stage (`adacs`, `aepo`, `ares`) ends with: held-out accuracy and mean response
tokens per difficulty level (and per benchmark, when the run evaluated benchmarks) at each evaluation it
compares, Spearman(tokens, difficulty), and where the run's plots, metrics and policy are.

The numbers are the records the run already wrote (the `eval/*` metrics of `held_out.evaluate` in
metrics.jsonl or AdaCS's report, and `eval/<benchmark>/accuracy|tokens`): nothing is evaluated again.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Sequence

SPEARMAN = "eval/spearman_length_vs_difficulty"
_LEVEL = re.compile(r"eval/accuracy_d(.+)")
_BENCHMARK = re.compile(r"eval/(.+)/accuracy")
_CELL = 9  # one number's width


@dataclasses.dataclass(frozen=True)
class Column:
  """One evaluation: its heading ("before SFT", "step 60") and its `eval/*` record."""

  label: str
  record: Mapping[str, Any]


def _sort_key(level: str) -> tuple:
  try:
    return (0, float(level), level)
  except ValueError:
    return (1, 0.0, level)


def levels(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """The difficulty levels any record holds (`eval/accuracy_d{level}`), in numeric order."""
  found = {m.group(1) for r in records for k in r if (m := _LEVEL.fullmatch(k))}
  return sorted(found, key=_sort_key)


def benchmarks(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """The benchmarks any record holds (`eval/{name}/accuracy`), in name order."""
  return sorted({m.group(1) for r in records for k in r if (m := _BENCHMARK.fullmatch(k))})


def _number(x: Any, digits: int) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"  # absent from that evaluation, or not finite (metrics.jsonl writes those as null)
  return f"{float(x):.{digits}f}"


def result_table(title: str, columns: Sequence[Column], where: Sequence[tuple[str, str]] = (),
                 notes: Sequence[str] = ()) -> str:
  """The table as text: a title line; per column its accuracy (fraction correct) and mean response tokens
  for each difficulty level, all levels together and each benchmark; a Spearman(tokens, difficulty) row
  when any record has it; then `notes` one line each and `where`, (what, path) pairs one line each (an
  empty `what` continues the line above). A level or value an evaluation lacks reads "-". Without columns
  the table says that no held-out evaluation was recorded."""
  records = [c.record for c in columns]
  pair = lambda acc, tokens: (_number(acc, 3), _number(tokens, 1))
  rows: list[tuple[str, list[tuple[str, str]]]] = []
  for d in levels(records):
    rows.append((f"level {d}", [pair(r.get(f"eval/accuracy_d{d}"), r.get(f"eval/length_d{d}")) for r in records]))
  if any("eval/accuracy" in r for r in records):
    rows.append(("all levels" if rows else "held-out",
                 [pair(r.get("eval/accuracy"), r.get("eval/length")) for r in records]))
  for name in benchmarks(records):
    rows.append((name, [pair(r.get(f"eval/{name}/accuracy"), r.get(f"eval/{name}/tokens")) for r in records]))
  spearman = "Spearman(tokens, difficulty)"
  has_spearman = any(SPEARMAN in r for r in records)
  lines = [title]
  if not rows:
    lines.append("  no held-out evaluation was recorded")
  else:
    first = max([len(label) for label, _ in rows] + ([len(spearman)] if has_spearman else []))
    group = max([2 * _CELL + 1] + [len(c.label) for c in columns])  # a column's accuracy and tokens
    acc = group - _CELL - 1
    lines.append(" " * first + "".join(f" {c.label:>{group}s}" for c in columns))
    lines.append(" " * first + f" {'accuracy':>{acc}s} {'tokens':>{_CELL}s}" * len(columns))
    for label, cells in rows:
      lines.append(f"{label:<{first}s}" + "".join(f" {a:>{acc}s} {t:>{_CELL}s}" for a, t in cells))
    if has_spearman:
      # one coefficient per evaluation, under its accuracy and tokens together
      lines.append(f"{spearman:<{first}s}" + "".join(f" {_number(r.get(SPEARMAN), 3):>{group}s}" for r in records))
  lines += list(notes)
  width = max((len(what) for what, _ in where), default=0) + 1
  lines += [f"{what + ':' if what else '':<{width}s} {path}" for what, path in where]
  return "\n".join(lines)
