"""Converts prompt data in any layout the reader reads (a ViRL39K folder, EasyR1 parquet with embedded bytes,
the ARES cold-start JSONL, VLMEvalKit TSV) into a TFDS dataset (array_record files, no TensorFlow) for
`config.data.kind="tfds"`:

  python -m ares_jax.data.build --src=/data/ViRL39K --out=/data/virl39k_tfds
      [--src=MORE ...] [--eval_src=FILE ...] [--eval_fraction=0.02]
      [--min_pixels=262144] [--max_pixels=4194304] [--image_factor=28]
      [--image_root=DIR] [--image_format=png|jpeg] [--jpeg_quality=95] [--max_image_pixels=89478485]
      [--column=question=problem ...] [--workers=8] [--overwrite]

  python -m ares_jax.main --config=configs/aepo_7b.py --config.data.kind=tfds \\
      --config.data.tfds_dir=/data/virl39k_tfds ...

The dataset lands in `<out>/ares_prompts/1.0.0/` with two splits: `train`, and `eval` (held out): the
`--eval_src` files when given (their rows are then dropped from the training files), else the rows whose
id hashes below `--eval_fraction` (`prompts.in_eval_split`, the same rule as `kind=files`), so no held-out
row is ever trained on. Rows keep their file order (Grain shuffles at train time, see tfds_source.py).

Images: each image is decoded once, here, and stored at the exact size the Qwen2.5-VL processor gives it
(`smart_resize` to multiples of `--image_factor` = patch_size * spatial_merge_size with a pixel count in
[`--min_pixels`, `--max_pixels`], bicubic, as `QwenVLProcessor.resize`), re-encoded as PNG (lossless,
the default) or JPEG (smaller, lossy). Such a size is a fixed point of `smart_resize`, so a run whose
`config.processor` has the same bounds does no resizing at train time and sees exactly the pixels a
`kind=files` run sees (tested); a run with other bounds resizes again, and tfds_source.py warns.
The defaults are the base config's processor bounds.

Rows the reader skips (no question, empty answer, malformed, ...) and rows whose images cannot be used
(missing file, unreadable bytes, decompression bomb, `<image>` count different from the image count, an
aspect ratio the processor refuses) are skipped, logged once with their `file:row`, counted by reason,
printed at the end and kept in the dataset's metadata.json. The dataset is written into a temporary folder
beside `--out` and moved into place only when complete; an existing one is replaced only with --overwrite.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import itertools
import os
import shutil
import tempfile
from typing import Iterator, Sequence

import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils
from tqdm import tqdm

from ares_jax.data import tfds_source
from ares_jax.data.prompts import split_rows
from ares_jax.data.reader import BadRow, Columns, Row, load_images, read_rows, skip

VERSION = "1.0.0"
FORMATS = ("png", "jpeg")


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """How stored images are sized and encoded; the bounds should be the training run's `config.processor`."""

  min_pixels: int = 262_144  # the base config's processor.min_pixels (512 * 512)
  max_pixels: int = 4_194_304  # the base config's processor.max_pixels (2048 * 2048)
  factor: int = 28  # patch_size * spatial_merge_size: stored sides are multiples of it
  format: str = "png"
  jpeg_quality: int = 95
  max_image_pixels: int = 89_478_485  # larger sources are skipped as decompression bombs (PIL's bound)

  def __post_init__(self):
    if not 0 < self.min_pixels <= self.max_pixels:
      raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
    if self.format not in FORMATS:
      raise ValueError(f"image format {self.format!r}: expected one of {FORMATS}")


@dataclasses.dataclass(frozen=True)
class BuildSettings:
  """One conversion: what to read (the reader's columns and image root), how to split and store it."""

  src: tuple[str, ...]
  out: str
  eval_src: tuple[str, ...] = ()
  eval_fraction: float = 0.02
  image_root: str | None = None
  columns: Columns = Columns()
  images: ImageSettings = ImageSettings()
  workers: int = 4  # threads decoding, resizing and encoding images (PIL releases the GIL)
  overwrite: bool = False

  def __post_init__(self):
    if not 0.0 <= self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction={self.eval_fraction}: expected a fraction in [0, 1)")


@dataclasses.dataclass(frozen=True)
class BuildResult:
  path: str  # the versioned dataset folder (what tfds.builder_from_directory and data.tfds_dir accept)
  counts: dict[str, int]  # split -> records written
  skipped: dict[str, int]  # reason -> rows skipped
  held_out_in_src: int  # training-file rows dropped because `--eval_src` holds their id


def fit_image(image: Image.Image, s: ImageSettings) -> Image.Image:
  """`image` (RGB) at the processor's size for bounds `s` (`QwenVLProcessor.resize`'s arithmetic and
  resampling). Raises ValueError for images the processor refuses (aspect ratio above 200)."""
  # transformers is slow to import: only where it is used
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

  w, h = image.size
  rh, rw = smart_resize(h, w, s.factor, min_pixels=s.min_pixels, max_pixels=s.max_pixels)
  return image if (rw, rh) == (w, h) else image.resize((rw, rh), resample=Image.Resampling.BICUBIC)


