"""Built-in, difficulty-graded reasoning tasks with verifiable answers: repeated digit arithmetic.

"Mod 10, start 5, apply +7 4 times = ?": the answer is the final digit in `\\boxed{}`. The trace writes
one line per step, numbered k down to 1, and stops after line 1 (a count up to k made the tiny 2-layer
model guess where to stop); every decision is local: a line needs the previous value and the operation.
Two tasks share the problems:

- `steps`: the difficulty is the number of steps k; the response length grows with it by construction.
  The warm start slips (one step one too high) at a fixed rate, so sampled pass rates fall with k.
- `checks` (docs/design.md §12): how much to think is the policy's choice. Every problem has k steps; the
  difficulty is the operand's level L (1: +1..+3, 2: +4..+6, 3: +7..+9). The stand-in solvers (warm
  start, AdaCS teachers) have blind spots (`Slips`): (value, operand) pairs whose step they compute one
  too high every time, a fraction p_L of each level's pairs. A solver works quick (one line per step) or
  careful: after every step a check line, "check x+d=z.", re-derives the step from its input, and the
  chain goes on from z. Checks have blind spots of their own (a fraction q of all pairs, drawn
  independently): a check repairs a step's blind spot unless it hits one itself, and second-guesses a
  right step into a wrong one when it does. Careful costs 9 tokens a step everywhere and pays where
  steps are unreliable. With the tiny config's p = (0, 0.12, 0.3), q = 0.1 and k = 5, accuracy over
  all 30 problems of a level (start 0..9 and its three operands), for the blind spots of seeds 0 / 1 / 2:

      level (operands)   quick (58 tokens)   careful (103 tokens)   base (careful half the time)
      1 (+1..+3)         1.00 / 1.00 / 1.00  0.53 / 0.43 / 0.63     0.77 / 0.72 / 0.82
      2 (+4..+6)         0.43 / 0.43 / 0.67  0.60 / 0.93 / 0.93     0.52 / 0.68 / 0.80
      3 (+7..+9)         0.13 / 0.13 / 0.03  0.83 / 0.67 / 0.57     0.48 / 0.40 / 0.30

  The best policy thinks briefly on easy problems (quick on level 1) and at length on hard ones (careful
  on level 3): length should fall on level 1 and rise on level 3, with accuracy up on both. The
  warm-started base works careful with probability `warm_start.check_rate` whatever the problem, so it is
  neither always- nor never-checking, and its pass rates spread over the easy, medium and hard bins.
  Blind spots are deterministic: RL cannot sample its way out of them (a wrong value the base writes
  every time is never rewarded as right); what it can learn is when to work carefully. That decision,
  the first check line or its absence, is the task's moment of uncertainty: a single token where token
  entropy runs high.

Problems are a pure function of (seed, index), so a data position is just an integer and a resumed run
sees the same stream. Problems can also be rendered as small images so that the vision tower is exercised.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection

import numpy as np
from PIL import Image, ImageDraw

OPS = ("+", "-", "*")
TASKS = ("steps", "checks")
OPERANDS_PER_LEVEL = 3  # checks task: operands 1-3, 4-6, 7-9 are difficulty levels 1, 2, 3


def difficulty_meaning(task: str) -> str:
  """What a difficulty level of `task` counts, for tables and plot axes."""
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  if task == "steps":
    return "the number of steps k"
  k = OPERANDS_PER_LEVEL
  ranges = ", ".join(f"{1 + i * k}-{(i + 1) * k}" for i in range(9 // k))  # operands are 1..9
  return f"the operand's level (operands {ranges})"


@dataclasses.dataclass(frozen=True)
class Slips:
  """Where the stand-in solvers (warm-start traces, AdaCS teachers) of the checks task go wrong: blind spots,
  (value, operand) pairs whose step (or check line) they compute one too high every time. A fraction
  `levels[L - 1]` of level L's 30 pairs are step blind spots and a fraction `check` of all 90 pairs are
  check blind spots, drawn once from `seed`. Deterministic, unlike a sampled slip: a policy that samples
  its blind-spot step right almost never cannot learn it right from its rewards either, but it can learn
  where a check pays."""
  levels: tuple[float, ...]
  check: float = 0.0
  seed: int = 0

  def step_wrong(self, x: int, d: int) -> bool:
    return (x, d) in _blind_spots(tuple(self.levels), self.check, self.seed)[0]

  def check_wrong(self, x: int, d: int) -> bool:
    return (x, d) in _blind_spots(tuple(self.levels), self.check, self.seed)[1]


@functools.lru_cache(maxsize=8)
def _blind_spots(levels: tuple[float, ...], check: float, seed: int) -> tuple[frozenset, frozenset]:
  rng = np.random.default_rng([seed, 77])
  step = set()
  for lvl, frac in enumerate(levels, start=1):
    pairs = [(x, d) for d in range(OPERANDS_PER_LEVEL * (lvl - 1) + 1, OPERANDS_PER_LEVEL * lvl + 1)
             for x in range(10)]
    step.update(pairs[i] for i in rng.permutation(len(pairs))[:round(frac * len(pairs))])
  pairs = [(x, d) for d in range(1, 10) for x in range(10)]
  return frozenset(step), frozenset(pairs[i] for i in rng.permutation(len(pairs))[:round(check * len(pairs))])


@dataclasses.dataclass(frozen=True)
class Problem:
  index: int
  start: int
  op: str
  operand: int
  steps: int  # k, the number of times the operation is applied
  task: str = "steps"

  @property
  def difficulty(self) -> int:
    """k for the steps task; the operand's level (1..3) for the checks task."""
    return self.steps if self.task == "steps" else 1 + (self.operand - 1) // OPERANDS_PER_LEVEL

  @property
  def expression(self) -> str:
    return f"start {self.start}, apply {self.op}{self.operand} {self.steps} times"

  @property
  def question(self) -> str:
    return f"Mod 10, {self.expression} = ?"

  def steps_taken(self) -> list[tuple[int, int]]:
    """(value before, value after) per application."""
    out, x = [], self.start
    for _ in range(self.steps):
      y = apply(x, self.op, self.operand)
      out.append((x, y))
      x = y
    return out

  @property
  def answer(self) -> str:
    return str(self.steps_taken()[-1][1])

  def trace(self, checks: int = 0, slips: Collection[int] = (), boxed: bool = True,
            checked: Collection[int] = (), check_slips: Collection[int] = (), spots: Slips | None = None) -> str:
    """Teacher response: `<think>` one line per step, numbered k down to 1, `</think>` and the boxed answer.

    Each step i in `slips` comes out one too high. A step i in `checked` is followed by a check line that
    re-derives it from its input (one too high when i is in `check_slips`), and the chain goes on from the
    check's value: the checks task. With `spots`, a step or check on a blind spot comes out one too high as
    well. `checks` appends re-check lines for the last steps, which change nothing (the steps task's longer
    traces). A slip nobody repairs makes every later value and the answer wrong (unless ten slips cancel).
    `boxed=False` states the answer as "answer: y", which the accuracy reward does not accept."""
    op, d = self.op, self.operand
    lines, done, x = [], [], self.start
    for i in range(self.steps):
      right = apply(x, op, d)
      y = (right + (i in slips or (spots is not None and spots.step_wrong(x, d)))) % 10
      lines.append(f"{self.steps - i}: {x}{op}{d}={y}.")
      if i in checked:
        y = (right + (i in check_slips or (spots is not None and spots.check_wrong(x, d)))) % 10
        lines.append(f"check {x}{op}{d}={y}.")
      done.append((x, y))
      x = y
    lines += [f"check {x}{op}{d}={y}." for x, y in (done[-checks:] if checks else [])]
    final = f"\\boxed{{{x}}}" if boxed else f"answer: {x}"
    return "<think> " + " ".join(lines) + f"</think> {final}"

  def solver_trace(self, spots: Slips, rng: np.random.Generator, check_rate: float = 0.0,
                   careful: bool | None = None, boxed: bool = True) -> str:
    """A checks-task solver's trace: careful (every step checked) with probability `check_rate`, or as
    `careful` says, else quick (no checks); steps and checks on blind spots come out one too high."""
    if careful is None:
      careful = bool(rng.random() < check_rate)
    return self.trace(checked=set(range(self.steps)) if careful else set(), spots=spots, boxed=boxed)

  def teacher_candidates(self, max_checks: int, slip_rate: float, rng: np.random.Generator,
                         spots: Slips | None = None) -> list[str]:
    """AdaCS teacher responses of varied length. Steps task: the plain trace and traces re-checking 1..
    max_checks of the last steps; each one, with probability `slip_rate`, slips once (so it is wrong).
    Checks task (`spots` given): the quick trace and the careful one, so that which of them comes out
    correct shows whether checking pays."""
    if spots is not None:
      return [self.solver_trace(spots, rng, careful=c) for c in (False, True)]
    out = []
    for checks in range(max_checks + 1):
      slipped = (int(rng.integers(self.steps)),) if rng.random() < slip_rate else ()
      out.append(self.trace(min(checks, self.steps), slipped))
    return out


