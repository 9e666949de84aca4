"""Cold-start pools: rows grouped into questions, JSONL and parquet alike, bad rows skipped and located."""

import collections
import io
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ares_jax.data import parquet, reader
from ares_jax.data.coldstart import question_row, read_pool
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.data.prompts import PromptStream, RowSource
from ares_jax.data.reader import Row, load_images
from ares_jax.data.template import PromptTemplate
from ares_jax.data.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  tok = tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))
  return QwenVLProcessor.create(tok, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def _png(color: str) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (56, 56), color).save(buf, format="PNG")
  return buf.getvalue()


def _write_jsonl(path, rows) -> None:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _write_parquet(path, rows, **kwargs) -> None:
  """Rows as columns, a field missing from a row being null there (`from_pylist` keeps the first row's only)."""
  names = list(dict.fromkeys(k for r in rows for k in r))
  pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in names}), path, **kwargs)


# Two questions with ids (two responses each, interleaved), one without ids (two rows), and one without
# ids that differs from it only in its image; images as written in a JSONL file.
ROWS = [
    {"id": "q1", "question": "Area?", "answer": "12", "response": "r1a", "image": "img/red.png",
     "pass_rate": 0.5, "difficulty": 3},
    {"id": "q2", "question": "Sides?", "answer": "3", "response": "r2a", "images": ["img/red.png", "img/blue.png"]},
    {"id": "q1", "question": "Area?", "answer": "12", "response": "r1b", "image": "img/red.png", "pass_rate": 0.5},
    {"problem": "Angle?", "answer": "90", "response": "r3a", "image": "img/blue.png", "source": "geo"},
    {"id": "q2", "question": "Sides?", "answer": "3", "response": "r2b", "images": ["img/red.png", "img/blue.png"]},
    {"problem": "Angle?", "answer": "90", "response": "r3b", "image": "img/blue.png", "source": "geo"},
    {"problem": "Angle?", "answer": "45", "response": "r4a", "image": "img/red.png", "source": "geo"},
]


@pytest.fixture
def jsonl_pool(tmp_path):
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "red.png").write_bytes(_png("red"))
  (tmp_path / "img" / "blue.png").write_bytes(_png("blue"))
  _write_jsonl(tmp_path / "mathv.jsonl", ROWS)
  return tmp_path / "mathv.jsonl"


def load_image(ref):
  return load_images(Row(id="x", location="x", question="q", answer="a", images=(ref,)))[0]


def _summary(questions):
  return [(q.source, q.question, q.answer, q.responses, q.pass_rate, q.difficulty,
           [load_image(r).getpixel((0, 0)) for r in q.images]) for q in questions]


EXPECTED = [
    ("mathv", "Area?", "12", ["r1a", "r1b"], 0.5, 3, [(255, 0, 0)]),
    ("mathv", "Sides?", "3", ["r2a", "r2b"], None, None, [(255, 0, 0), (0, 0, 255)]),
    ("geo", "Angle?", "90", ["r3a", "r3b"], None, None, [(0, 0, 255)]),
    ("geo", "Angle?", "45", ["r4a"], None, None, [(255, 0, 0)]),
]


def test_jsonl_rows_group_into_questions_by_id_or_content(jsonl_pool):
  skipped = collections.Counter()
  questions = read_pool([str(jsonl_pool)], skipped)
  assert not skipped
  assert [q.id for q in questions] == ["q1", "q2", f"{jsonl_pool}:4", f"{jsonl_pool}:7"]
  assert _summary(questions) == EXPECTED
  assert questions[0].images == (str(jsonl_pool.parent / "img" / "red.png"),)
  assert read_pool(str(jsonl_pool.parent)) == questions  # a directory, or a bare path


