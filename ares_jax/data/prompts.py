"""Prompt streams for RL, AdaCS and evaluation: rows of a source, in a fixed order, encoded with the
prompt template; unusable rows skipped, counted by reason and logged once with their `file:row`.

A source is random access (`source[i]` is row i, `len(source)` rows an epoch), and the stream's order
maps a position 0, 1, 2, ... over endless epochs to rows (a fresh permutation per epoch when shuffled),
so a run's place in its data is one integer that a checkpoint records.

Multi-process runs: every process holds the rows' text (cheap) and walks the same order, but decodes
and resizes only the images and videos of its own share of the positions (data/video.py samples a video's
frames, within its limits); the resized images, the clips (frames and rate) and the skip verdicts are
exchanged, and every process then encodes the whole batch from the same pixels. The batch, and every
skip decision, is therefore the same on every process and the same as in a single-process run.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import io
import json
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ares_jax import sharding
from ares_jax.data import synthetic
from ares_jax.data.batching import Prompt
from ares_jax.data.processor import ProcessorError, QwenVLProcessor
from ares_jax.data.reader import BadRow, Row, load_images, skip
from ares_jax.data.template import PromptTemplate
from ares_jax.data.video import Clip, VideoError, load_clip


@dataclasses.dataclass(frozen=True)
class Example:
  """An encoded prompt and the row it came from."""

  index: int  # the row's number in its source
  prompt: Prompt
  row: Row

  @property
  def answer(self) -> str:
    return self.row.answer

  @property
  def question(self) -> str:
    return self.row.question

  @property
  def difficulty(self) -> int | None:
    return self.row.difficulty


class RowSource:
  """Rows held in memory (text and image references only)."""

  def __init__(self, rows: Sequence[Row]):
    self.rows = list(rows)

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, index: int) -> Row:
    return self.rows[index]


class SyntheticSource:
  """Digit-arithmetic problems (data/synthetic.py), optionally shown as images too; endless."""

  def __init__(self, seed: int, min_steps: int, max_steps: int, images: bool = False, ops: str = "+-*",
               task: str = "steps"):
    self.seed, self.min_steps, self.max_steps, self.images, self.ops = seed, min_steps, max_steps, images, ops
    self.task = task

  def __len__(self) -> int:
    return 1 << 62

  def problem(self, index: int) -> synthetic.Problem:
    return synthetic.problem(self.seed, index, self.min_steps, self.max_steps, self.ops, self.task)

  def __getitem__(self, index: int) -> Row:
    p = self.problem(index)
    images = (synthetic.render(p),) if self.images and index % 2 == 0 else ()
    return Row(id=f"synthetic-{self.seed}-{index}", location=f"synthetic:{index}", question=p.question,
               answer=p.answer, images=images, source=f"synthetic_{self.ops}", difficulty=p.difficulty)


def in_eval_split(row_id: str, eval_fraction: float) -> bool:
  """Whether a row belongs to the held-out split: a hash of its id below `eval_fraction`. Depends on the
  id alone, so the split is the same in every run, process and file order, and never overlaps."""
  h = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "big")
  return h < eval_fraction * 2.0**64


def split_rows(rows: Sequence[Row], eval_fraction: float) -> tuple[list[Row], list[Row]]:
  """(train rows, held-out rows) by `in_eval_split`."""
  train, held = [], []
  for r in rows:
    (held if in_eval_split(r.id, eval_fraction) else train).append(r)
  return train, held


@dataclasses.dataclass(frozen=True)
class Order:
  """Position -> row of a source of `size` rows: epoch after epoch, each a permutation when `shuffle`."""

  size: int
  shuffle: bool = False
  seed: int = 0

  def __call__(self, position: int) -> int:
    epoch, k = divmod(position, self.size)
    return int(_permutation(self.size, self.seed, epoch)[k]) if self.shuffle else k


@functools.lru_cache(maxsize=2)
def _permutation(size: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(size)


class PromptStream:
  """Encodes the rows of `source` with `template`, skipping and counting unusable ones."""

  def __init__(self, source, processor: QwenVLProcessor, template: PromptTemplate, max_prompt_length: int,
               max_image_pixels: int = 89_478_485, shuffle: bool = False, seed: int = 0):
    self.source, self.processor, self.template = source, processor, template
    self.max_prompt_length, self.max_image_pixels = max_prompt_length, max_image_pixels
    if shuffle and len(source) >= 1 << 40:
      raise ValueError(f"{type(source).__name__} is endless and cannot be shuffled")
    self.order = Order(len(source), shuffle, seed)
    self.skipped: collections.Counter = collections.Counter()  # rows skipped, by reason (each row once)
    self._bad: set[str] = set()

  def encode(self, index: int) -> Example | None:
    """Row `index` encoded, or None when it is skipped (counted in `skipped`, logged with its location)."""
    return self._finish(index, self._decode(index))

  def encode_many(self, indices: Sequence[int]) -> list[Example | None]:
    """`encode` of several rows, their images decoded once across the processes of a run."""
    indices = list(indices)
    return [self._finish(i, d) for i, d in zip(indices, self._decode_shared(indices))]

  def take(self, position: int, count: int) -> tuple[list[Example], int]:
    """`count` usable examples from `position` of the order on; returns them and the next position.
    The same on every process of a multi-process run (see the module docstring)."""
    out: list[Example] = []
    scanned = 0
    epoch = max(getattr(self.source, "epoch_size", len(self.source)), 1)  # an endless source's pass
    while len(out) < count:
      if scanned >= epoch and not out:
        raise ValueError(f"{self.describe()} has no usable row (skipped: {dict(self.skipped)})")
      positions = list(range(position, position + max(count - len(out), 1)))
      rows = [self.order(p) for p in positions]
      for i, decoded in zip(rows, self._decode_shared(rows)):
        ex = self._finish(i, decoded)
        position, scanned = position + 1, scanned + 1
        if ex is not None:
          out.append(ex)
          if len(out) == count:
            break
    return out, position

  def first(self, count: int) -> list[Example]:
    """The first `count` usable rows in source order (held-out evaluation); fewer when the source has fewer."""
    out, i = [], 0
    while len(out) < count and i < len(self.source):
      n = min(count - len(out), len(self.source) - i)
      out += [ex for ex in self.encode_many(range(i, i + n)) if ex is not None]
      i += n
    return out

  def describe(self) -> str:
    return type(self.source).__name__ + (f" of {len(self.source)} rows" if len(self.source) < 1 << 40 else "")

  # Decoding (images: the costly, per-process part) and encoding (template, processor: on every process).

  def _decode(self, index: int) -> tuple[str, Any]:
    """('ok', ([uint8 images at the processor's size], [Clip])) or ('skip', (reason, detail)); a video
    that cannot be used skips its row as 'video_<VideoError.reason>'."""
    row = self.source[index]
    try:
      images = [self.processor.resize(im) for im in load_images(row, self.max_image_pixels)]
      return "ok", (images, [load_clip(v, self.processor.video_settings) for v in row.videos])
    except BadRow as e:
      return "skip", (e.reason, str(e))
    except VideoError as e:
      return "skip", (f"video_{e.reason}", str(e))
    except (OSError, ValueError) as e:  # a source that fails to produce the row at all
      return "skip", ("unreadable", str(e))

  def _decode_shared(self, indices: list[int]) -> list[tuple[str, Any]]:
    n, me = sharding.process_count(), sharding.process_index()
    if n == 1:
      return [self._decode(i) for i in indices]
    mine = {k: self._decode(i) for k, i in enumerate(indices) if k % n == me}
    gathered = sharding.allgather_bytes(_pack(mine))
    out: dict[int, tuple[str, Any]] = {}
    for payload in gathered:
      out.update(_unpack(payload))
    return [out[k] for k in range(len(indices))]

  def _finish(self, index: int, decoded: tuple[str, Any]) -> Example | None:
    row = self.source[index]
    status, value = decoded
    if status == "skip":
      return self._skip(row, *value)
    images = [Image.fromarray(a) for a in value[0]]
    clips = value[1]
    try:
      text = self.template.render(row.question, len(images), len(clips))
      enc = self.processor([text], images or None, clips or None)
    except (ValueError, ProcessorError) as e:
      return self._skip(row, "placeholder_mismatch" if "placeholder" in str(e) else "unencodable", e)
    ids = enc["input_ids"][0][enc["attention_mask"][0] > 0].astype(np.int32)
    if len(ids) > self.max_prompt_length:
      return self._skip(row, "too_long", f"{len(ids)} tokens > rollout.max_prompt_length {self.max_prompt_length}")
    return Example(index, Prompt(ids, enc.get("pixel_values"), enc.get("image_grid_thw"), enc.get("pixel_values_videos"),
                                 enc.get("video_grid_thw"), enc.get("second_per_grid_ts")), row)

  def _skip(self, row: Row, reason: str, detail: Any = "") -> None:
    if row.location not in self._bad:  # later epochs skip it again, silently
      self._bad.add(row.location)
      skip(self.skipped, reason, row.location, detail, what="prompt")
    return None


def _pack(decoded: dict[int, tuple[str, Any]]) -> bytes:
  """Decoded rows as bytes (npz of the images and clip frames + a JSON header with the counts and clip
  rates): no pickle crosses processes."""
  header, arrays = {}, {}
  for k, (status, value) in decoded.items():
    if status == "ok":
      images, clips = value
      header[k] = ["ok", [len(images), [c.fps for c in clips]]]
      arrays.update({f"{k}_{j}": a for j, a in enumerate(images)})
      arrays.update({f"{k}_v{j}": c.frames for j, c in enumerate(clips)})
    else:
      header[k] = ["skip", list(value)]
  buf = io.BytesIO()
  np.savez(buf, __header__=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
  return buf.getvalue()


def _unpack(payload: bytes) -> dict[int, tuple[str, Any]]:
  with np.load(io.BytesIO(payload), allow_pickle=False) as z:
    header = json.loads(z["__header__"].tobytes())
    return {int(k): ("ok", ([z[f"{k}_{j}"] for j in range(v[0])],
                            [Clip(z[f"{k}_v{j}"], float(fps)) for j, fps in enumerate(v[1])]))
            if s == "ok" else ("skip", tuple(v)) for k, (s, v) in header.items()}
