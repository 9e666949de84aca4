"""Small files in every layout the reader knows, built locally, with known bad rows (tests share them)."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def png(color: str, size: tuple[int, int] = (56, 56)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def bomb_png() -> bytes:
  """A small file that decodes to 20000 x 20000 pixels (a 1-bit image compresses to almost nothing)."""
  buf = io.BytesIO()
  Image.new("1", (20000, 20000)).save(buf, format="PNG")
  return buf.getvalue()


def write_parquet(path: Path, rows: list[dict], **kwargs) -> None:
  names = list(dict.fromkeys(k for r in rows for k in r))
  pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names}), path, **kwargs)


# ViRL39K as released: `<image>` placeholders, \boxed{} answers, image lists relative to the folder,
# pass rates with -1 for "not annotated". Rows 0-7 are good; 8-12 are bad, one per kind.
VIRL_GOOD = [
    ("q0", "<image>What is 2+2?", "\\boxed{4}", ["images/a.png"], 0.25),
    ("q1", "Compare <image> with <image>: which is red?", "\\boxed{\\text{first}}", ["images/a.png", "images/b.png"], -1),
    ("q2", "What is 3+4?", "\\boxed{7}", [], 0.5),
    ("q3", "<image>What is 10-3?", "\\boxed{7}", ["images/b.png"], 1.0),
    ("q4", "What is 6*7?", "\\boxed{42}", [], -1),
    ("q5", "<image>What is 9-1?", "\\boxed{8}", ["images/a.png"], 0.0),
    ("q6", "What is 1+1?", "\\boxed{2}", [], 0.75),
    ("q7", "<image>What is \\frac{1}{2} + \\frac{1}{2}?", "\\boxed{1}", ["images/b.png"], -1),
]
VIRL_BAD = {  # qid -> (row, the reason it is skipped for)
    "b0": (("b0", "<image> and <image>?", "\\boxed{1}", ["images/a.png"], -1), "placeholder_mismatch"),
    "b1": (("b1", "<image>Where?", "\\boxed{1}", ["images/nowhere.png"], -1), "missing_image"),
    "b2": (("b2", "<image>Broken?", "\\boxed{1}", ["images/broken.png"], -1), "unreadable_image"),
    "b3": (("b3", "<image>Huge?", "\\boxed{1}", ["images/bomb.png"], -1), "decompression_bomb"),
    "b4": (("b4", "What?", "", [], -1), "missing_answer"),
    "b5": (("b5", "word " * 300 + "?", "\\boxed{1}", [], -1), "too_long"),
}


def virl39k(root: Path) -> Path:
  folder = root / "ViRL39K"
  (folder / "images").mkdir(parents=True)
  (folder / "images" / "a.png").write_bytes(png("red"))
  (folder / "images" / "b.png").write_bytes(png("blue", (84, 56)))
  (folder / "images" / "broken.png").write_bytes(b"not a png")
  (folder / "images" / "bomb.png").write_bytes(bomb_png())
  rows = []
  for qid, q, a, imgs, rate in VIRL_GOOD + [r for r, _ in VIRL_BAD.values()]:
    rows.append({"question": q, "answer": a, "PassRate_32BTrained": rate, "PassRate_7BBase": rate,
                 "category": "math", "source": "virl", "qid": qid, "image": imgs})
  write_parquet(folder / "39Krelease.parquet", rows, row_group_size=4)
  return folder


def easyr1(root: Path) -> Path:
  """EasyR1-style parquet: problem / answer / images with embedded bytes (HF Image dicts)."""
  rows = [{"problem": f"<image>Which color is shape {i}?", "answer": ["red", "blue"][i % 2],
           "images": [{"bytes": png(["red", "blue"][i % 2]), "path": None}]} for i in range(6)]
  rows.append({"problem": "<image>Broken?", "answer": "x", "images": [{"bytes": b"junk", "path": None}]})
  rows.append({"problem": "What is 5+5?", "answer": "10", "images": []})
  path = root / "geometry_train.parquet"
  write_parquet(path, rows, row_group_size=3)
  return path


def vlmevalkit_tsv(root: Path, name: str = "MathBench") -> Path:
  """VLMEvalKit TSV: index, base64 image (a repeated image given as the index of its first row), options."""
  img = base64.b64encode(png("green")).decode()
  rows = [
      {"index": 0, "image": img, "question": "Which color?", "A": "red", "B": "green", "C": "blue", "D": "",
       "answer": "B", "category": "color"},
      {"index": 1, "image": "0", "question": "Is it dark?", "A": "yes", "B": "no", "answer": "B", "category": "color"},
      {"index": 2, "image": img, "question": "What is 1/2 as a decimal?", "A": "", "B": "", "answer": "0.5",
       "category": "arith"},
      {"index": 3, "image": "bm90IGFuIGltYWdl", "question": "Broken", "A": "", "B": "", "answer": "1",
       "category": "arith"},
  ]
  path = root / f"{name}.tsv"
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
    w.writeheader()
    w.writerows(rows)
  return path


def ares_jsonl(root: Path) -> Path:
  """The ARES cold-start layout: one teacher response a row, image paths relative to the file."""
  (root / "img").mkdir(exist_ok=True)
  (root / "img" / "red.png").write_bytes(png("red"))
  rows = [{"id": f"c{i}", "question": f"What is {i}+{i}?", "answer": str(2 * i), "image": "img/red.png",
           "response": f"<think>{i}+{i}={2 * i}</think> \\boxed{{{2 * i}}}", "source": "arith"} for i in range(4)]
  path = root / "coldstart.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path
