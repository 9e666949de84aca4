"""One reader for every data layout ares_jax trains or evaluates on: RL prompts, AdaCS pools, benchmarks.

Files: JSONL, parquet (read in row batches), VLMEvalKit TSV (base64 `image` column, option columns
`A`..`H`) and Video-R1's JSON list (data/video_r1.py); a folder stands for the JSONL, parquet and TSV
files below it (sorted; `images/` folders are not searched; a `.json` file is read only when named).
Videos: a `video` column holds one video (a file or frame-folder path, or a list of frame paths, as
qwen-vl-utils' `video`), a `videos` column a list of them; `<video>` placeholders place them like
`<image>`; data/video.py decodes them when a row is used.
Recognised as they ship (docs/design.md §11.1): ViRL39K (`39Krelease.parquet` + `images/`, `<image>`
placeholders, `\\boxed{}` answers, pass rates with -1 for "not annotated"), EasyR1-style parquet
(`problem` / `answer` / `images` with embedded bytes), the ARES cold-start layout (one teacher `response`
a row) and VLMEvalKit benchmarks.

Reading keeps text only: an image stays a reference (a path, base64 text, or a row of a parquet file)
until `load_images` decodes the row that is used, so a 39k-row dataset or a 223k-row pool costs
megabytes, not the gigabytes of its pictures. A row that cannot be used is skipped, counted by reason
in `skipped` and logged once with its `file:row`; reading never stops on one bad row.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import itertools
import json
import math
import os
import sys
from typing import Any, Iterator, Sequence

from absl import logging
from PIL import Image

from ares_jax.data import parquet, video_r1
from ares_jax.data.grading import last_boxed
from ares_jax.data.media_refs import Base64, describe, image_bytes, is_base64_image, shared_tsv_images
from ares_jax.data.parquet import ParquetImage

__all__ = ["describe", "image_bytes"]  # re-exported: callers read image references through the reader
FOLDER_EXTENSIONS = (".jsonl", ".parquet", ".tsv")
EXTENSIONS = FOLDER_EXTENSIONS + (".json",)  # .json: Video-R1's list layout only
LAYOUTS = {".jsonl": "JSONL", ".parquet": "parquet", ".tsv": "VLMEvalKit TSV", ".json": "Video-R1 JSON"}
OPTION_LETTERS = "ABCDEFGH"
IMAGE_PLACEHOLDER = "<image>"
VIDEO_PLACEHOLDER = "<video>"


@dataclasses.dataclass(frozen=True)
class Columns:
  """Column names tried in order for each field; the first present in a row wins. Overridable per run
  (`config.data.columns`) for layouts that name them otherwise."""

  question: tuple[str, ...] = ("question", "problem", "prompt")
  answer: tuple[str, ...] = ("answer", "solution")
  image: tuple[str, ...] = ("images", "image", "image_path")
  video: tuple[str, ...] = ("videos", "video")  # "video": one video; "videos": a list of them
  id: tuple[str, ...] = ("id", "qid", "index", "problem_id")
  source: tuple[str, ...] = ("source", "data_source")
  category: tuple[str, ...] = ("category",)
  pass_rate: tuple[str, ...] = ("pass_rate", "PassRate_7BBase")
  difficulty: tuple[str, ...] = ("difficulty",)
  response: tuple[str, ...] = ("response",)

  @classmethod
  def with_overrides(cls, **names: str) -> "Columns":
    """`Columns` whose fields given a non-empty name look only at that column."""
    unknown = set(names) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"config.data.columns has unknown fields {sorted(unknown)}")
    return cls(**{k: (v,) for k, v in names.items() if v})

  def used(self) -> set[str]:
    return {c for f in dataclasses.fields(self) for c in getattr(self, f.name)}


@dataclasses.dataclass(frozen=True)
class Row:
  """One usable row: text and image references, nothing decoded."""

  id: str  # the id column (id | qid | index), else the location
  location: str  # "file:row": 1-based line of a JSONL file, 0-based data row of parquet and TSV
  question: str  # as in the file: may hold literal `<image>` placeholders
  answer: str  # the content of a `\boxed{}` answer, else the answer as given
  images: tuple = ()  # str path | bytes | ParquetImage | PIL image (synthetic rows)
  videos: tuple = ()  # per video: a file or frame-folder path, or a tuple of frame paths
  options: dict = dataclasses.field(default_factory=dict)  # letter -> option text; empty: free form
  source: str = ""
  category: str | None = None
  pass_rate: float | None = None
  difficulty: int | None = None
  response: str | None = None  # a cold-start teacher response
  index: Any = None  # the file's own `index` column (benchmarks), else None
  extra: dict = dataclasses.field(default_factory=dict)  # every other scalar column


class BadRow(Exception):
  """A row that cannot be used; `reason` is the key it is counted under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(detail)
    self.reason = reason


