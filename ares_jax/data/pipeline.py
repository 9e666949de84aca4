"""Prompt datasets for RL and evaluation: the synthetic task or JSONL files in the ARES layout.

Every source is random-access by integer index, so a run's data position is one integer that a
checkpoint records. A row that cannot be used (no answer, an unreadable image, a prompt longer than
`max_prompt_length`) is skipped, counted, and reported with its index; the run goes on.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from typing import Any, Iterator

import numpy as np
from absl import logging
from PIL import Image

from ares_jax.data import synthetic
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.train.sequences import Prompt


@dataclasses.dataclass(frozen=True)
class Example:
  index: int
  prompt: Prompt
  answer: str
  difficulty: int | None  # known for the synthetic task
  question: str


class SyntheticSource:
  """Digit-arithmetic problems (data/synthetic.py), optionally shown as images too."""

  def __init__(self, seed: int, min_steps: int, max_steps: int, images: bool = False, ops: str = "+-*"):
    self.seed, self.min_steps, self.max_steps, self.images, self.ops = seed, min_steps, max_steps, images, ops

  def __len__(self) -> int:
    return 1 << 62

  def problem(self, index: int) -> synthetic.Problem:
    return synthetic.problem(self.seed, index, self.min_steps, self.max_steps, self.ops)

  def row(self, index: int) -> dict[str, Any]:
    p = self.problem(index)
    return {"question": p.question, "answer": p.answer, "difficulty": p.difficulty,
            "images": [synthetic.render(p)] if self.images and index % 2 == 0 else []}


class JsonlSource:
  """Rows `{"question", "answer", "image" | "images" (paths relative to the file), ...}` per line."""

  def __init__(self, path: str):
    self.path = path
    with open(path) as f:
      self._lines = f.read().splitlines()

  def __len__(self) -> int:
    return len(self._lines)

  def row(self, index: int) -> dict[str, Any]:
    rec = json.loads(self._lines[index])
    paths = rec.get("images") or ([rec["image"]] if rec.get("image") else [])
    base = os.path.dirname(self.path)
    images = []
    for p in paths:
      with open(os.path.join(base, p), "rb") as f:
        images.append(Image.open(io.BytesIO(f.read())).convert("RGB"))
    return {"question": rec.get("question") or rec.get("problem"), "answer": rec.get("answer"),
            "difficulty": rec.get("difficulty"), "images": images}


class PromptStream:
  """Encodes rows of a source into `Example`s, skipping and counting unusable rows."""

  def __init__(self, source, processor: QwenVLProcessor, max_prompt_length: int, system: str | None = None):
    self.source, self.processor, self.max_prompt_length, self.system = source, processor, max_prompt_length, system
    self.skipped: collections.Counter = collections.Counter()

  def encode(self, index: int) -> Example | None:
    try:
      row = self.source.row(index)
    except (OSError, ValueError, KeyError) as e:  # unreadable image, malformed line
      return self._skip(index, "unreadable", e)
    if row.get("answer") in (None, "") or not row.get("question"):
      return self._skip(index, "missing_answer" if row.get("question") else "missing_question")
    enc = self.processor.encode_chat([row["question"]], [row["images"] or None], system=self.system)
    ids = enc["input_ids"][0][enc["attention_mask"][0] > 0].astype(np.int32)
    if len(ids) > self.max_prompt_length:
      return self._skip(index, "too_long", f"{len(ids)} > max_prompt_length {self.max_prompt_length}")
    prompt = Prompt(ids, enc.get("pixel_values"), enc.get("image_grid_thw"))
    return Example(index, prompt, str(row["answer"]), row.get("difficulty"), row["question"])

  def _skip(self, index: int, why: str, detail: Any = "") -> None:
    self.skipped[why] += 1
    logging.warning("skipping row %d of %s: %s %s", index, type(self.source).__name__, why, detail)
    return None

  def take(self, position: int, count: int) -> tuple[list[Example], int]:
    """`count` usable examples starting at row `position`; returns them and the next position."""
    out, scanned = [], 0
    while len(out) < count:
      if position >= len(self.source):
        position = 0  # next epoch
      if scanned >= max(len(self.source), 1) and not out:
        raise ValueError(f"{type(self.source).__name__} has no usable row (skipped: {dict(self.skipped)})")
      scanned += 1
      ex = self.encode(position)
      position += 1
      if ex is not None:
        out.append(ex)
    return out, position

  def __iter__(self) -> Iterator[Example]:
    pos = 0
    while True:
      batch, pos = self.take(pos, 1)
      yield batch[0]
