"""Where a row's images are until a row is used: a path, bytes, base64 text (VLMEvalKit TSV) or a cell of
a parquet file. The reader keeps these references, not pixels (data/reader.py), and resolves them here."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from typing import Any

from ares_jax.data import parquet
from ares_jax.data.parquet import ParquetImage


def shared_tsv_images(rows: list) -> list:
  """VLMEvalKit stores an image repeated across rows once: the other rows' `image` holds the `index` of
  the row that has it. Such references are replaced by that row's image."""
  by_index = {str(r.index): r for r in rows if r.index is not None}
  out = []
  for r in rows:
    refs = []
    for ref in r.images:
      if isinstance(ref, Base64) and len(ref.text) < 64 and ref.text.strip().isdigit():
        other = by_index.get(ref.text.strip())
        ref = other.images[0] if other is not None and other.images else ref  # else unreadable when used
      refs.append(ref)
    out.append(dataclasses.replace(r, images=tuple(refs)))
  return out




IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")


def is_base64_image(ref: str) -> bool:
  """Whether a string column holds a base64-encoded image rather than a path: its first bytes decode to an
  image file's signature (no path starts with those characters)."""
  try:
    head = base64.b64decode(ref[:24], validate=True)
  except (binascii.Error, ValueError):
    return False
  return head.startswith(IMAGE_MAGIC)


@dataclasses.dataclass(frozen=True)
class Base64:
  """A base64-encoded image of a VLMEvalKit TSV; a short all-digit value is the `index` of another row
  whose image it shares (VLMEvalKit stores a repeated image once)."""

  text: str


def describe(ref: Any) -> str:
  if isinstance(ref, (bytes, bytearray)):
    return f"<{len(ref)} bytes>"
  if isinstance(ref, Base64):
    return f"<{len(ref.text)} base64 characters>"
  return repr(ref)[:200]


def image_bytes(ref: Any) -> bytes:
  """The encoded bytes an image reference points at; raises OSError or ValueError when it cannot."""
  if isinstance(ref, (bytes, bytearray)):
    return bytes(ref)
  if isinstance(ref, ParquetImage):
    return parquet.read_image(ref)
  if isinstance(ref, Base64):
    try:
      return base64.b64decode(ref.text, validate=True)
    except binascii.Error as e:
      raise ValueError(f"bad base64 image: {e}") from None
  with open(ref, "rb") as f:
    return f.read()
