"""The one reader: every released layout, every bad-row kind, the prompt template and the held-out split."""

import base64
import collections
import json
import logging

import numpy as np
import pytest
from PIL import Image

import data_layouts as layouts
from ares_jax.data import parquet, reader
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.data.prompts import PromptStream, RowSource, split_rows
from ares_jax.data.template import QWEN_VL_CHAT_TEMPLATE, PromptTemplate, ensure_chat_template
from ares_jax.data.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  tok = ensure_chat_template(tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))
  return QwenVLProcessor.create(tok, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def _stream(rows, proc, max_prompt_length=256, **template):
  return PromptStream(RowSource(rows), proc, PromptTemplate(proc.tokenizer, **template), max_prompt_length,
                      max_image_pixels=10_000_000)


def test_virl39k_folder_every_bad_row_kind_skipped_counted_and_located(tmp_path, proc, caplog):
  folder = layouts.virl39k(tmp_path)
  skipped = collections.Counter()
  with caplog.at_level(logging.WARNING):
    rows = reader.read_rows(str(folder), skipped=skipped)
  assert dict(skipped) == {"missing_answer": 1}  # found when read; the rest when a row is used
  by_id = {r.id: r for r in rows}
  q1 = by_id["q1"]
  assert q1.answer == "\\text{first}" and q1.pass_rate is None and q1.category == "math" and q1.source == "virl"
  assert q1.images == (str(folder / "images" / "a.png"), str(folder / "images" / "b.png"))
  assert by_id["q0"].pass_rate == 0.25 and by_id["q0"].extra["PassRate_32BTrained"] == 0.25
  stream = _stream(rows, proc, max_prompt_length=600)
  with caplog.at_level(logging.WARNING):
    exs = [stream.encode(i) for i in range(len(rows))]
  kept = [e.row.id for e in exs if e is not None]
  assert kept == [r[0] for r in layouts.VIRL_GOOD]
  want = collections.Counter(reason for _, reason in layouts.VIRL_BAD.values() if reason != "missing_answer")
  assert stream.skipped == want
  for qid, (_, reason) in layouts.VIRL_BAD.items():
    if reason != "missing_answer":
      assert f"{by_id[qid].location}: {reason}" in caplog.text
  assert f"{folder / '39Krelease.parquet'}:12: missing_answer" in caplog.text
  # Skipped rows are logged once: a second epoch skips them silently, and counts stay per row.
  stream.take(0, 2 * len(layouts.VIRL_GOOD))
  assert stream.skipped == want


def test_placeholders_interleave_images_and_text_in_one_user_turn(tmp_path, proc):
  rows = reader.read_rows(str(layouts.virl39k(tmp_path)))
  q1 = next(r for r in rows if r.id == "q1")
  text = PromptTemplate(proc.tokenizer).render(q1.question, 2)
  vision = "<|vision_start|><|image_pad|><|vision_end|>"
  assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  f"Compare {vision} with {vision}: which is red?\n"
                  "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                  "<|im_start|>assistant\n")
  # Without placeholders the images come first; the instruction can go before the question.
  before = PromptTemplate(proc.tokenizer, instruction="Answer briefly.", position="before").render("Q?", 1)
  assert "<|im_start|>user\nAnswer briefly.\n" + vision + "Q?<|im_end|>" in before
  ex = _stream(rows, proc, max_prompt_length=600).encode(rows.index(q1))
  assert ex.prompt.image_grid_thw.shape == (2, 3)
  # The pixels are the processor's own for the decoded images (resizing first changes nothing).
  imgs = [Image.open(p).convert("RGB") for p in q1.images]
  ref = proc([text], imgs)
  np.testing.assert_array_equal(ex.prompt.ids, ref["input_ids"][0])
  np.testing.assert_array_equal(ex.prompt.pixel_values, ref["pixel_values"])


def test_template_is_the_tokenizers_chat_template(proc):
  """Rendered through transformers' own apply_chat_template with Qwen2.5-VL's template, images in place."""
  tok = proc.tokenizer
  assert tok.chat_template == QWEN_VL_CHAT_TEMPLATE  # the tiny tokenizer has none of its own
  messages = [{"role": "user", "content": [{"type": "text", "text": "A "}, {"type": "image"},
                                           {"type": "text", "text": " B\nSay it."}]}]
  ref = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  assert PromptTemplate(tok, instruction="Say it.").render("A <image> B", 1) == ref
  with pytest.raises(ValueError, match="config.data.instruction_position"):
    PromptTemplate(tok, position="middle")


def test_easyr1_parquet_images_are_read_when_used(tmp_path, proc, monkeypatch):
  path = layouts.easyr1(tmp_path)
  monkeypatch.setattr(parquet, "BATCH_ROWS", 2)
  rows = reader.read_rows(str(path))
  assert [r.answer for r in rows] == ["red", "blue"] * 3 + ["x", "10"]
  assert all(isinstance(ref, parquet.ParquetImage) for r in rows[:7] for ref in r.images) and rows[7].images == ()
  stream = _stream(rows, proc)
  exs, pos = stream.take(0, 7)
  assert pos == 8 and stream.skipped == {"unreadable_image": 1}
  colors = [reader.load_images(e.row)[0].getpixel((0, 0)) for e in exs[:6]]
  assert colors == [(255, 0, 0), (0, 0, 255)] * 3


def test_vlmevalkit_tsv_options_base64_and_shared_images(tmp_path, proc):
  rows = reader.read_rows(str(layouts.vlmevalkit_tsv(tmp_path)))
  assert [r.index for r in rows] == ["0", "1", "2", "3"]
  assert rows[0].options == {"A": "red", "B": "green", "C": "blue"} and rows[2].options == {}
  assert rows[1].images == rows[0].images  # "0": the image of the row with index 0
  assert rows[0].category == "color" and rows[0].answer == "B"
  stream = _stream(rows, proc)
  exs = [stream.encode(i) for i in range(4)]
  assert [e is None for e in exs] == [False, False, False, True]
  assert stream.skipped == {"unreadable_image": 1}
  assert reader.load_images(rows[1])[0].getpixel((0, 0)) == (0, 128, 0)


def test_ares_coldstart_jsonl_and_column_overrides(tmp_path):
  b64 = base64.b64encode(layouts.png("blue")).decode()
  (tmp_path / "b64.jsonl").write_text(
      json.dumps({"question": "Q", "answer": "1", "images": [b64, "data:image/png;base64," + b64]}) + "\n")
  [row] = reader.read_rows(str(tmp_path / "b64.jsonl"))
  assert [im.getpixel((0, 0)) for im in reader.load_images(row)] == [(0, 0, 255)] * 2
  path = layouts.ares_jsonl(tmp_path)
  rows = reader.read_rows(str(path), need_response=True)
  assert [r.id for r in rows] == ["c0", "c1", "c2", "c3"] and rows[2].response.endswith("\\boxed{4}")
  cols = reader.Columns.with_overrides(question="response", answer="id")
  assert reader.read_rows(str(path), cols)[0].question.startswith("<think>")
  with pytest.raises(ValueError, match="unknown fields"):
    reader.Columns.with_overrides(picture="x")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    reader.read_rows(str(tmp_path / "nowhere"))


def test_held_out_split_is_deterministic_and_disjoint():
  rows = [reader.Row(id=f"r{i}", location=f"f:{i}", question="q", answer="1") for i in range(2000)]
  train, held = split_rows(rows, 0.1)
  assert 150 < len(held) < 250 and len(train) + len(held) == 2000
  assert not {r.id for r in train} & {r.id for r in held}
  # The split depends on the id alone: another order, or a subset of the files, puts each row in the same split.
  train2, held2 = split_rows(rows[::-1][:1000], 0.1)
  assert {r.id for r in held2} <= {r.id for r in held} and {r.id for r in train2} <= {r.id for r in train}


def test_epochs_are_fresh_permutations(proc):
  rows = [reader.Row(id=f"r{i}", location=f"f:{i}", question=f"What is {i}?", answer=str(i)) for i in range(12)]
  stream = PromptStream(RowSource(rows), proc, PromptTemplate(proc.tokenizer), 256, shuffle=True, seed=3)
  exs, pos = stream.take(0, 24)
  first, second = [e.row.id for e in exs[:12]], [e.row.id for e in exs[12:]]
  assert pos == 24 and sorted(first) == sorted(second) == sorted(r.id for r in rows) and first != second
  again, _ = stream.take(12, 12)  # a resumed run continues the same order from its position
  assert [e.row.id for e in again] == second
