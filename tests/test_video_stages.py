"""Videos through the stages on the tiny model: clips written with PyAV (`data.motion`'s fade task: a clip
getting brighter or darker) read from files by `sample`, `eval` (a benchmark whose rows carry videos) and
AdaCS then AEPO on a video dataset, a clip that cannot be decoded skipped and counted with its location."""

from __future__ import annotations

import json
import os

import pytest

from ares_jax.data import motion
from tiny_configs import load_config, small_rl

FADE = motion.TASKS["fade"]


def _video_settings(c):
  """Clips at 56 x 56, 4 frames: 2 temporal patches of 4 x 4 patches, 8 video tokens a prompt."""
  c.processor.update(dict(video_fps=2.0, video_min_pixels=56 * 56, video_max_pixels=56 * 56,
                          video_total_pixels=56 * 56 * 64, video_min_frames=4, video_max_frames=4))
  c.mesh.fsdp = 1
  c.grading_workers = 1
  c.data.system_prompt, c.data.instruction = "", ""
  return c


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
  """A training file of 12 clips plus one row whose clip is not a video, and a cold-start pool of 8."""
  folder = str(tmp_path_factory.mktemp("motion"))
  train = motion.write_dataset(folder, 12, seed=0, task="fade")
  with open(os.path.join(folder, "clips", "broken.mp4"), "wb") as f:
    f.write(b"not a video")
  with open(train, "a", encoding="utf-8") as f:
    f.write(json.dumps({"id": "broken", "question": FADE.question, "video": "clips/broken.mp4",
                        "answer": "darker"}) + "\n")
  pool = motion.write_dataset(folder, 8, seed=0, task="fade", coldstart=True)
  return folder, train, pool


@pytest.mark.slow
def test_sample_stage_rolls_out_video_prompts(clips, capsys):
  from ares_jax.stages import sample as sample_stage  # pylint: disable=g-import-not-at-top
  folder, _, _ = clips
  c = _video_settings(load_config("tiny.py"))
  c.stage, c.warm_start.steps = "sample", 0
  c.sample.prompts = (FADE.question, "What is 2 + 2?")
  c.sample.videos = (os.path.join(folder, "clips", "fade_0_000000.mp4"), "")
  c.rollout.max_response_length = 8
  out = sample_stage.run(c)
  assert {a["prompt"] for a in out["answers"]} == {0, 1} and all(a["length"] >= 1 for a in out["answers"])
  c.sample.videos = (os.path.join(folder, "clips", "broken.mp4"), "")
  with pytest.raises(ValueError, match=r"config.sample.videos: .*broken.mp4: undecodable"):
    sample_stage.run(c)


@pytest.mark.slow
def test_eval_stage_on_a_benchmark_whose_rows_carry_videos(clips, tmp_path):
  from ares_jax.stages import evaluate as eval_stage  # pylint: disable=g-import-not-at-top
  _, train, _ = clips
  c = _video_settings(load_config("tiny.py"))
  c.stage, c.workdir = "eval", str(tmp_path / "eval")
  c.rollout.max_response_length = 6
  c.eval.samples, c.eval.batch_prompts = 0, 4
  c.eval.benchmarks = (f"motion={train}",)
  c.aepo.grading_timeout_s = 30.0
  report = eval_stage.run(c)["motion"]
  assert report["n"] == 12 and report["skipped"] == {"video_undecodable": 1}
  rows = [json.loads(line) for line in (tmp_path / "eval" / "eval" / "motion.jsonl").read_text().splitlines()]
  assert len(rows) == 12 and {r["answer"] for r in rows} == set(FADE.answers)


@pytest.mark.slow
def test_adacs_then_aepo_on_a_video_dataset(clips, tmp_path):
  from ares_jax.stages import pipeline  # pylint: disable=g-import-not-at-top
  _, train, pool = clips
  c = _video_settings(small_rl(load_config("tiny.py")))
  c.stage, c.workdir, c.total_steps, c.checkpoint_every = "ares", str(tmp_path / "run"), 2, 2
  c.warm_start.steps = 0
  c.data.kind, c.data.paths, c.data.eval_fraction = "files", (train,), 0.2
  c.adacs.pool_paths = (pool,)
  c.adacs.pass_rate_samples, c.adacs.pass_rate_batch = 2, 4
  c.adacs.budget, c.adacs.batch_size, c.adacs.micro_batch_size, c.adacs.epochs = 8, 4, 4, 1
  c.adacs.max_response_length = 24
  c.rollout.max_response_length = 16
  c.eval.every, c.eval.prompts = 2, 4
  out = pipeline.run(c)
  rows = [json.loads(line) for line in (tmp_path / "run" / "aepo" / "metrics.jsonl").read_text().splitlines()]
  steps = [r for r in rows if "loss" in r]
  assert [r["step"] for r in steps] == [1, 2] and all(r["loss"] == r["loss"] for r in steps)
  assert any("eval/accuracy" in r for r in rows if r["step"] == 2)  # held-out video prompts evaluated
  assert (tmp_path / "run" / "adacs" / "policy" / "model.safetensors").exists()
  assert (tmp_path / "run" / "aepo" / "policy" / "model.safetensors").exists()
  assert out is not None
