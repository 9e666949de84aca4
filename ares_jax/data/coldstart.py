"""Pools of AdaCS cold-start data in the ARES cold-start layout: JSONL or parquet, one teacher response a row.

AdaCS chooses among several candidate responses of each question, so rows are grouped into questions.
Images stay references (an absolute path or the encoded bytes) until a question is used: the released
pool has 223k rows, and decoding every image up front would cost minutes and gigabytes. A bad row is
skipped, counted by reason and logged with its location in the file, so one broken line in a large pool
does not stop a run and can still be found and fixed.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
from typing import Any, Iterator, Sequence

from absl import logging
from PIL import Image

_EXTENSIONS = (".jsonl", ".parquet")
# The parquet columns a pool reader uses; any others (teacher metadata, say) are never read from disk.
_COLUMNS = ("id", "question", "problem", "answer", "response", "source", "image", "images", "pass_rate",
            "difficulty")
_PARQUET_BATCH_ROWS = 1024


@dataclasses.dataclass
class PoolQuestion:
  id: str
  source: str
  question: str
  answer: str
  images: list  # absolute str paths or encoded bytes; `load_image` decodes one
  responses: list[str]  # candidate teacher responses, in file order
  pass_rate: float | None = None
  difficulty: int | None = None


class _BadRow(Exception):
  """A row that cannot join the pool; `reason` is the key it is counted under."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(detail)
    self.reason = reason


def read_pool(paths: Sequence[str], skipped: collections.Counter | None = None) -> list[PoolQuestion]:
  """Reads .jsonl / .parquet files (a directory = all such files in it, sorted) into questions.

  Rows sharing an `id` (or, without ids, the same (source, question, image references)) become one
  question with several responses; questions keep the order in which they first appear. A bad row is
  skipped, counted in `skipped` under its reason ('missing_question', 'missing_answer',
  'missing_response', 'malformed', 'pass_rate_out_of_range') and logged as 'file:line' (JSONL, 1-based)
  or 'file:row' (parquet, 0-based). A row whose answer differs from the first one seen for its question
  is dropped and counted as 'conflicting_answer': its response was judged against another answer.
  A question without an `id` gets the location of its first row, e.g. 'pool.jsonl:12'; its `pass_rate`
  and `difficulty` are the first ones given by any of its rows.
  """
  skipped = collections.Counter() if skipped is None else skipped
  questions: dict[Any, PoolQuestion] = {}
  files = _pool_files(paths)
  for path in files:
    rows = _parquet_rows(path) if path.endswith(".parquet") else _jsonl_rows(path)
    for where, raw in rows:
      try:
        key, row = _parse_row(raw, path, where)
      except _BadRow as e:
        _skip(skipped, e.reason, path, where, str(e))
        continue
      q = questions.setdefault(key, row)
      if q is row:
        continue
      if row.answer != q.answer:
        _skip(skipped, "conflicting_answer", path, where, f"{row.answer!r} != {q.answer!r} of question {q.id}")
        continue
      q.responses.extend(row.responses)
      q.pass_rate = row.pass_rate if q.pass_rate is None else q.pass_rate
      q.difficulty = row.difficulty if q.difficulty is None else q.difficulty
  logging.info("read %d questions with %d responses from %d files; skipped rows: %s", len(questions),
               sum(len(q.responses) for q in questions.values()), len(files), dict(skipped))
  return list(questions.values())


def load_image(ref: str | bytes) -> Image.Image:
  """Decodes an image reference of a `PoolQuestion` to RGB; raises ValueError naming it when unreadable."""
  try:
    if isinstance(ref, (bytes, bytearray)):
      data = bytes(ref)
    else:
      with open(ref, "rb") as f:
        data = f.read()
    return Image.open(io.BytesIO(data)).convert("RGB")
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot read image {_describe(ref)}: {e}") from e


class PoolSource:
  """A pool as a source of `PromptStream`: `len(source)` questions, `source.row(i)` decodes one.

  An unreadable image raises ValueError, which `PromptStream` counts as an unreadable row and skips.
  """

  def __init__(self, questions: Sequence[PoolQuestion]):
    self.questions = list(questions)

  def __len__(self) -> int:
    return len(self.questions)

  def row(self, index: int) -> dict[str, Any]:
    q = self.questions[index]
    try:
      images = [load_image(ref) for ref in q.images]
    except ValueError as e:
      raise ValueError(f"question {q.id} ({q.source}): {e}") from e
    return {"id": q.id, "question": q.question, "answer": q.answer, "difficulty": q.difficulty, "images": images}


