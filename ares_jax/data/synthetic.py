"""A built-in, difficulty-graded reasoning task with verifiable answers: digit arithmetic.

A problem starts from a digit and applies k operations (+d, -d, *d), each taken modulo 10;
difficulty is k. The answer is the final digit in `\\boxed{}`. Problems are a pure function of
(seed, index), so a data position is just an integer and a resumed run sees the same stream.
Teacher traces write one line per step, optionally with re-checks (longer traces for AdaCS).
Problems can also be rendered as small images so that the vision tower is exercised.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

OPS = ("+", "-", "*")


@dataclasses.dataclass(frozen=True)
class Problem:
  index: int
  start: int
  ops: tuple[tuple[str, int], ...]
  answer: str
  difficulty: int  # number of operations

  @property
  def expression(self) -> str:
    return f"{self.start} " + " ".join(f"{op}{d}" for op, d in self.ops)

  @property
  def question(self) -> str:
    return f"Mod 10: {self.expression} = ?"

  def steps(self) -> list[tuple[int, str, int, int]]:
    """(value before, op, operand, value after) per operation."""
    out, x = [], self.start
    for op, d in self.ops:
      y = apply(x, op, d)
      out.append((x, op, d, y))
      x = y
    return out

  def trace(self, checks: int = 0) -> str:
    """Teacher response: `<think>` one line per step (`checks` re-verifies the last steps) `</think>`."""
    lines = [f"{x}{op}{d}={y}." for x, op, d, y in self.steps()]
    for x, op, d, y in self.steps()[-checks:] if checks else []:
      lines.append(f"check {x}{op}{d}={y}.")
    return "<think>" + " ".join(lines) + f"</think> \\boxed{{{self.answer}}}"


def apply(x: int, op: str, d: int) -> int:
  if op == "+":
    return (x + d) % 10
  if op == "-":
    return (x - d) % 10
  return (x * d) % 10


def problem(seed: int, index: int, min_steps: int = 1, max_steps: int = 6, ops: str = "+-*") -> Problem:
  """Problem `index` of the stream `seed`: k in [min_steps, max_steps] operations drawn from `ops`."""
  if not ops or set(ops) - set(OPS):
    raise ValueError(f"ops={ops!r}: choose a non-empty subset of {''.join(OPS)!r}")
  rng = np.random.default_rng([seed, index])
  k = int(rng.integers(min_steps, max_steps + 1))
  start = int(rng.integers(0, 10))
  ops = tuple((ops[int(rng.integers(0, len(ops)))], int(rng.integers(1, 10))) for _ in range(k))
  x = start
  for op, d in ops:
    x = apply(x, op, d)
  return Problem(index=index, start=start, ops=ops, answer=str(x), difficulty=k)


def render(p: Problem, height: int = 56, width: int = 224) -> Image.Image:
  """The expression drawn in black on white (PIL's default bitmap font)."""
  img = Image.new("RGB", (width, height), "white")
  ImageDraw.Draw(img).text((6, height // 2 - 6), p.expression, fill="black")
  return img