def apply(x: int, op: str, d: int) -> int:
  if op == "+":
    return (x + d) % 10
  if op == "-":
    return (x - d) % 10
  return (x * d) % 10


def problem(seed: int, index: int, min_steps: int = 1, max_steps: int = 6, ops: str = "+-*",
            task: str = "steps") -> Problem:
  """Problem `index` of the stream `seed`: k in [min_steps, max_steps], one operation from `ops`, an
  operand in 1..9 (the checks task's difficulty level comes from it)."""
  if not 1 <= min_steps <= max_steps:
    raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
  if not ops or set(ops) - set(OPS):
    raise ValueError(f"ops={ops!r}: choose a non-empty subset of {''.join(OPS)!r}")
  if task not in TASKS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  rng = np.random.default_rng([seed, index])
  k = int(rng.integers(min_steps, max_steps + 1))
  return Problem(index=index, start=int(rng.integers(0, 10)), op=ops[int(rng.integers(0, len(ops)))],
                 operand=int(rng.integers(1, 10)), steps=k, task=task)


def render(p: Problem, height: int = 56, width: int = 224) -> Image.Image:
  """The expression drawn in black on white (PIL's default bitmap font)."""
  img = Image.new("RGB", (width, height), "white")
  ImageDraw.Draw(img).text((6, height // 2 - 6), p.expression, fill="black")
  return img