def skip(skipped: collections.Counter, reason: str, location: str, detail: Any = "", what: str = "row") -> None:
  """Counts a skipped row under `reason` and logs it once with its location."""
  skipped[reason] += 1
  logging.warning("skipping %s %s: %s %s", what, location, reason, detail)


def data_files(paths: str | Sequence[str]) -> list[str]:
  """The data files of `paths`: files as given, folders searched (sorted, `images/` folders skipped)."""
  files = []
  for path in [paths] if isinstance(paths, str) else paths:
    path = os.path.expanduser(str(path))
    if os.path.isdir(path):
      found = []
      for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if d != "images" and not d.startswith("."))
        found += [os.path.join(root, n) for n in names if n.endswith(FOLDER_EXTENSIONS)]
      if not found:
        raise ValueError(f"{path}: no {', '.join(FOLDER_EXTENSIONS)} files in this folder")
      files += sorted(found)
    elif not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such file or folder")
    elif path.endswith(EXTENSIONS):
      files.append(path)
    else:
      raise ValueError(f"{path}: a data file must end in {', '.join(EXTENSIONS)}")
  return files


def read_rows(paths: str | Sequence[str], columns: Columns = Columns(), image_root: str | None = None,
              skipped: collections.Counter | None = None, need_response: bool = False) -> list[Row]:
  """Every usable row of `paths`, in file order. Bad rows ('missing_question', 'missing_answer',
  'missing_response' when `need_response`, 'malformed', 'pass_rate_out_of_range') are counted in
  `skipped` and logged with their location. Image paths are relative to their file's folder, or to
  `image_root` when given."""
  skipped = collections.Counter() if skipped is None else skipped
  out = []
  for path in data_files(paths):
    base = os.path.abspath(image_root or os.path.dirname(os.path.abspath(path)))
    rows = []
    for where, rec in _records(path, columns):
      location = f"{path}:{where}"
      try:
        rows.append(_parse(rec, path, location, columns, base, need_response))
      except BadRow as e:
        skip(skipped, e.reason, location, e)
    out += shared_tsv_images(rows) if path.endswith(".tsv") else rows
  return out


@dataclasses.dataclass(frozen=True)
class Head:
  """The first rows of a data file as `read_rows` parses them (`head`): what a startup check looks at."""

  path: str
  layout: str  # how the file is read: "JSONL", "parquet" or "VLMEvalKit TSV" (its extension says which)
  columns: tuple[str, ...]  # the columns of the rows read (a TSV's header, a parquet file's schema)
  fields: dict  # `Columns` field -> the column it is read from; "options" -> "A..D" for option columns
  rows: int  # rows read
  usable: int  # rows among them that `read_rows` keeps
  skipped: dict  # the others, by reason


def head(path: str, columns: Columns = Columns(), rows: int = 16, need_response: bool = False) -> Head:
  """The first `rows` rows of the data file `path` (not a folder) parsed as `read_rows` parses them; nothing
  past them is read (embedded parquet images are not even counted), so a startup check costs the same on
  a 223k-row pool as on a test file. Raises OSError or ValueError when the file cannot be read as its
  extension says; bad rows are counted, not logged."""
  seen, skipped, read, usable = {}, collections.Counter(), 0, 0  # seen: the columns, in order of appearance
  base = os.path.dirname(os.path.abspath(path))
  for where, raw in _records(path, columns, limit=rows):
    read += 1
    try:
      rec = _decoded(raw)
      seen.update(dict.fromkeys(rec))
      _parse(rec, path, f"{path}:{where}", columns, base, need_response)
      usable += 1
    except BadRow as e:
      skipped[e.reason] += 1
  fields = {f.name: next(c for c in getattr(columns, f.name) if c in seen) for f in dataclasses.fields(columns)
            if any(c in seen for c in getattr(columns, f.name))}
  letters = [k for k in OPTION_LETTERS if k in seen]
  if letters:
    fields["options"] = f"{letters[0]}..{letters[-1]}"
  layout = LAYOUTS[os.path.splitext(path)[1]]
  return Head(path, layout, tuple(seen), fields, read, usable, dict(skipped))