def test_parquet_with_image_bytes_groups_like_jsonl(tmp_path, monkeypatch):
  blobs = {"img/red.png": _png("red"), "img/blue.png": _png("blue")}
  rows = []
  for r in ROWS:
    r = dict(r)
    if "image" in r:
      r["image"] = {"bytes": blobs[r["image"]], "path": r["image"]}
    if "images" in r:
      r["images"] = [{"bytes": blobs[p], "path": None} for p in r["images"]]
    rows.append(r)
  _write_parquet(tmp_path / "mathv.parquet", rows, row_group_size=3)
  monkeypatch.setattr(parquet, "BATCH_ROWS", 2)  # a question spans batches and row groups
  path = tmp_path / "mathv.parquet"
  questions = read_pool([str(path)])
  assert [q.id for q in questions] == ["q1", "q2", f"{path}:3", f"{path}:6"]
  assert _summary(questions) == EXPECTED
  # Image bytes stay in the file until a row is used: rows hold (file, row, image) references.
  assert all(isinstance(r, parquet.ParquetImage) for q in questions for r in q.images)


def test_bad_rows_are_skipped_counted_and_located(tmp_path, caplog):
  Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
  good = {"id": "g", "question": "Q?", "answer": "1", "response": "ok", "image": "a.png"}
  lines = [
      json.dumps(good),
      json.dumps({"id": "b1", "question": "Q?", "response": "r"}),
      json.dumps({"id": "b2", "question": "Q?", "answer": "1"}),
      '{"id": "b3", "question": "Q?", ',
      json.dumps({"id": "b4", "question": "Q?", "answer": "1", "response": "r", "pass_rate": 1.5}),
      "",
      json.dumps({"id": "b5", "answer": "1", "response": "r"}),
      json.dumps({"id": "b6", "question": "Q?", "answer": "1", "response": "r", "images": 5}),
      json.dumps({**good, "answer": "2", "response": "other"}),
      json.dumps([1, 2]),
      json.dumps({**good, "response": "ok2", "difficulty": 4}),
  ]
  (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
  _write_parquet(tmp_path / "bad.parquet", [good, {**good, "answer": None}])
  skipped = collections.Counter()
  with caplog.at_level(logging.WARNING):
    questions = read_pool([str(tmp_path)], skipped)
  assert dict(skipped) == {"missing_answer": 2, "missing_response": 1, "malformed": 3, "pass_rate_out_of_range": 1,
                           "missing_question": 1, "conflicting_answer": 1}
  [q] = questions
  assert (q.id, q.answer, q.responses, q.difficulty) == ("g", "1", ["ok", "ok2", "ok"], 4)
  for where in ("bad.jsonl:2:", "bad.jsonl:4:", "bad.jsonl:5:", "bad.jsonl:9:", "bad.parquet:1:"):
    assert where in caplog.text
  assert "pass_rate_out_of_range" in caplog.text and "conflicting_answer" in caplog.text


def test_load_image_names_an_unreadable_reference(tmp_path):
  missing = str(tmp_path / "nowhere.png")
  with pytest.raises(reader.BadRow, match="nowhere.png") as e:
    load_image(missing)
  assert e.value.reason == "missing_image"
  with pytest.raises(reader.BadRow, match="<9 bytes>") as e:
    load_image(b"not a png")
  assert e.value.reason == "unreadable_image"
  assert load_image(_png("red")).mode == "RGB"


def test_pool_source_skips_a_question_with_a_corrupt_image(tmp_path, proc, caplog):
  (tmp_path / "red.png").write_bytes(_png("red"))
  rows = [  # the first image only by its path, relative to the parquet file
      {"id": "a", "question": "Shape?", "answer": "3", "response": "r", "image": {"bytes": None, "path": "red.png"}},
      {"id": "b", "question": "Look", "answer": "1", "response": "r", "image": {"bytes": b"broken", "path": None}},
      {"id": "c", "question": "What is 2+2?", "answer": "4", "response": "r"},
  ]
  _write_parquet(tmp_path / "pool.parquet", rows)
  source = RowSource([question_row(q) for q in read_pool([str(tmp_path / "pool.parquet")])])
  stream = PromptStream(source, proc, PromptTemplate(proc.tokenizer, system="", instruction=""), 256)
  with caplog.at_level(logging.WARNING):
    exs, pos = stream.take(0, 2)
  assert [e.index for e in exs] == [0, 2] and pos == 3
  assert exs[0].prompt.image_grid_thw is not None and exs[1].prompt.image_grid_thw is None
  assert (exs[1].answer, exs[1].question) == ("4", "What is 2+2?")
  assert dict(stream.skipped) == {"unreadable_image": 1} and "pool.parquet:1: unreadable_image" in caplog.text
