"""AdaCS data curation (docs/design.md §6.3): difficulty-aware target lengths and tiered selection.

Input questions: `{"id", "source", "pass_rate", "candidates": [{"length": int, "correct": bool}, ...]}`.
Per source, L(0) and L(1) are the medians of the lengths of correct candidates of questions with pass rate 0
and 1; L_target(p) = (1 - p) L(0) + p L(1). Every eligible question (one with a correct candidate) keeps the
correct candidate closest to L_target(p_q), ties going to the shorter. Tiers are the distinct pass rates; they
are filled evenly up to the budget by water-filling.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def target_length(p: float | np.ndarray, l0: float, l1: float) -> float | np.ndarray:
  """L_target(p) = (1 - p) * L(0) + p * L(1): longer responses for harder (low pass-rate) questions."""
  return (1.0 - np.asarray(p, np.float64)) * l0 + np.asarray(p, np.float64) * l1


def anchor_lengths(questions: Sequence[dict]) -> dict[str, tuple[float, float]]:
  """(L(0), L(1)) per source. **[decision]** A source without pass-rate-0 (or -1) questions that have a
  correct candidate uses its lowest (highest) pass-rate tier that has one; a source with no correct candidate
  at all gets no entry (its questions are ineligible)."""
  by_source: dict[str, dict[float, list[int]]] = {}
  for q in questions:
    lengths = [int(c["length"]) for c in q["candidates"] if c["correct"]]
    if lengths:
      by_source.setdefault(q["source"], {}).setdefault(float(q["pass_rate"]), []).extend(lengths)
  out = {}
  for source, tiers in by_source.items():
    rates = sorted(tiers)
    l0 = float(np.median(tiers[0.0] if 0.0 in tiers else tiers[rates[0]]))
    l1 = float(np.median(tiers[1.0] if 1.0 in tiers else tiers[rates[-1]]))
    out[source] = (l0, l1)
  return out


def closest_candidate(candidates: Sequence[dict], target: float) -> int | None:
  """Index of the correct candidate whose length is closest to `target` (ties: shorter, then first)."""
  best = None
  for i, c in enumerate(candidates):
    if not c["correct"]:
      continue
    key = (abs(int(c["length"]) - target), int(c["length"]), i)
    if best is None or key < best[0]:
      best = (key, i)
  return None if best is None else best[1]


def water_fill(sizes: Sequence[int], budget: int) -> list[int]:
  """Per-tier quotas: as equal as the tier sizes allow, summing to min(budget, total).

  The level c is the largest with sum(min(n_t, c)) <= budget; the remaining few go one each to the
  largest tiers still above c (then to the earlier tier). Every tier that gets fewer than the largest
  quota gets all its questions.
  """
  sizes = [int(s) for s in sizes]
  budget = min(int(budget), sum(sizes))
  lo, hi = 0, max(sizes, default=0)
  while lo < hi:  # largest c with sum(min(n, c)) <= budget
    mid = (lo + hi + 1) // 2
    if sum(min(n, mid) for n in sizes) <= budget:
      lo = mid
    else:
      hi = mid - 1
  quota = [min(n, lo) for n in sizes]
  extra = budget - sum(quota)
  for t in sorted(range(len(sizes)), key=lambda t: (-sizes[t], t)):
    if extra == 0:
      break
    if sizes[t] > quota[t]:
      quota[t] += 1
      extra -= 1
  return quota


def select(questions: Sequence[dict], budget: int, seed: int = 0) -> list[dict[str, Any]]:
  """The AdaCS plan: one `{"id", "candidate", "tier", "target_length"}` per chosen question.

  `candidate` is the index of the kept candidate in the question's `candidates`; `tier` its pass rate.
  Within a tier, which questions fill its quota is a seeded random draw.
  """
  anchors = anchor_lengths(questions)
  tiers: dict[float, list[dict[str, Any]]] = {}
  for q in questions:
    if q["source"] not in anchors:
      continue
    p = float(q["pass_rate"])
    target = float(target_length(p, *anchors[q["source"]]))
    cand = closest_candidate(q["candidates"], target)
    if cand is not None:
      tiers.setdefault(p, []).append({"id": q["id"], "candidate": cand, "tier": p, "target_length": target})
  rates = sorted(tiers)
  quotas = water_fill([len(tiers[p]) for p in rates], budget)
  rng = np.random.default_rng(seed)
  plan = []
  for p, k in zip(rates, quotas):
    members = tiers[p]
    picks = sorted(rng.choice(len(members), size=k, replace=False)) if k < len(members) else range(len(members))
    plan.extend(members[i] for i in picks)
  return plan
