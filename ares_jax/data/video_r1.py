"""Video-R1's JSON layout (Video-R1-260k.json, its evaluation files), read as the reader's columns.

The file is one JSON list of objects: `path` (relative to the file's folder), `problem`, `problem_type`
("multiple choice", "numerical", "free-form", "OCR", "regression"), `options` (["A. left", "B. right"],
empty unless multiple choice), `solution` ("<answer>B</answer>"), `data_type` ("video" | "image"), and
`problem_id`, `data_source`, `process` (a reasoning trace). Each object becomes a record the reader parses
like a JSONL row: the path under `videos` or `images` by its data_type, the options under the option
letters, and the question followed by its options as Video-R1 asks it (benchmarks.with_options's
wording, which then adds nothing). Other `.json` files are refused: JSON data files are only this layout.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator

_OPTION = re.compile(r"^\s*([A-H])\s*[.):]\s*(.*)$", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
REQUIRED = ("path", "problem", "solution", "data_type")


def records(path: str, limit: int | None = None) -> Iterator[tuple[int, Any]]:
  """(0-based position in the list, the record as reader columns, or the raw item when it is no object).
  The whole list is parsed, even for the first rows (JSON has no line to stop at)."""
  with open(path, "rb") as f:
    try:
      data = json.load(f)
    except ValueError as e:
      raise ValueError(f"{path}: not JSON ({e}); a .json data file must be Video-R1's list of rows") from None
  first = data[0] if isinstance(data, list) and data else None
  if not isinstance(first, dict) or any(k not in first for k in REQUIRED):
    raise ValueError(f"{path}: a .json data file must be Video-R1's layout, a list of objects with "
                     f"{', '.join(REQUIRED)} (use .jsonl for one object a line)")
  for n, rec in enumerate(data if limit is None else data[:limit]):
    yield n, columns(rec) if isinstance(rec, dict) else rec


def columns(rec: dict) -> dict:
  """One Video-R1 object as the reader's columns; an unusable one keeps fields the reader refuses
  (a `data_type` it does not know leaves no media and a `malformed` marker)."""
  out = {k: v for k, v in rec.items() if k not in ("path", "options", "data_type")}
  kind, path = rec.get("data_type"), rec.get("path")
  if kind in ("video", "image") and isinstance(path, str) and path:
    out["videos" if kind == "video" else "images"] = [path]
  else:
    out["malformed"] = f"data_type {kind!r} with path {path!r}"
  options = rec.get("options") or []
  listed = []
  for text in options if isinstance(options, list) else []:
    m = _OPTION.match(str(text))
    if m:
      out[m.group(1)] = m.group(2).strip()
      listed.append(f"{m.group(1)}. {m.group(2).strip()}")
  if listed and isinstance(rec.get("problem"), str):
    out["problem"] = f"{rec['problem']}\nOptions:\n" + "\n".join(listed)
  return out


def answer_text(answer: str) -> str:
  """The content of the last `<answer>...</answer>` of an answer (Video-R1's solutions), else the answer."""
  found = _ANSWER.findall(answer)
  return found[-1].strip() if found else answer
