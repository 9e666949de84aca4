"""A built-in video task with a verifiable answer: which way does the dot move?

Each clip is a bright dot crossing a noisy background left to right or right to left; a single frame
cannot tell the direction, only the order of the frames can, so a policy that answers right more often
than chance reads the video's time axis (temporal patches, time-scaled M-RoPE). The difficulty is how
far the dot travels (level 1: most of the frame; level 3: a few pixels, near the noise).

Clips are written as mp4 with PyAV and listed in a JSONL file in the reader's layout (`video` column,
`<video>` placeholder, `answer`, `difficulty`), so training and evaluation read them the way they read a
released video dataset:

  python -m ares_jax.data.motion --out=data/motion --rows=256            # train.jsonl + clips/
  python -m ares_jax.data.motion --out=data/motion --rows=64 --coldstart  # + a cold-start pool
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import av
import numpy as np

DIRECTIONS = ("left", "right")
PLACEHOLDER = "<video>"
QUESTION = PLACEHOLDER + "Which way does the dot move? Answer \\boxed{left} or \\boxed{right}."
COLDSTART_FIRST = 1_000_000
# how far the dot travels across the clip, as a fraction of the frame's width, per difficulty level
TRAVEL = {1: 0.7, 2: 0.35, 3: 0.12}


def direction(seed: int, index: int) -> str:
  return DIRECTIONS[int(np.random.default_rng([seed, index, 0]).integers(2))]


def difficulty(seed: int, index: int) -> int:
  return 1 + int(np.random.default_rng([seed, index, 1]).integers(len(TRAVEL)))


def frames(seed: int, index: int, n_frames: int = 8, height: int = 56, width: int = 56) -> np.ndarray:
  """Clip `index` of stream `seed`: uint8 [n_frames, height, width, 3]."""
  rng = np.random.default_rng([seed, index, 2])
  travel = TRAVEL[difficulty(seed, index)] * width
  sign = 1.0 if direction(seed, index) == "right" else -1.0
  x0 = width / 2 - sign * travel / 2 + rng.uniform(-0.1, 0.1) * width
  y = rng.uniform(0.3, 0.7) * height
  r = max(2.0, 0.08 * min(height, width))
  yy, xx = np.mgrid[:height, :width]
  out = np.empty((n_frames, height, width, 3), np.uint8)
  for t in range(n_frames):
    x = x0 + sign * travel * t / max(n_frames - 1, 1)
    dot = ((yy - y) ** 2 + (xx - x) ** 2 <= r * r)[..., None]
    background = rng.normal(70, 12, (height, width, 3))
    out[t] = np.clip(np.where(dot, 230.0, background), 0, 255).astype(np.uint8)
  return out


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


def response(answer: str) -> str:
  return f"<think> the dot moves {answer}.</think> \\boxed{{{answer}}}"


def write_dataset(folder: str, rows: int, seed: int = 0, *, n_frames: int = 8, size: Sequence[int] = (56, 56),
                  fps: float = 4.0, coldstart: bool = False, first: int | None = None,
                  truth_rate: float = 0.5) -> str:
  """Writes `rows` clips under `folder/clips/` and their rows to `folder/train.jsonl` (with `coldstart`,
  `folder/coldstart.jsonl`: each row also holds a `response` naming the clip's direction with probability
  `truth_rate`, else the other one: at 0.5 it teaches the answer format and nothing about the direction). Clips are numbered from
  `first`: 0 for training rows, 1,000,000 for a cold-start pool, so the two never share a clip or an id.
  Returns the JSONL path."""
  first = (COLDSTART_FIRST if coldstart else 0) if first is None else first
  os.makedirs(os.path.join(folder, "clips"), exist_ok=True)
  name = "coldstart.jsonl" if coldstart else "train.jsonl"
  path = os.path.join(folder, name)
  guess = np.random.default_rng([seed, 3])
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for i in range(first, first + rows):
      clip = os.path.join("clips", f"{seed}_{i:06d}.mp4")
      if not os.path.exists(os.path.join(folder, clip)):
        write_mp4(os.path.join(folder, clip), frames(seed, i, n_frames, *size), fps)
      row = {"id": f"motion-{seed}-{i}", "question": QUESTION, "video": clip, "answer": direction(seed, i),
             "difficulty": difficulty(seed, i)}
      if coldstart:
        right = guess.random() < truth_rate
        row["response"] = response(row["answer"] if right else DIRECTIONS[1 - DIRECTIONS.index(row["answer"])])
      f.write(json.dumps(row) + "\n")
  os.replace(path + ".tmp", path)
  return path


def main(argv: Sequence[str]) -> None:
  del argv
  out = write_dataset(FLAGS.out, FLAGS.rows, FLAGS.seed, n_frames=FLAGS.frames, coldstart=FLAGS.coldstart,
                      fps=FLAGS.fps, truth_rate=FLAGS.truth_rate)
  print(out)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("out", "data/motion", "folder for clips/ and the JSONL file")
  flags.DEFINE_integer("rows", 256, "number of clips")
  flags.DEFINE_integer("seed", 0, "stream seed: clip i of a seed is always the same")
  flags.DEFINE_integer("frames", 8, "frames per clip")
  flags.DEFINE_float("fps", 4.0, "frame rate written into the mp4")
  flags.DEFINE_bool("coldstart", False, "write coldstart.jsonl with responses instead")
  flags.DEFINE_float("truth_rate", 0.5, "coldstart: how often a response names the true direction (0.5: format only)")
  FLAGS = flags.FLAGS
  app.run(main)
