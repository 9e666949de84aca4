"""Prompts from a TFDS dataset written by `python -m ares_jax.data.build` (`config.data.kind="tfds"`), read
through Grain: `grain.MapDataset.source(<array_record split>)`, shuffled and repeated by Grain.

Why this shape. A `PromptStream` walks positions 0, 1, 2, ... of its source and saves the next position in
the checkpoint (`data_position`). Here the training source *is* Grain's endless dataset
`source.shuffle(seed=config.seed).repeat().map(record -> Row)`: position p is Grain's element p, epoch
p // N a fresh permutation (Grain folds the epoch into the shuffle seed), so the source reports an endless
length and the stream must not shuffle or wrap it again (`setup.prompt_stream` passes `shuffle=False`
for this kind). The saved integer is exactly the state of a Grain iterator over that dataset
(`{"next_index": data_position}`, see `grain_state`), and a resumed run continues the same order.
`epoch_size` tells the stream how many positions make one pass over the rows.

The held-out split (any `split_seed` other than 0) is the dataset's `eval` split in file order, unshuffled
and finite, as `PromptStream.first` expects. Without TensorFlow: records are read by `tfds.data_source`'s
numpy path; images are stored as encoded bytes (PNG or JPEG, already at the processor's size), which
`reader.load_images` decodes like any other image reference.

This module also holds the record schema (`features`, `to_record`, `to_row`) so that writing
(data/build.py) and reading can never disagree.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import math
import os
from typing import Any

import numpy as np
from absl import logging

from ares_jax.data.reader import Row

BUILDER_NAME = "ares_prompts"  # the dataset folder is <out>/ares_prompts/<version>/
TRAIN, EVAL = "train", "eval"


def features():
  """The record schema: the text fields of `Row` (UTF-8; `options`, `index` and `extra` as JSON, "" for a
  missing category or response), `pass_rate` and `difficulty` with -1 for "none", and `images`: one
  encoded image file (PNG or JPEG bytes) per image of the row, in order."""
  import tensorflow_datasets as tfds  # tensorflow-datasets is slow to import: only data.kind=tfds reads it

  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(), "location": text(), "question": text(), "answer": text(), "options": text(),
      "source": text(), "category": text(), "response": text(), "index": text(), "extra": text(),
      "pass_rate": tfds.features.Scalar(np.float64),
      "difficulty": tfds.features.Scalar(np.int64),
      "images": tfds.features.Sequence(tfds.features.Scalar(np.object_)),
  })


def to_record(row: Row, images: list[bytes]) -> dict[str, Any]:
  """`row` as a record with `images` (encoded files) in place of its image references. A difficulty of -1
  in the source reads back as none, like ViRL39K's -1 pass rates."""
  return {
      "id": row.id, "location": row.location, "question": row.question, "answer": row.answer,
      "options": json.dumps(row.options, ensure_ascii=False), "source": row.source,
      "category": row.category or "", "response": row.response or "",
      "index": json.dumps(row.index, ensure_ascii=False, default=str),
      "extra": json.dumps(row.extra, ensure_ascii=False, default=str),
      "pass_rate": -1.0 if row.pass_rate is None else float(row.pass_rate),
      "difficulty": -1 if row.difficulty is None else int(row.difficulty),
      "images": list(images),
  }


def to_row(rec: dict[str, Any]) -> Row:
  """A record as the `Row` the reader would give, its images as bytes. The reader never yields an empty
  category or response (empty columns count as absent) nor a pass rate outside [0, 1], so "" and -1
  decode back to None without loss."""

  def text(key: str) -> str:
    v = rec[key]
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)

  pass_rate, difficulty = float(rec["pass_rate"]), int(rec["difficulty"])
  return Row(id=text("id"), location=text("location"), question=text("question"), answer=text("answer"),
             images=tuple(bytes(b) for b in rec["images"]), options=json.loads(text("options")),
             source=text("source"), category=text("category") or None,
             pass_rate=None if pass_rate < 0 or math.isnan(pass_rate) else pass_rate,
             difficulty=None if difficulty == -1 else difficulty, response=text("response") or None,
             index=json.loads(text("index")), extra=json.loads(text("extra")))