def _records(path: str, columns: Columns, limit: int | None = None) -> Iterator[tuple[int, Any]]:
  if path.endswith(".parquet"):
    yield from parquet.records(path, columns.image, limit)
  elif path.endswith(".tsv"):
    yield from itertools.islice(_tsv_records(path), limit)
  elif path.endswith(".json"):
    yield from video_r1.records(path, limit)
  else:
    with open(path, "rb") as f:
      yield from itertools.islice(((n, line) for n, line in enumerate(f, 1) if line.strip()), limit)


def _tsv_records(path: str) -> Iterator[tuple[int, dict]]:
  csv.field_size_limit(sys.maxsize)  # base64 images are long fields
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    for row_no, rec in enumerate(reader):
      yield row_no, {k: _tsv_value(v) for k, v in rec.items() if k is not None}


def _tsv_value(v: str | None) -> Any:
  return None if v is None or v == "" or v.lower() == "nan" else v


def _first(rec: dict, names: tuple[str, ...]) -> tuple[str | None, Any]:
  for n in names:
    v = rec.get(n)
    if v is not None and not (isinstance(v, float) and math.isnan(v)) and v != "" and v != []:
      return n, v
  return None, None


def _decoded(raw: Any) -> dict:
  """A raw record as a dict: a JSONL line decoded; BadRow('malformed') when it is no JSON object."""
  rec = raw
  if isinstance(raw, bytes):
    try:
      rec = json.loads(raw)
    except ValueError as e:
      raise BadRow("malformed", f"not JSON: {e}") from None
  if not isinstance(rec, dict):
    raise BadRow("malformed", f"a row is an object, not {type(rec).__name__}")
  return rec


def _parse(raw: Any, path: str, location: str, columns: Columns, base: str, need_response: bool) -> Row:
  rec = _decoded(raw)
  if "malformed" in rec and path.endswith(".json"):  # a Video-R1 object without usable media
    raise BadRow("malformed", rec["malformed"])
  _, question = _first(rec, columns.question)
  if question is None:
    raise BadRow("missing_question")
  _, answer = _first(rec, columns.answer)
  if isinstance(answer, (int, float)) and not isinstance(answer, bool):
    answer = str(answer)
  if not isinstance(question, str) or (answer is not None and not isinstance(answer, str)):
    raise BadRow("malformed", "question and answer must be text")
  answer = video_r1.answer_text(answer) if answer and "<answer>" in answer else answer
  answer = (last_boxed(answer) if answer and "\\boxed{" in answer else answer or "").strip()
  if not answer:
    raise BadRow("missing_answer")
  _, response = _first(rec, columns.response)
  if need_response and not response:
    raise BadRow("missing_response")
  if response is not None and not isinstance(response, str):
    raise BadRow("malformed", f"response {response!r:.80}")
  id_col, row_id = _first(rec, columns.id)
  if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int, float))):
    raise BadRow("malformed", f"id {row_id!r}")
  _, pass_rate = _first(rec, columns.pass_rate)
  if pass_rate is not None:
    try:
      pass_rate = float(pass_rate)
    except (TypeError, ValueError):
      raise BadRow("malformed", f"pass_rate {pass_rate!r}") from None
    if pass_rate == -1:  # ViRL39K: not annotated
      pass_rate = None
    elif not 0.0 <= pass_rate <= 1.0:  # NaN is out of range too
      raise BadRow("pass_rate_out_of_range", f"pass_rate {pass_rate!r}")
  _, difficulty = _first(rec, columns.difficulty)
  if difficulty is not None:
    try:
      if not float(difficulty).is_integer():
        raise ValueError
      difficulty = int(float(difficulty))
    except (TypeError, ValueError):
      raise BadRow("malformed", f"difficulty {difficulty!r}") from None
  options = {k: str(rec[k]).strip() for k in OPTION_LETTERS if rec.get(k) is not None and str(rec[k]).strip()}
  _, source = _first(rec, columns.source)
  _, category = _first(rec, columns.category)
  image_col, refs = _first(rec, columns.image)
  video_col, videos = _first(rec, columns.video)
  used = columns.used() | set(OPTION_LETTERS)
  extra = {k: v for k, v in rec.items() if k not in used and (v is None or isinstance(v, (str, int, float, bool)))}
  return Row(id=_id_text(row_id) if row_id is not None else location, location=location, question=question,
             answer=answer, images=_image_refs(refs, base, path, image_col),
             videos=_video_refs(videos, base, video_col), options=options,
             source=str(source) if source is not None else os.path.splitext(os.path.basename(path))[0],
             category=None if category is None else str(category), pass_rate=pass_rate, difficulty=difficulty,
             response=response, index=rec.get("index"), extra=extra)


