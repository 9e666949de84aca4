"""AdaCS cold-start pools: rows with one teacher `response` each (any layout `data/reader.py` reads),
grouped into questions with several candidate responses.

AdaCS chooses among several candidate responses of each question, so rows are grouped: rows sharing an
id are one question; without an id, rows with the same (source, question, image references) are. Images
stay references until a question is used. Bad rows are skipped, counted and located by the reader.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Sequence

from absl import logging

from ares_jax.data.parquet import ParquetImage
from ares_jax.data.reader import Columns, Row, image_bytes, read_rows, skip


@dataclasses.dataclass
class PoolQuestion:
  """A question of the pool: the first row seen of it, and every candidate response in file order."""

  row: Row
  responses: list[str]
  pass_rate: float | None = None
  difficulty: int | None = None
  keyed_by_id: bool = True

  @property
  def id(self) -> str:
    return self.row.id

  @property
  def source(self) -> str:
    return self.row.source

  @property
  def question(self) -> str:
    return self.row.question

  @property
  def answer(self) -> str:
    return self.row.answer

  @property
  def images(self) -> tuple:
    return self.row.images


def read_pool(paths: str | Sequence[str], skipped: collections.Counter | None = None, columns: Columns = Columns(),
              image_root: str | None = None) -> list[PoolQuestion]:
  """Questions of the pool files, in the order they first appear. A row whose answer differs from the
  first one seen for its question is dropped and counted as 'conflicting_answer' (its response was
  judged against another answer). A question's `pass_rate` and `difficulty` are the first given by
  any of its rows."""
  skipped = collections.Counter() if skipped is None else skipped
  questions: dict[Any, PoolQuestion] = {}
  rows = read_rows(paths, columns, image_root, skipped, need_response=True)
  for row in rows:
    by_id = row.id != row.location
    key = ("id", row.id) if by_id else ("content", row.source, row.question, _fingerprints(row.images))
    q = questions.get(key)
    if q is None:
      questions[key] = PoolQuestion(row, [row.response], row.pass_rate, row.difficulty, by_id)
      continue
    if row.answer != q.answer:
      skip(skipped, "conflicting_answer", row.location, f"{row.answer!r} != {q.answer!r} of question {q.id}")
      continue
    q.responses.append(row.response)
    q.pass_rate = row.pass_rate if q.pass_rate is None else q.pass_rate
    q.difficulty = row.difficulty if q.difficulty is None else q.difficulty
  logging.info("read %d questions with %d responses from %d rows; skipped rows: %s", len(questions),
               sum(len(q.responses) for q in questions.values()), len(rows), dict(skipped))
  return list(questions.values())


def _fingerprints(refs: tuple) -> tuple:
  """Image references as comparable values: embedded images by a digest of their bytes (two rows of one
  parquet file hold the same picture under different row references)."""
  return tuple(hashlib.sha256(image_bytes(r)).hexdigest() if isinstance(r, ParquetImage) else r for r in refs)


def question_row(q: PoolQuestion) -> Row:
  """The row a question is prompted from (its id names it, with its merged pass rate and difficulty)."""
  return dataclasses.replace(q.row, pass_rate=q.pass_rate, difficulty=q.difficulty)
