"""The built-in clip tasks (`data/motion.py`): each answer is carried by the frames' order and only by it,
the levels get harder, the files read back as the reader reads a video dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ares_jax.data import motion


def _brightness(clip: np.ndarray) -> np.ndarray:
  return clip.astype(np.float64).mean(axis=(1, 2, 3))  # [T]


def test_fade_clips_change_brightness_the_way_the_answer_says_about_a_mean_that_does_not_tell():
  trend, means = {"brighter": [], "darker": []}, {"brighter": [], "darker": []}
  by_level = {level: [] for level in motion.LEVELS}
  for i in range(240):
    clip = motion.frames(0, i, task="fade")
    a, b = _brightness(clip), motion.answer(0, i, "fade")
    slope = np.polyfit(np.arange(len(a)), a, 1)[0]
    trend[b].append(slope)
    means[b].append(a.mean())
    by_level[motion.difficulty(0, i)].append(abs(a[-1] - a[0]))
  assert all(s > 0 for s in trend["brighter"]) and all(s < 0 for s in trend["darker"])
  # the clip's mean brightness (all that frames without their order show) is drawn apart from the answer
  gap = abs(np.mean(means["brighter"]) - np.mean(means["darker"]))
  assert gap < 4 * np.std(means["brighter"]) / np.sqrt(len(means["brighter"]))
  level_change = [np.mean(by_level[level]) for level in motion.LEVELS]
  assert level_change[0] > level_change[1] > level_change[2]
  np.testing.assert_allclose(level_change, [motion.FADE[level] for level in motion.LEVELS], rtol=0.15)


def test_dot_clips_move_the_dot_the_way_the_answer_says():
  for i in range(30):
    clip = motion.frames(0, i, task="dot").astype(np.float64).mean(-1)  # [T, H, W]
    xs = [np.argwhere(frame > 200)[:, 1].mean() for frame in clip]
    assert (xs[-1] > xs[0]) == (motion.answer(0, i, "dot") == "right")


def test_written_rows_match_their_clips_and_a_coldstart_pool_teaches_only_the_format(tmp_path):
  path = motion.write_dataset(str(tmp_path), 6, seed=1, task="fade")
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert [r["id"] for r in rows] == [f"fade-1-{i}" for i in range(6)]
  assert all(r["answer"] == motion.answer(1, i, "fade") and r["question"].startswith(motion.PLACEHOLDER)
             for i, r in enumerate(rows))
  pool = motion.write_dataset(str(tmp_path), 200, seed=1, task="fade", coldstart=True, n_frames=2, size=(16, 16))
  pool_rows = [json.loads(line) for line in open(pool, encoding="utf-8")]
  named = [r["response"].endswith(f"\\boxed{{{r['answer']}}}") for r in pool_rows]
  assert 0.35 < np.mean(named) < 0.65  # truth_rate 0.5: the response names the clip's answer half the time
  assert all(int(r["id"].split("-")[-1]) >= motion.COLDSTART_FIRST for r in pool_rows)  # apart from training


def test_an_unknown_task_is_named():
  with pytest.raises(ValueError, match=r"task='spin': the clip tasks are \['dot', 'fade'\]"):
    motion.frames(0, 0, task="spin")