def encode_image(image: Image.Image, s: ImageSettings) -> bytes:
  buf = io.BytesIO()
  if s.format == "png":
    image.save(buf, format="PNG")
  else:
    image.save(buf, format="JPEG", quality=s.jpeg_quality)
  return buf.getvalue()


def prepare_images(row: Row, s: ImageSettings) -> list[bytes]:
  """The row's images decoded, fitted and encoded. Raises BadRow (`load_images`' reasons, or
  'unresizable' for sizes the processor refuses, 'video_unsupported': tfds datasets hold images only)."""
  if row.videos:  # else the video would vanish from the prompt without a word
    raise BadRow("video_unsupported", f"{len(row.videos)} videos: read video rows as files (data.kind=files)")
  out = []
  for image in load_images(row, s.max_image_pixels):
    try:
      out.append(encode_image(fit_image(image, s), s))
    except ValueError as e:
      raise BadRow("unresizable", str(e)) from None
  return out


def split_sources(settings: BuildSettings, skipped: collections.Counter) -> tuple[list[Row], list[Row], int]:
  """(training rows, held-out rows, training rows dropped for being held out), as `setup.make_source`
  splits `kind=files` data: `eval_src` when given, else the id hash."""
  rows = read_rows(settings.src, settings.columns, settings.image_root, skipped)
  if not settings.eval_src:
    train, held = split_rows(rows, settings.eval_fraction)
    return train, held, 0
  held = read_rows(settings.eval_src, settings.columns, settings.image_root, skipped)
  held_ids = {r.id for r in held}
  train = [r for r in rows if r.id not in held_ids]
  return train, held, len(rows) - len(train)


