"""Benchmark scores from judged records: item accuracy (avg@k), the worst case over groups (DynaMath),
WeMath's four-dimensional score, per-category accuracy, mean response tokens. Pure functions.

A record is one dict per item and sample, as written to `<name>.jsonl`: `item` (the item's position),
`sample`, `correct`, `tokens`, `group` (None when the benchmark is not grouped), `category`, `extra`.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

# WeMath's `key` column: "2steps_1", "2steps_2", "2steps_multi", "3steps_1", ... (VLMEvalKit's TSV).
_WEMATH_KEY = re.compile(r"([23])steps_(\d+|multi)")


def group_accuracy(groups: Sequence[Any], correct: Sequence[bool]) -> tuple[float, int]:
  """Worst case over groups: a group counts as right only if every one of its rows is right (DynaMath's
  worst-case accuracy: a seed question with one wrong variant is wrong). Returns (accuracy, #groups)."""
  ok: dict[Any, bool] = {}
  for g, c in zip(groups, correct):
    ok[g] = ok.get(g, True) and bool(c)
  return (float(np.mean(list(ok.values()))) if ok else float("nan")), len(ok)


def wemath_counts(entries: Iterable[tuple[Any, str, bool]]) -> dict[str, int] | None:
  """WeMath's four dimensions over its composite problems, from (problem ID, key, correct) per row.

  A composite problem is a k-step question (`key` "ksteps_multi", k = 2 or 3) with its k one-step
  sub-questions ("ksteps_1".."ksteps_k") under the same ID. With S = the sub-questions right and M = the
  composite right: IG (inadequate generalisation) = all S and not M; IK (insufficient knowledge) = not
  all S and not M; CM (complete mastery) = M and all S (strict) or any S (loose); RM (rote memorisation)
  = M and not all S (strict) or no S (loose). Problems missing a row are left out; None if no problem is
  complete (the benchmark is not WeMath-shaped).
  """
  subs: dict[tuple[str, Any], dict[str, bool]] = collections.defaultdict(dict)
  for pid, key, correct in entries:
    m = _WEMATH_KEY.fullmatch(str(key).strip())
    if m:
      subs[(m.group(1), pid)][m.group(2)] = bool(correct)
  counts = dict(problems=0, IG=0, IK=0, CM_strict=0, CM_loose=0, RM_strict=0, RM_loose=0)
  for (steps, _), rows in subs.items():
    parts = [str(i) for i in range(1, int(steps) + 1)]
    if "multi" not in rows or any(p not in rows for p in parts):
      continue
    every, some, multi = all(rows[p] for p in parts), any(rows[p] for p in parts), rows["multi"]
    counts["problems"] += 1
    counts["IG"] += every and not multi
    counts["IK"] += (not every) and not multi
    counts["CM_strict"] += every and multi
    counts["CM_loose"] += some and multi
    counts["RM_strict"] += (not every) and multi
    counts["RM_loose"] += (not some) and multi
  return counts if counts["problems"] else None


def wemath_score(counts: Mapping[str, int]) -> dict[str, float]:
  """Score = (N - 0.5 IG - RM - IK) / N with RM strict or loose, N = composite problems found (525 in the
  full WeMath, which VLMEvalKit hard-codes; a capped run uses its own N)."""
  n = counts["problems"]
  base = n - 0.5 * counts["IG"] - counts["IK"]
  return {"score_strict": (base - counts["RM_strict"]) / n, "score_loose": (base - counts["RM_loose"]) / n}


def wemath_entry(record: Mapping[str, Any]) -> tuple[Any, str] | None:
  """(problem ID, key) of a record that carries WeMath's `key` column, else None. The ID is its `ID`
  column, or the row id when the reader took a lowercase `id` column as the id."""
  extra = record.get("extra") or {}
  key = next((k for k in extra if k.lower() == "key"), None)
  if key is None or not _WEMATH_KEY.fullmatch(str(extra[key]).strip()):
    return None
  pid = next((k for k in extra if k.lower() == "id"), None)
  return (extra[pid] if pid is not None else record.get("id")), str(extra[key])


def wemath(records: Sequence[Mapping[str, Any]]) -> dict[str, float] | None:
  """WeMath's strict and loose scores (and the counts) when the records carry its `ID` and `key` columns,
  averaged over samples (each sample index scored as one run); None otherwise."""
  by_sample: dict[int, list] = collections.defaultdict(list)
  for r in records:
    entry = wemath_entry(r)
    if entry is not None:
      by_sample[int(r.get("sample", 0))].append((*entry, r["correct"]))
  runs = [c for c in (wemath_counts(e) for e in by_sample.values()) if c is not None]
  if not runs:
    return None
  out = {k: float(np.mean([c[k] for c in runs])) for k in runs[0]}
  out.update({k: float(np.mean([wemath_score(c)[k] for c in runs])) for k in ("score_strict", "score_loose")})
  return out


def summarize(records: Sequence[Mapping[str, Any]], grouped: bool) -> dict[str, Any]:
  """The report entry of one benchmark: `accuracy` (the worst case over groups when `grouped`, else equal
  to `accuracy_items`), `accuracy_items` (mean over items and samples: avg@k), `tokens` (mean response
  tokens), `n` (items), `samples`, `per_category`, and `groups` / `wemath` when they apply."""
  correct = [bool(r["correct"]) for r in records]
  tokens = [float(r["tokens"]) for r in records]
  items = {r["item"] for r in records}
  acc = float(np.mean(correct)) if correct else float("nan")
  out: dict[str, Any] = {"accuracy": acc, "accuracy_items": acc,
                         "tokens": float(np.mean(tokens)) if tokens else float("nan"), "n": len(items),
                         "samples": len({r.get("sample", 0) for r in records})}
  if grouped:
    # a row without a value of the group column stands alone
    groups = [r["group"] if r.get("group") is not None else ("item", r["item"]) for r in records]
    out["accuracy"], out["groups"] = group_accuracy(groups, correct)
  cats: dict[str, list] = collections.defaultdict(list)
  for r in records:
    if r.get("category") not in (None, ""):
      cats[str(r["category"])].append(r)
  out["per_category"] = {c: {"accuracy": float(np.mean([bool(r["correct"]) for r in rs])),
                             "tokens": float(np.mean([float(r["tokens"]) for r in rs])),
                             "n": len({r["item"] for r in rs})} for c, rs in sorted(cats.items())}
  w = wemath(records)
  if w is not None:
    out["wemath"] = w
  return out
