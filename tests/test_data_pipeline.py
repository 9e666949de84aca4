"""Prompt sources: bad rows are skipped, counted and reported with their index; synthetic problems."""

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from ares_jax.data import synthetic
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.data.prompts import PromptStream, RowSource, SyntheticSource
from ares_jax.data.reader import read_rows
from ares_jax.data.template import PromptTemplate, ensure_chat_template
from ares_jax.data.tokenizer import tiny_tokenizer


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  tok = ensure_chat_template(tiny_tokenizer(str(tmp_path_factory.mktemp("tok"))))
  return QwenVLProcessor.create(tok, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)


def _bare(proc):
  return PromptTemplate(proc.tokenizer, system="", instruction="")


def test_bad_rows_are_skipped_counted_and_located(tmp_path, proc, caplog):
  Image.new("RGB", (56, 56), "white").save(tmp_path / "ok.png")
  (tmp_path / "broken.png").write_bytes(b"not a png")
  rows = [
      {"question": "What is 2+2?", "answer": "4"},
      {"question": "No answer here"},
      {"question": "Look", "answer": "1", "image": "broken.png"},
      {"question": "word " * 400, "answer": "1"},
      {"question": "Shape?", "answer": "3", "image": "ok.png"},
      {"question": "Missing file", "answer": "2", "image": "nowhere.png"},
  ]
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  rows = read_rows(str(path))
  assert len(rows) == 5  # the row without an answer is dropped when read
  stream = PromptStream(RowSource(rows), proc, _bare(proc), max_prompt_length=64)
  with caplog.at_level(logging.WARNING):
    exs, pos = stream.take(0, 2)
  assert [e.row.location for e in exs] == [f"{path}:1", f"{path}:5"] and pos == 4
  assert exs[1].prompt.image_grid_thw is not None and exs[1].prompt.pixel_values.shape[1] == 1176
  assert dict(stream.skipped) == {"unreadable_image": 1, "too_long": 1}
  text = caplog.text
  assert f"{path}:2: missing_answer" in text and f"{path}:3: unreadable_image" in text
  assert f"{path}:4: too_long" in text
  more, _ = stream.take(pos, 1)  # line 6 (missing file) is skipped too, then it wraps to line 1
  assert more[0].index == 0 and stream.skipped["missing_image"] == 1


def test_a_source_with_no_usable_row_fails_clearly(tmp_path, proc):
  path = tmp_path / "bad.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "1", "image": "nowhere.png"}) + "\n")
  with pytest.raises(ValueError, match="no usable row"):
    PromptStream(RowSource(read_rows(str(path))), proc, _bare(proc), 64).take(0, 1)


def test_synthetic_problems_are_deterministic_graded_and_verifiable(proc):
  p = synthetic.problem(3, 17, 2, 5)
  assert p == synthetic.problem(3, 17, 2, 5) and 2 <= p.difficulty <= 5
  x = p.start
  for _ in range(p.difficulty):
    x = {"+": x + p.operand, "-": x - p.operand, "*": x * p.operand}[p.op] % 10
  assert p.answer == str(x) and p.trace().endswith(f"\\boxed{{{x}}}")
  assert len(p.trace(checks=2)) > len(p.trace())
  lines = re.findall(r"(\d): (\d)\+?-?\*?(\d)=(\d)\.", synthetic.problem(3, 17, 4, 4, "+").trace())
  assert [int(n) for n, *_ in lines] == [4, 3, 2, 1]  # numbered k down to 1: when to stop is local
  q = synthetic.problem(0, 1, 3, 3, "+")
  assert q.trace(slips=(0, 2)).endswith(f"\\boxed{{{(int(q.answer) + 2) % 10}}}")  # each slip adds one
  src = SyntheticSource(0, 1, 4, images=True)
  ex = PromptStream(src, proc, _bare(proc), 256).encode(0)
  assert ex.prompt.image_grid_thw is not None and ex.difficulty == src.problem(0).difficulty
  with pytest.raises(ValueError, match="ops"):
    synthetic.problem(0, 0, ops="/")
  with pytest.raises(ValueError, match="task"):
    synthetic.problem(0, 0, task="guess")


def _boxed(trace: str) -> str:
  return re.search(r"\\boxed\{(\d)\}", trace).group(1)


def test_checks_task_a_check_repairs_or_second_guesses_and_the_chain_follows_it():
  p = synthetic.problem(0, 3, 4, 4, "+", task="checks")
  assert p.difficulty == 1 + (p.operand - 1) // 3 and p.steps == 4
  right = p.trace(checked={1})
  assert right.count("check ") == 1 and _boxed(right) == p.answer
  assert _boxed(p.trace(slips={1}, checked={1})) == p.answer  # the check repairs the slip
  assert _boxed(p.trace(slips={1})) != p.answer
  assert _boxed(p.trace(checked={1}, check_slips={1})) != p.answer  # it second-guesses a right step
  assert _boxed(p.trace(slips={0, 2}, checked={0, 2})) == p.answer
  # The check re-derives the step from its input: "3: x+d=y. check x+d=z." with z right.
  x, d = p.steps_taken()[1][0], p.operand
  assert f"3: {x}+{d}={(x + d + 1) % 10}. check {x}+{d}={(x + d) % 10}." in p.trace(slips={1}, checked={1})


def test_checks_task_blind_spots_are_deterministic_and_only_a_check_repairs_them():
  spots = synthetic.Slips((0.0, 0.12, 0.3), 0.1, seed=0)
  pairs = lambda lvl: [(x, d) for d in range(3 * lvl - 2, 3 * lvl + 1) for x in range(10)]
  assert [sum(spots.step_wrong(x, d) for x, d in pairs(lvl)) for lvl in (1, 2, 3)] == [0, 4, 9]  # 0, .12, .3 of 30
  assert sum(spots.check_wrong(x, d) for lvl in (1, 2, 3) for x, d in pairs(lvl)) == 9  # 0.1 of 90
  assert synthetic.Slips((0.0, 0.12, 0.3), 0.1, seed=1) != spots
  for lvl in (1, 2, 3):
    for x, d in pairs(lvl):
      p = synthetic.Problem(0, x, "+", d, 1, "checks")
      plain, checked = _boxed(p.trace(spots=spots)), _boxed(p.trace(checked={0}, spots=spots))
      assert (plain == p.answer) == (not spots.step_wrong(x, d))  # every time, not by chance
      assert (checked == p.answer) == (not spots.check_wrong(x, d))  # a check repairs or second-guesses
  rng = np.random.default_rng(0)
  p = synthetic.Problem(0, 4, "+", 8, 5, "checks")
  assert len({p.solver_trace(spots, rng, check_rate=0.0) for _ in range(5)}) == 1
  half = [p.solver_trace(spots, rng, check_rate=0.5).count("check ") for _ in range(2000)]
  assert set(half) == {0, 5} and np.mean(half) == pytest.approx(2.5, abs=0.2)  # quick or careful
  assert [c.count("check ") for c in p.teacher_candidates(3, 0.0, rng, spots)] == [0, 5]