def _id_text(v: Any) -> str:
  return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)


def _video_refs(refs: Any, base: str, column: str | None) -> tuple:
  """Paths of a row's videos: a `video` cell is one video (a path, or a list of frame paths), a `videos`
  cell a list of videos (each a path or a list of frame paths); relative paths are under `base`."""
  if refs is None:
    return ()
  videos = [refs] if isinstance(refs, str) or column == "video" else refs
  if not isinstance(videos, (list, tuple)):
    raise BadRow("malformed", f"videos {describe(refs)}")
  out = []
  for v in videos:
    frames = v if isinstance(v, (list, tuple)) else [v]
    if not frames or not all(isinstance(f, str) and f for f in frames):
      raise BadRow("malformed", f"video reference {describe(v)}")
    paths = tuple(os.path.normpath(os.path.join(base, os.path.expanduser(f))) for f in frames)
    out.append(paths if isinstance(v, (list, tuple)) else paths[0])
  return tuple(out)


def _image_refs(refs: Any, base: str, path: str, column: str | None) -> tuple:
  if refs is None:
    return ()
  if isinstance(refs, str) and refs.startswith("[") and path.endswith(".tsv"):
    try:  # VLMEvalKit writes several images of one row as a JSON list
      refs = json.loads(refs)
    except ValueError:
      pass
  if not isinstance(refs, list):
    refs = [refs]
  out = []
  for ref in refs:
    if isinstance(ref, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
      ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, ParquetImage) or (isinstance(ref, (bytes, bytearray)) and ref):
      out.append(ref if isinstance(ref, ParquetImage) else bytes(ref))
    elif isinstance(ref, str) and ref:
      if ref.startswith("data:image/") and ";base64," in ref:  # a data URL
        out.append(Base64(ref.split(";base64,", 1)[1]))
      elif (path.endswith(".tsv") and column == "image") or is_base64_image(ref):
        out.append(Base64(ref))
      else:
        out.append(os.path.normpath(os.path.join(base, os.path.expanduser(ref))))  # absolute refs stay
    else:
      raise BadRow("malformed", f"image reference {describe(ref)}")
  return tuple(out)


def load_images(row: Row, max_image_pixels: int = 89_478_485) -> list[Image.Image]:
  """The row's images decoded to RGB. Raises BadRow: 'missing_image' (no such file), 'unreadable_image'
  (not an image), 'decompression_bomb' (more than `max_image_pixels` pixels, checked from the header
  before any pixel is decoded), 'placeholder_mismatch' (`<image>` count differs from the image count)."""
  n_marks = row.question.count(IMAGE_PLACEHOLDER)
  if n_marks and n_marks != len(row.images):
    raise BadRow("placeholder_mismatch", f"{n_marks} {IMAGE_PLACEHOLDER} placeholders, {len(row.images)} images")
  out = []
  for ref in row.images:
    if isinstance(ref, Image.Image):
      out.append(ref.convert("RGB"))
      continue
    try:
      data = image_bytes(ref)
    except FileNotFoundError as e:
      raise BadRow("missing_image", str(e)) from None
    except (OSError, ValueError) as e:
      raise BadRow("unreadable_image", f"{describe(ref)}: {e}") from None
    try:
      with Image.open(io.BytesIO(data)) as img:
        w, h = img.size
        if w * h > max_image_pixels:
          raise BadRow("decompression_bomb", f"{describe(ref)}: {w}x{h} pixels > {max_image_pixels}")
        out.append(img.convert("RGB"))
    except Image.DecompressionBombError as e:
      raise BadRow("decompression_bomb", f"{describe(ref)}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
      raise BadRow("unreadable_image", f"{describe(ref)}: {e}") from None
  return out