class AresPrompts(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of one conversion: the rows are read and split before `download_and_prepare`."""

  VERSION = tfds.core.Version(VERSION)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. TFDS 4.9's own lookup for a builder inside a package imports `importlib_resources`,
    which it only installs for Python < 3.9."""
    return epath.Path(__file__)

  def __init__(self, *, splits: dict[str, list[Row]], settings: BuildSettings, skipped: collections.Counter,
               **kwargs):
    self._rows, self._settings, self._skipped = splits, settings, skipped
    super().__init__(file_format="array_record", **kwargs)

  def _info(self):
    s = self._settings
    meta = tfds.core.MetadataDict(
        src=list(s.src), eval_src=list(s.eval_src), eval_fraction=s.eval_fraction,
        min_pixels=s.images.min_pixels, max_pixels=s.images.max_pixels, image_factor=s.images.factor,
        image_format=s.images.format, skipped={})
    return tfds.core.DatasetInfo(
        builder=self, description=f"ARES prompts converted by ares_jax.data.build from {', '.join(s.src)}",
        features=tfds_source.features(), metadata=meta, disable_shuffling=True)  # file order; Grain shuffles

  def _split_generators(self, dl_manager):
    del dl_manager
    out = {}
    for name, rows in self._rows.items():
      examples = self._generate_examples(rows, name)
      try:  # TFDS cannot write an empty split: a split left without usable rows is not declared
        first = next(examples)
      except StopIteration:
        if name == tfds_source.TRAIN:
          raise ValueError(f"--src={list(self._settings.src)} holds no usable training row "
                           f"(skipped: {dict(self._skipped)})") from None
        logging.warning("the %r split has no usable row; it is left out", name)
        continue
      out[name] = itertools.chain([first], examples)
    return out

  def _generate_examples(self, rows: Sequence[Row], split: str) -> Iterator[tuple[int, dict]]:
    """(key, record) of the usable rows in order; images prepared by `workers` threads, a bounded
    window ahead."""
    s = self._settings
    key = 0
    with concurrent.futures.ThreadPoolExecutor(max(1, s.workers)) as pool, \
        tqdm(total=len(rows), desc=f"{split} rows", unit="row") as bar:
      window: collections.deque = collections.deque()
      todo = iter(rows)
      for row in itertools.islice(todo, 4 * max(1, s.workers)):
        window.append((row, pool.submit(_prepare_or_bad, row, s.images)))
      while window:
        row, future = window.popleft()
        nxt = next(todo, None)
        if nxt is not None:
          window.append((nxt, pool.submit(_prepare_or_bad, nxt, s.images)))
        result = future.result()
        bar.update(1)
        if isinstance(result, BadRow):
          skip(self._skipped, result.reason, row.location, result)
          continue
        yield key, tfds_source.to_record(row, result)
        key += 1
    self.info.metadata["skipped"] = dict(self._skipped)  # metadata.json is written after every split


def _prepare_or_bad(row: Row, s: ImageSettings) -> list[bytes] | BadRow:
  try:
    return prepare_images(row, s)
  except BadRow as e:
    return e


def build(settings: BuildSettings) -> BuildResult:
  """Reads, splits and converts `settings.src`; returns where the dataset is and what was skipped."""
  final = os.path.join(os.path.abspath(settings.out), tfds_source.BUILDER_NAME, VERSION)
  if os.path.exists(final) and not settings.overwrite:
    raise FileExistsError(f"{final} exists: pass --overwrite to replace it")
  skipped: collections.Counter = collections.Counter()
  train, held, dropped = split_sources(settings, skipped)
  logging.info("read %d training and %d held-out rows (%d skipped while reading)", len(train), len(held),
               sum(skipped.values()))
  os.makedirs(settings.out, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".building-", dir=settings.out)
  try:
    builder = AresPrompts(splits={tfds_source.TRAIN: train, tfds_source.EVAL: held}, settings=settings,
                          skipped=skipped, data_dir=tmp)
    tfds.disable_progress_bar()  # ours counts rows (and images) per split
    builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
    counts = {name: info.num_examples for name, info in builder.info.splits.items()}
    _move_into_place(os.path.join(tmp, tfds_source.BUILDER_NAME, VERSION), final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return BuildResult(final, {s: counts.get(s, 0) for s in (tfds_source.TRAIN, tfds_source.EVAL)}, dict(skipped),
                     dropped)


def _move_into_place(built: str, final: str) -> None:
  """Renames the complete dataset to `final`; an old one is renamed away first and deleted last, so
  `final` is never a half-written dataset."""
  os.makedirs(os.path.dirname(final), exist_ok=True)
  old = None
  if os.path.exists(final):
    old = tempfile.mkdtemp(prefix=".replaced-", dir=os.path.dirname(final))
    os.rename(final, os.path.join(old, "dataset"))
  os.rename(built, final)
  if old:
    shutil.rmtree(old, ignore_errors=True)


def report(result: BuildResult) -> str:
  lines = [f"dataset: {result.path}",
           "  " + ", ".join(f"{split}: {n} rows" for split, n in result.counts.items())]
  if result.held_out_in_src:
    lines.append(f"  {result.held_out_in_src} training-file rows dropped: their id is in --eval_src")
  if result.skipped:
    lines.append(f"  skipped {sum(result.skipped.values())} rows: " +
                 ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
  else:
    lines.append("  no row skipped")
  lines.append(f"  train with --config.data.kind=tfds --config.data.tfds_dir={result.path}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def define_flags() -> None:
  d = ImageSettings()
  flags.DEFINE_multi_string("src", None, "data files or folders in any layout the reader reads", required=True)
  flags.DEFINE_string("out", None, "output folder (the dataset goes to <out>/ares_prompts/1.0.0)", required=True)
  flags.DEFINE_multi_string("eval_src", [], "held-out files; default: rows whose id hashes below eval_fraction")
  flags.DEFINE_float("eval_fraction", 0.02, "held-out fraction by id hash (without --eval_src)")
  flags.DEFINE_integer("min_pixels", d.min_pixels, "processor.min_pixels of the runs that will train on it")
  flags.DEFINE_integer("max_pixels", d.max_pixels, "processor.max_pixels of the runs that will train on it")
  flags.DEFINE_integer("image_factor", d.factor, "vision patch_size * spatial_merge_size")
  flags.DEFINE_string("image_root", "", "image paths are relative to this folder (default: each file's folder)")
  flags.DEFINE_enum("image_format", d.format, FORMATS, "stored encoding: png (lossless) or jpeg")
  flags.DEFINE_integer("jpeg_quality", d.jpeg_quality, "JPEG quality with --image_format=jpeg")
  flags.DEFINE_integer("max_image_pixels", d.max_image_pixels, "larger source images are skipped")
  flags.DEFINE_multi_string("column", [], "FIELD=COLUMN: read FIELD (question, answer, image, id, ...) from COLUMN")
  flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "image threads")
  flags.DEFINE_bool("overwrite", False, "replace an existing dataset in --out")


def settings_from_flags() -> BuildSettings:
  names = {}
  for spec in FLAGS.column:
    field, sep, column = spec.partition("=")
    if not sep or not column:
      raise app.UsageError(f"--column={spec!r}: expected FIELD=COLUMN")
    names[field] = column
  try:
    columns = Columns.with_overrides(**names)
    images = ImageSettings(FLAGS.min_pixels, FLAGS.max_pixels, FLAGS.image_factor, FLAGS.image_format,
                           FLAGS.jpeg_quality, FLAGS.max_image_pixels)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  return BuildSettings(tuple(FLAGS.src), FLAGS.out, tuple(FLAGS.eval_src), FLAGS.eval_fraction,
                       FLAGS.image_root or None, columns, images, FLAGS.workers, FLAGS.overwrite)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(report(build(settings_from_flags())))


if __name__ == "__main__":
  define_flags()
  app.run(main)
