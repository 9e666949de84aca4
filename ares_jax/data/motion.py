"""Built-in video tasks with verifiable answers, drawn as clips that change over time.

Two tasks, each with two answers and three difficulty levels:

- `dot`: which way does a bright dot crossing a noisy background move, left or right? Level 1: it
  travels most of the frame; level 3: a few pixels, near the noise.
- `fade`: does the clip get brighter or darker? Level 1: a change of 90 grey levels over the clip;
  level 3: 14, under the per-pixel noise.

In both, the frames taken without their order look alike for the two answers (the dot's positions and the
clip's brightness levels are drawn symmetric about a centre that does not depend on the answer); only their
order tells, so a policy that answers better than chance reads the video's time axis (temporal patches,
time-scaled M-RoPE). A fade is visible inside one temporal patch (its two frames differ everywhere);
the dot's direction needs a small dot's position compared between frames, which the tiny model does not
learn (README "Known limits"): `configs/tiny_video.py` trains on the fade task.

Clips are written as mp4 with PyAV and listed in a JSONL file in the reader's layout (`video` column,
`<video>` placeholder, `answer`, `difficulty`), so training and evaluation read them the way they read a
released video dataset:

  python -m ares_jax.data.motion --task=fade --out=data/fade --rows=512              # train.jsonl + clips/
  python -m ares_jax.data.motion --task=fade --out=data/fade --rows=128 --coldstart  # + a cold-start pool
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import av
import numpy as np

PLACEHOLDER = "<video>"
COLDSTART_FIRST = 1_000_000
LEVELS = (1, 2, 3)
# dot: how far the dot travels across the clip, as a fraction of the frame's width, per difficulty level
TRAVEL = {1: 0.7, 2: 0.35, 3: 0.12}
# fade: how many grey levels the clip's brightness changes by from its first frame to its last
FADE = {1: 90.0, 2: 40.0, 3: 14.0}
NOISE = 12.0  # per-pixel standard deviation of the background, in grey levels


def _dot(rng: np.random.Generator, second: bool, level: int, n_frames: int, height: int, width: int) -> np.ndarray:
  """A dot moving right (`second`) or left: float [T, H, W, 3] before clipping."""
  travel = TRAVEL[level] * width
  sign = 1.0 if second else -1.0
  x0 = width / 2 - sign * travel / 2 + rng.uniform(-0.1, 0.1) * width
  y = rng.uniform(0.3, 0.7) * height
  r = max(2.0, 0.08 * min(height, width))
  yy, xx = np.mgrid[:height, :width]
  out = np.empty((n_frames, height, width, 3))
  for t in range(n_frames):
    x = x0 + sign * travel * t / max(n_frames - 1, 1)
    dot = ((yy - y) ** 2 + (xx - x) ** 2 <= r * r)[..., None]
    out[t] = np.where(dot, 230.0, rng.normal(70, NOISE, (height, width, 3)))
  return out


def _fade(rng: np.random.Generator, second: bool, level: int, n_frames: int, height: int, width: int) -> np.ndarray:
  """A noisy grey clip getting darker (`second`) or brighter about a mean drawn apart from the answer:
  float [T, H, W, 3] before clipping."""
  change = FADE[level] * (-1.0 if second else 1.0)
  mean = rng.uniform(70, 185)  # frames() clips the rare pixels past [0, 255] (level 1 at the extremes)
  levels = mean + change * (np.linspace(0.0, 1.0, n_frames) - 0.5)
  return levels[:, None, None, None] + rng.normal(0, NOISE, (n_frames, height, width, 3))


@dataclasses.dataclass(frozen=True)
class Task:
  """A clip task: its question, its two answers, the sentence a cold-start response gives, and how a
  clip is drawn from (rng, is the answer the second one, level, frames, height, width)."""
  question: str
  answers: tuple[str, str]
  sentence: str  # with {} for the answer
  draw: Callable[[np.random.Generator, bool, int, int, int, int], np.ndarray]


TASKS = {
    "dot": Task(PLACEHOLDER + "Which way does the dot move? Answer \\boxed{left} or \\boxed{right}.",
                ("left", "right"), "the dot moves {}", _dot),
    "fade": Task(PLACEHOLDER + "Does the clip get brighter or darker? Answer \\boxed{brighter} or \\boxed{darker}.",
                 ("brighter", "darker"), "the clip gets {}", _fade),
}


def _task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"task={name!r}: the clip tasks are {sorted(TASKS)}")
  return TASKS[name]


def answer(seed: int, index: int, task: str = "dot") -> str:
  return _task(task).answers[int(np.random.default_rng([seed, index, 0]).integers(2))]


def difficulty(seed: int, index: int) -> int:
  return LEVELS[int(np.random.default_rng([seed, index, 1]).integers(len(LEVELS)))]


def frames(seed: int, index: int, n_frames: int = 8, height: int = 56, width: int = 56,
           task: str = "dot") -> np.ndarray:
  """Clip `index` of stream `seed` of `task`: uint8 [n_frames, height, width, 3]."""
  spec = _task(task)
  second = answer(seed, index, task) == spec.answers[1]
  clip = spec.draw(np.random.default_rng([seed, index, 2]), second, difficulty(seed, index), n_frames, height, width)
  return np.clip(clip, 0, 255).astype(np.uint8)


def write_mp4(path: str, clip: np.ndarray, fps: float = 4.0) -> str:
  """Encodes uint8 [T, H, W, 3] frames as an H.264 mp4 (even sizes: yuv420p halves the chroma planes)."""
  t, h, w, _ = clip.shape
  if h % 2 or w % 2:
    raise ValueError(f"frames of {h}x{w}: H.264 in yuv420p needs even sizes")
  tmp = path + ".tmp.mp4"
  with av.open(tmp, mode="w") as container:
    stream = container.add_stream("libx264", rate=int(round(fps)))
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.options = {"crf": "10"}  # near-lossless: the dot and the noise survive compression
    for frame in clip:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  os.replace(tmp, path)  # atomic: a killed writer leaves no half clip under the final name
  return path


def response(answer_text: str, task: str = "dot") -> str:
  return f"<think> {_task(task).sentence.format(answer_text)}.</think> \\boxed{{{answer_text}}}"


def write_dataset(folder: str, rows: int, seed: int = 0, *, task: str = "dot", n_frames: int = 8,
                  size: Sequence[int] = (56, 56), fps: float = 4.0, coldstart: bool = False,
                  first: int | None = None, truth_rate: float = 0.5) -> str:
  """Writes `rows` clips of `task` under `folder/clips/` and their rows to `folder/train.jsonl` (with
  `coldstart`, `folder/coldstart.jsonl`: each row also holds a `response` naming the clip's answer with
  probability `truth_rate`, else the other one: at 0.5 it teaches the answer format and nothing about the
  clip). Clips are numbered from `first`: 0 for training rows, 1,000,000 for a cold-start pool, so the two
  never share a clip or an id. Returns the JSONL path."""
  spec = _task(task)
  first = (COLDSTART_FIRST if coldstart else 0) if first is None else first
  os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
  name = "coldstart.jsonl" if coldstart else "train.jsonl"
  path = os.path.join(folder, name)
  guess = np.random.default_rng([seed, 3])
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for i in range(first, first + rows):
      clip = os.path.join("clips", f"{task}_{seed}_{i:06d}.mp4")
      if not os.path.exists(os.path.join(folder, clip)):
        write_mp4(os.path.join(folder, clip), frames(seed, i, n_frames, *size, task=task), fps)
      row = {"id": f"{task}-{seed}-{i}", "question": spec.question, "video": clip,
             "answer": answer(seed, i, task), "difficulty": difficulty(seed, i)}
      if coldstart:
        right = guess.random() < truth_rate
        other = spec.answers[1 - spec.answers.index(row["answer"])]
        row["response"] = response(row["answer"] if right else other, task)
      f.write(json.dumps(row) + "\n")
  os.replace(path + ".tmp", path)
  return path


def main(argv: Sequence[str]) -> None:
  del argv
  out = write_dataset(FLAGS.out, FLAGS.rows, FLAGS.seed, task=FLAGS.task, n_frames=FLAGS.frames,
                      coldstart=FLAGS.coldstart, fps=FLAGS.fps, truth_rate=FLAGS.truth_rate)
  print(out)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_enum("task", "fade", sorted(TASKS), "which clip task")
  flags.DEFINE_string("out", "data/fade", "folder for clips/ and the JSONL file")
  flags.DEFINE_integer("rows", 256, "number of clips")
  flags.DEFINE_integer("seed", 0, "stream seed: clip i of a seed is always the same")
  flags.DEFINE_integer("frames", 8, "frames per clip")
  flags.DEFINE_float("fps", 4.0, "frame rate written into the mp4")
  flags.DEFINE_bool("coldstart", False, "write coldstart.jsonl with responses instead")
  flags.DEFINE_float("truth_rate", 0.5, "coldstart: how often a response names the true answer (0.5: format only)")
  FLAGS = flags.FLAGS
  app.run(main)
