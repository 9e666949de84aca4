"""A built-in, difficulty-graded reasoning task with verifiable answers: repeated digit arithmetic.

"Mod 10, start 5, apply +7 4 times = ?": the answer is the final digit in `\\boxed{}`, and the
difficulty is the number of repetitions k. The teacher trace writes one line per step, numbered k
down to 1, so the response length grows with difficulty and every decision is local: each line needs
the previous line and the prompt's operation, and the trace stops after line 1 (a count up to k
made the tiny 2-layer model guess where to stop). A slipped step (one too high) makes the trace
wrong; the warm start of the tiny config slips on purpose, so that sampled pass rates fall with k.
Problems are a pure function of (seed, index), so a data position is just an integer and a resumed
run sees the same stream. Problems can also be rendered as small images so that the vision tower
is exercised.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageDraw

OPS = ("+", "-", "*")


@dataclasses.dataclass(frozen=True)
class Problem:
  index: int
  start: int
  op: str
  operand: int
  difficulty: int  # k, the number of times the operation is applied

  @property
  def expression(self) -> str:
    return f"start {self.start}, apply {self.op}{self.operand} {self.difficulty} times"

  @property
  def question(self) -> str:
    return f"Mod 10, {self.expression} = ?"

  def steps(self) -> list[tuple[int, int]]:
    """(value before, value after) per application."""
    out, x = [], self.start
    for _ in range(self.difficulty):
      y = apply(x, self.op, self.operand)
      out.append((x, y))
      x = y
    return out

  @property
  def answer(self) -> str:
    return str(self.steps()[-1][1])

  def trace(self, checks: int = 0, slips: Collection[int] = (), boxed: bool = True) -> str:
    """Teacher response: `<think>` one line per step, numbered k down to 1 (`checks` re-verifies the
    last steps, for longer traces) `</think>` and the boxed answer. Each step i in `slips` comes out
    one too high, and every later value (and the answer) follows from it: a wrong trace (unless ten
    slips cancel). `boxed=False` states the answer as "answer: y", which the accuracy reward does
    not accept."""
    op, d = self.op, self.operand
    steps, x = [], self.start
    for i in range(self.difficulty):
      y = (apply(x, op, d) + (1 if i in slips else 0)) % 10
      steps.append((x, y))
      x = y
    lines = [f"{self.difficulty - i}: {x}{op}{d}={y}." for i, (x, y) in enumerate(steps)]
    lines += [f"check {x}{op}{d}={y}." for x, y in (steps[-checks:] if checks else [])]
    final = f"\\boxed{{{steps[-1][1]}}}" if boxed else f"answer: {steps[-1][1]}"
    return "<think> " + " ".join(lines) + f"</think> {final}"

  def teacher_candidates(self, max_checks: int, slip_rate: float, rng: np.random.Generator) -> list[str]:
    """AdaCS teacher responses of varied length: the plain trace and traces re-checking 1..max_checks
    of the last steps; each one, with probability `slip_rate`, slips once (so it is wrong)."""
    out = []
    for checks in range(max_checks + 1):
      slips = (int(rng.integers(self.difficulty)),) if rng.random() < slip_rate else ()
      out.append(self.trace(min(checks, self.difficulty), slips))
    return out


def apply(x: int, op: str, d: int) -> int:
  if op == "+":
    return (x + d) % 10
  if op == "-":
    return (x - d) % 10
  return (x * d) % 10


def problem(seed: int, index: int, min_steps: int = 1, max_steps: int = 6, ops: str = "+-*") -> Problem:
  """Problem `index` of the stream `seed`: k in [min_steps, max_steps], one operation from `ops`."""
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
  if not ops or set(ops) - set(OPS):
    raise ValueError(f"ops={ops!r}: choose a non-empty subset of {''.join(OPS)!r}")
  rng = np.random.default_rng([seed, index])
  k = int(rng.integers(min_steps, max_steps + 1))
  return Problem(index=index, start=int(rng.integers(0, 10)), op=ops[int(rng.integers(0, len(ops)))],
                 operand=int(rng.integers(1, 10)), difficulty=k)


def render(p: Problem, height: int = 56, width: int = 224) -> Image.Image:
  """The expression drawn in black on white (PIL's default bitmap font)."""
  img = Image.new("RGB", (width, height), "white")
  ImageDraw.Draw(img).text((6, height // 2 - 6), p.expression, fill="black")
  return img
