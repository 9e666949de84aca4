"""Parquet files for the reader: text columns in row batches, embedded images read when a row is used.

A parquet dataset with embedded images (EasyR1, Hugging Face exports) holds most of its bytes in the image
column. Reading keeps only a `ParquetImage` reference per image (file, column, row, position); the bytes are
read when the row is used, one row group of that column at a time, so a run never holds a file's pictures.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Iterator, Sequence

BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class ParquetImage:
  """The `k`-th image of row `row` of a parquet file, read when the row is used."""

  path: str
  column: str
  row: int
  k: int


def records(path: str, image_columns: Sequence[str], limit: int | None = None) -> Iterator[tuple[int, dict]]:
  """Rows of the text columns, a batch at a time; image columns holding bytes become `ParquetImage`s.
  With `limit`, the first `limit` rows only, and their embedded images are not even counted (None stands
  for them): a check of the first rows reads no row group of pictures."""
  import pyarrow as pa  # pyarrow is slow to import: only parquet files need it
  import pyarrow.parquet as pq  # pyarrow is slow to import: only parquet files need it

  with pq.ParquetFile(path) as f:
    schema = f.schema_arrow
    lazy = {n for n in schema.names if n in image_columns and _holds_bytes(schema.field(n).type, pa)}
    names = [n for n in schema.names if n not in lazy]
    row_no = 0
    for batch in f.iter_batches(batch_size=BATCH_ROWS if limit is None else max(1, min(limit, BATCH_ROWS)),
                                columns=names):
      counts = {n: _image_counts(f, n, row_no, batch.num_rows) for n in lazy} if limit is None else {}
      for i, rec in enumerate(batch.to_pylist()):
        if limit is not None and row_no + i >= limit:
          return
        for n in lazy:
          rec[n] = None if limit is not None else [ParquetImage(path, n, row_no + i, k) for k in range(counts[n][i])]
        yield row_no + i, rec
      row_no += batch.num_rows


def _holds_bytes(t, pa) -> bool:
  if pa.types.is_binary(t) or pa.types.is_large_binary(t):
    return True
  if pa.types.is_struct(t):
    return any(_holds_bytes(t.field(i).type, pa) for i in range(t.num_fields))
  if pa.types.is_list(t) or pa.types.is_large_list(t):
    return _holds_bytes(t.value_type, pa)
  return False


def _image_counts(f, column: str, start: int, n: int) -> list[int]:
  """Images per row in rows [start, start + n) of a bytes-holding column, without keeping the bytes."""
  import pyarrow.compute as pc  # pyarrow is slow to import: only parquet files need it

  import pyarrow as pa  # pyarrow is slow to import: only parquet files need it

  col = _row_slice(f, column, start, n).column(0).combine_chunks()
  if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
    return [0 if v is None else int(v) for v in pc.list_value_length(col).to_pylist()]
  present = pc.is_valid(col)
  if pa.types.is_struct(col.type):  # {bytes, path} with both null is no image
    fields = [pc.is_valid(pc.struct_field(col, [i])) for i in range(col.type.num_fields)]
    any_field = fields[0]
    for x in fields[1:]:
      any_field = pc.or_(any_field, x)
    present = pc.and_(present, any_field)
  return [int(bool(v)) for v in present.to_pylist()]


def _row_slice(f, column: str, start: int, n: int):
  """Rows [start, start + n) of one column, reading only the row groups they lie in."""
  import pyarrow as pa  # pyarrow is slow to import: only parquet files need it

  md, pieces, offset = f.metadata, [], 0
  for g in range(md.num_row_groups):
    rows = md.row_group(g).num_rows
    if offset + rows > start and offset < start + n:
      t = f.read_row_group(g, columns=[column])
      lo = max(start - offset, 0)
      pieces.append(t.slice(lo, min(start + n, offset + rows) - offset - lo))
    offset += rows
  return pa.concat_tables(pieces)


class _ParquetCache:
  """The image column of the last row group read, per file: rows used in order read each group once."""

  def __init__(self):
    self._lock = threading.Lock()
    self._key, self._table, self._offset = None, None, 0

  def read(self, ref: ParquetImage) -> bytes:
    import pyarrow.parquet as pq  # pyarrow is slow to import: only parquet files need it

    with self._lock:
      with pq.ParquetFile(ref.path) as f:
        md, offset = f.metadata, 0
        for g in range(md.num_row_groups):
          rows = md.row_group(g).num_rows
          if offset <= ref.row < offset + rows:
            if self._key != (ref.path, ref.column, g):
              self._table = f.read_row_group(g, columns=[ref.column]).column(0)
              self._key, self._offset = (ref.path, ref.column, g), offset
            break
          offset += rows
        else:
          raise ValueError(f"row {ref.row} is past the end of {ref.path}")
      value = self._table[ref.row - self._offset].as_py()
    if isinstance(value, list):
      value = value[ref.k]
    if isinstance(value, dict):
      value = value.get("bytes") or value.get("path")
    if isinstance(value, str):  # a path stored beside embedded images
      with open(os.path.join(os.path.dirname(ref.path), value), "rb") as fh:
        return fh.read()
    if not value:
      raise ValueError(f"{ref.path}:{ref.row} has no bytes in image {ref.k} of column {ref.column}")
    return bytes(value)


_CACHE = _ParquetCache()


def read_image(ref: ParquetImage) -> bytes:
  """The encoded bytes of one embedded image."""
  return _CACHE.read(ref)