def _pool_files(paths: Sequence[str]) -> list[str]:
  files = []
  for path in [paths] if isinstance(paths, str) else paths:  # one bare path, not its characters
    if os.path.isdir(path):
      found = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(_EXTENSIONS))
      if not found:
        raise ValueError(f"no .jsonl or .parquet files in {path}")
      files.extend(found)
    elif path.endswith(_EXTENSIONS):
      files.append(path)
    else:
      raise ValueError(f"{path}: a pool file must be .jsonl or .parquet")
  return files


def _jsonl_rows(path: str) -> Iterator[tuple[int, bytes]]:
  """(1-based line number, raw line); lines are parsed by `_parse_row` so a bad one is counted there."""
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        yield line_no, line


def _parquet_rows(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
  """(0-based row number, row), a batch of rows in memory at a time."""
  import pyarrow.parquet as pq  # only parquet pools need pyarrow

  with pq.ParquetFile(path) as f:
    columns = [c for c in f.schema_arrow.names if c in _COLUMNS]
    row_no = 0
    for batch in f.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
      for rec in batch.to_pylist():
        yield row_no, rec
        row_no += 1


def _parse_row(raw: bytes | dict[str, Any], path: str, where: int) -> tuple[Any, PoolQuestion]:
  """The grouping key of a row and the row as a one-response question; raises _BadRow."""
  rec = raw
  if isinstance(raw, bytes):
    try:
      rec = json.loads(raw)  # also rejects bytes that are not UTF-8
    except ValueError as e:
      raise _BadRow("malformed", f"not JSON: {e}") from None
  if not isinstance(rec, dict):
    raise _BadRow("malformed", f"a row is an object, not {type(rec).__name__}")
  question, answer, response = rec.get("question") or rec.get("problem"), rec.get("answer"), rec.get("response")
  answer = answer.strip() if isinstance(answer, str) else answer
  if not question:
    raise _BadRow("missing_question")
  if answer is None or answer == "":
    raise _BadRow("missing_answer")
  if not response:
    raise _BadRow("missing_response")
  if not isinstance(question, str) or not isinstance(response, str) or not (
      isinstance(answer, str) or _is_number(answer)):
    raise _BadRow("malformed", "question, answer and response must be text")
  pass_rate, difficulty, row_id = rec.get("pass_rate"), rec.get("difficulty"), rec.get("id")
  row_id = None if row_id == "" else row_id  # an integer id 0 is still an id
  if pass_rate is not None and not _is_number(pass_rate):
    raise _BadRow("malformed", f"pass_rate {pass_rate!r}")
  if pass_rate is not None and not 0.0 <= pass_rate <= 1.0:  # NaN is out of range too
    raise _BadRow("pass_rate_out_of_range", f"pass_rate {pass_rate!r}")
  if difficulty is not None and not (_is_number(difficulty) and float(difficulty).is_integer()):
    raise _BadRow("malformed", f"difficulty {difficulty!r}")
  if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
    raise _BadRow("malformed", f"id {row_id!r}")
  source = str(rec.get("source") or os.path.splitext(os.path.basename(path))[0])
  images = _image_refs(rec, os.path.dirname(os.path.abspath(path)))
  row = PoolQuestion(
      id=str(row_id) if row_id is not None else f"{os.path.basename(path)}:{where}", source=source,
      question=question, answer=str(answer), images=images, responses=[response],
      pass_rate=None if pass_rate is None else float(pass_rate),
      difficulty=None if difficulty is None else int(difficulty))
  key = ("id", row.id) if row_id is not None else ("content", source, question, tuple(images))
  return key, row


def _is_number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _image_refs(rec: dict[str, Any], base: str) -> list:
  refs = rec.get("images")
  if refs is None or refs == []:
    single = rec.get("image")
    refs = [] if single is None or single == "" else [single]
  if not isinstance(refs, list):
    raise _BadRow("malformed", f"images must be a list, not {type(refs).__name__}")
  out = []
  for ref in refs:
    if isinstance(ref, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
      ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)) and ref:
      out.append(bytes(ref))
    elif isinstance(ref, str) and ref:
      out.append(os.path.normpath(os.path.join(base, ref)))  # an absolute `ref` stays as it is
    else:
      raise _BadRow("malformed", f"image reference {_describe(ref)}")
  return out


def _describe(ref: Any) -> str:
  return f"<{len(ref)} bytes>" if isinstance(ref, (bytes, bytearray)) else repr(ref)[:200]


def _skip(skipped: collections.Counter, reason: str, path: str, where: int, detail: str) -> None:
  skipped[reason] += 1
  logging.warning("skipping %s:%d of the cold-start pool: %s %s", path, where, reason, detail)
