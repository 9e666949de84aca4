"""AdaCS selection (docs/design.md §6.3) on hand-worked cases and properties."""

import numpy as np
import pytest

from ares_jax import adacs


def q(id_, p, lengths, correct=None, source="s"):
  correct = correct if correct is not None else [True] * len(lengths)
  return {"id": id_, "source": source, "pass_rate": p,
          "candidates": [{"length": n, "correct": c} for n, c in zip(lengths, correct)]}


def test_target_length_interpolates_between_the_anchors():
  assert adacs.target_length(0.0, 400, 100) == 400 and adacs.target_length(1.0, 400, 100) == 100
  assert adacs.target_length(0.25, 400, 100) == pytest.approx(325)
  np.testing.assert_allclose(adacs.target_length(np.array([0, 0.5, 1]), 300, 100), [300, 200, 100])


def test_anchors_are_medians_of_correct_candidates_per_source():
  qs = [q("a", 0.0, [300, 500, 900], [True, True, False]), q("b", 0.0, [100]),
        q("c", 1.0, [50, 70]), q("d", 0.5, [1000]),
        q("e", 0.0, [40], source="t"), q("f", 1.0, [20], source="t")]
  anchors = adacs.anchor_lengths(qs)
  assert anchors["s"] == (300.0, 60.0)  # median of 300, 500, 100 (900 is wrong); median of 50, 70
  assert anchors["t"] == (40.0, 20.0)


def test_closest_correct_candidate_ties_go_to_the_shorter():
  cands = [{"length": 110, "correct": True}, {"length": 90, "correct": True}, {"length": 100, "correct": False}]
  assert adacs.closest_candidate(cands, 100) == 1  # 90 and 110 tie; the wrong 100 is never taken
  assert adacs.closest_candidate(cands, 108) == 0
  assert adacs.closest_candidate([{"length": 5, "correct": False}], 5) is None


def test_select_hand_worked():
  qs = [q("hard1", 0.0, [400, 200]), q("hard2", 0.0, [300, 800]),
        q("easy1", 1.0, [100, 40]), q("easy2", 1.0, [60]),
        q("mid", 0.5, [90, 150, 260]), q("none", 0.5, [120], [False])]
  plan = {row["id"]: row for row in adacs.select(qs, budget=10)}
  # L(0) = median(400, 200, 300, 800) = 350; L(1) = median(100, 40, 60) = 60; L(0.5) = 205
  assert set(plan) == {"hard1", "hard2", "easy1", "easy2", "mid"}  # "none" has no correct candidate
  # 150 and 260 are both 55 away from 205: the shorter wins
  assert plan["mid"]["target_length"] == pytest.approx(205) and plan["mid"]["candidate"] == 1
  assert plan["hard1"]["candidate"] == 0 and plan["hard2"]["candidate"] == 0  # 400 and 300 closest to 350
  assert plan["easy1"]["candidate"] == 1 and plan["easy2"]["candidate"] == 0
  assert plan["hard1"]["tier"] == 0.0 and plan["mid"]["tier"] == 0.5


def test_water_filling_quotas():
  assert adacs.water_fill([2, 10, 10], 12) == [2, 5, 5]
  assert adacs.water_fill([2, 10, 10], 13) == [2, 6, 5]
  assert adacs.water_fill([3, 3], 100) == [3, 3]
  assert adacs.water_fill([], 5) == []
  rng = np.random.default_rng(0)
  for _ in range(200):
    sizes = rng.integers(0, 30, size=rng.integers(1, 8)).tolist()
    budget = int(rng.integers(0, 120))
    quota = adacs.water_fill(sizes, budget)
    assert sum(quota) == min(budget, sum(sizes))
    assert all(0 <= k <= n for k, n in zip(quota, sizes))
    top = max(quota, default=0)
    assert all(k == n for k, n in zip(quota, sizes) if k < top - 1)  # below the level: all taken
    assert all(k >= top - 1 for k, n in zip(quota, sizes) if k < n)  # tiers cut short are level


def test_select_fills_tiers_evenly_and_is_seeded():
  rng = np.random.default_rng(1)
  qs = []
  for i in range(40):  # tier sizes: p=0: 20, p=0.5: 15, p=1: 5 (all eligible)
    p = 0.0 if i < 20 else 0.5 if i < 35 else 1.0
    qs.append(q(f"q{i}", p, rng.integers(20, 400, 3).tolist()))
  plan = adacs.select(qs, budget=21, seed=3)
  counts = {p: sum(r["tier"] == p for r in plan) for p in (0.0, 0.5, 1.0)}
  assert counts == {0.0: 8, 0.5: 8, 1.0: 5}
  assert [r["id"] for r in plan] == [r["id"] for r in adacs.select(qs, budget=21, seed=3)]
  assert [r["id"] for r in plan] != [r["id"] for r in adacs.select(qs, budget=21, seed=4)]
  lengths = {x["id"]: x for x in qs}
  for r in plan:  # the kept candidate is the closest correct one to its target
    cands = lengths[r["id"]]["candidates"]
    best = min(abs(c["length"] - r["target_length"]) for c in cands if c["correct"])
    assert abs(cands[r["candidate"]]["length"] - r["target_length"]) == best