def resolve(path: str) -> str:
  """The versioned dataset folder (the one holding dataset_info.json) for `path`: that folder itself, the
  `--out` folder of data/build.py, or the `ares_prompts` folder in between (the only or latest version)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    return path
  found = sorted(glob.glob(os.path.join(path, "*", "dataset_info.json")) +
                 glob.glob(os.path.join(path, BUILDER_NAME, "*", "dataset_info.json")))
  folders = sorted({os.path.dirname(f) for f in found}, key=_version_key)
  if not folders:
    raise FileNotFoundError(f"config.data.tfds_dir={path}: no dataset here; build one with "
                            "`python -m ares_jax.data.build --src=... --out=...`")
  if len({os.path.dirname(f) for f in folders}) > 1:
    raise ValueError(f"config.data.tfds_dir={path} holds several datasets ({folders}): name one of them")
  return folders[-1]


def _version_key(folder: str) -> tuple:
  try:
    return tuple(int(p) for p in os.path.basename(folder).split("."))
  except ValueError:
    return (-1,)


@functools.lru_cache(maxsize=4)
def _builder(path: str):
  import tensorflow_datasets as tfds  # tensorflow-datasets is slow to import: only data.kind=tfds reads it

  return tfds.builder_from_directory(path)


class GrainSource:
  """A random-access row source over a Grain `MapDataset` (PromptStream's protocol: `len`, `[i] -> Row`).
  `epoch_size` is the number of rows in one pass; `len` is endless for the repeated training split."""

  def __init__(self, dataset, epoch_size: int, name: str):
    self.dataset, self.epoch_size, self.name = dataset, epoch_size, name

  def __len__(self) -> int:
    return len(self.dataset)

  def __getitem__(self, index: int) -> Row:
    return self.dataset[index]

  def __repr__(self) -> str:
    return f"GrainSource({self.name}, {self.epoch_size} rows an epoch)"


def grain_state(position: int) -> dict[str, int]:
  """The Grain iterator state equal to a stream position: `iter(dataset.to_iter_dataset())` restored to
  it yields element `position` next, the row the stream takes next."""
  return {"next_index": int(position)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TfdsSettings:
  """What `source` reads from `config` (settings.tfds): the dataset folder, the shuffle and the bounds the
  run's processor resizes images to (compared with those the dataset was built with)."""

  tfds_dir: str
  shuffle: bool = True
  seed: int = 0
  eval_paths_given: bool = False  # data.eval_paths is set (ignored here: the build fixed the held-out split)
  min_pixels: int = 262144
  max_pixels: int = 4194304
  image_factor: int = 28  # patch_size * spatial_merge_size


def source(s: TfdsSettings, split_seed: int) -> GrainSource:
  """Split 0: the training rows, endless, reshuffled every epoch by Grain when `s.shuffle` (seeded by
  `s.seed`); any other split: the held-out rows in file order."""
  import grain  # grain is slow to import: only data.kind=tfds reads through it

  path = resolve(s.tfds_dir)
  if s.eval_paths_given:
    logging.warning("config.data.eval_paths is ignored with kind=tfds: the held-out split was fixed when %s was "
                    "built (python -m ares_jax.data.build --eval_src=...)", path)
  builder = _builder(path)
  _check_image_bounds(builder.info.metadata, s, path)
  split = TRAIN if split_seed == 0 else EVAL
  if split not in builder.info.splits:  # a build whose held-out split came out empty
    if split == TRAIN:
      raise ValueError(f"{path} has no training split")
    logging.warning("%s has no %r split: no held-out prompts", path, split)
    return GrainSource(grain.MapDataset.source([]), 0, f"{path}[{split}]")
  records = builder.as_data_source(split=split)
  ds = grain.MapDataset.source(records)
  n = len(ds)
  if split == TRAIN:
    if s.shuffle:
      ds = ds.shuffle(seed=int(s.seed) % 2**32)
    ds = ds.repeat()  # endless (len = sys.maxsize); with a shuffle, each epoch its own permutation
  logging.info("data: %s split %r, %d rows%s", path, split, n,
               " (Grain: shuffled every epoch)" if split == TRAIN and s.shuffle else "")
  return GrainSource(ds.map(to_row), n, f"{path}[{split}]")


def _check_image_bounds(metadata: Any, s: TfdsSettings, path: str) -> None:
  """Warns when the dataset's images were sized for other processor bounds than this run's: they are then
  resized a second time at train time (from already resized pixels), unlike `kind=files`."""
  built = {k: metadata.get(k) for k in ("min_pixels", "max_pixels", "image_factor")}
  wanted = {"min_pixels": s.min_pixels, "max_pixels": s.max_pixels, "image_factor": s.image_factor}
  if built != wanted:
    logging.warning("%s: images were stored for %s, this run's processor uses %s; they will be resized again "
                    "(rebuild with matching --min_pixels/--max_pixels for identical pixels)", path, built, wanted)
