"""Verifiable rewards on the host (design.md 5.7): accuracy by math-verify, a format check.

Grading runs in a persistent pool of worker processes, started and warmed (math-verify imported)
before the first item so start-up never counts against an item; each item then has a timeout.
This module imports nothing heavy: spawned workers load it by name. A parse that hangs
or crashes scores 0 and is counted, and a hung worker is replaced, so grading never stalls training.
Model output is only ever parsed, never evaluated.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import re
from typing import Sequence

import numpy as np

_FORMAT = re.compile(r"^\s*<think>.*?</think>.*\\boxed\{.+\}", re.DOTALL)


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` in `text`, with nested braces matched."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def format_ok(text: str) -> bool:
  """`<think>...</think>` followed by a `\\boxed{...}` answer."""
  return bool(_FORMAT.match(text))


def grade_one(response: str, gold: str) -> float:
  """R_acc: 1.0 if the last boxed answer equals the ground truth under math-verify, else 0.0."""
  from math_verify import parse, verify  # imported in the worker process

  answer = last_boxed(response)
  if answer is None:
    return 0.0
  gold_parsed = parse(f"${gold}$")
  pred = parse(f"$\\boxed{{{answer}}}$")
  if not gold_parsed or not pred:
    return float(answer.strip() == gold.strip())
  return float(verify(gold_parsed, pred))


def _warm_up(_: int) -> None:
  import math_verify  # noqa: F401  (first import takes seconds)


@dataclasses.dataclass
class Grades:
  accuracy: np.ndarray  # [S] float32 in {0, 1}
  format: np.ndarray  # [S] float32 in {0, 1}
  timeouts: int
  errors: int


class Grader:
  """Grades batches in `workers` processes with a `timeout_s` limit per item.

  `fn(response, gold, *extra) -> float` must be importable by module name (it runs in spawned workers);
  `extra`, when given to `grade`, holds each item's further arguments (e.g. a benchmark item's options).
  A judge that calls math-verify there passes `timeout_seconds=None`: the pool's timeout is the limit.
  """

  def __init__(self, workers: int = 2, timeout_s: float = 5.0, fn=grade_one):
    self.workers, self.timeout_s, self.fn = max(1, workers), timeout_s, fn
    self._ctx = mp.get_context("spawn")  # fork would copy a JAX process with live threads
    self._pool = None

  def _get_pool(self):
    if self._pool is None:
      self._pool = self._ctx.Pool(self.workers)
      self._pool.map(_warm_up, range(self.workers))
    return self._pool

  def _restart(self) -> None:
    if self._pool is not None:
      self._pool.terminate()
      self._pool.join()
    self._pool = None

  def grade(self, responses: Sequence[str], golds: Sequence[str],
            extra: Sequence[tuple] | None = None, desc: str | None = None) -> Grades:
    """`fn` on every (response, gold, *extra[i]); a hung or crashing item scores 0 and is counted.
    `desc`: show a progress bar under that name (benchmarks grade thousands of items at once).

    In a multi-process run this is a collective: process 0 grades and broadcasts its grades, so every
    process applies the same rewards even when a wall-clock timeout would have struck on one host only
    (and the other hosts start no grading workers)."""
    import jax  # pylint: disable=g-import-not-at-top  (workers import this module: keep it light)

    if jax.process_count() == 1 or not len(responses):
      return self._grade_here(responses, golds, extra, desc)
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    n = len(responses)
    if jax.process_index() == 0:
      mine = self._grade_here(responses, golds, extra, desc)
      acc, counts = mine.accuracy, np.array([mine.timeouts, mine.errors], np.int32)
    else:
      acc, counts = np.zeros(n, np.float32), np.zeros(2, np.int32)
    acc, counts = (np.asarray(x) for x in multihost_utils.broadcast_one_to_all((acc, counts)))
    fmt = np.array([format_ok(r) for r in responses], np.float32)  # a pure function of the text
    return Grades(acc.astype(np.float32), fmt, int(counts[0]), int(counts[1]))

  def _grade_here(self, responses: Sequence[str], golds: Sequence[str],
                  extra: Sequence[tuple] | None = None, desc: str | None = None) -> Grades:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (workers import this module: keep it light)

    extra = [()] * len(responses) if extra is None else extra
    bar = tqdm(total=len(responses), desc=desc, unit="item", leave=False, disable=desc is None)
    acc = np.zeros(len(responses), np.float32)
    timeouts = errors = 0
    todo = list(range(len(responses)))
    while todo:
      pool = self._get_pool()
      jobs = {i: pool.apply_async(self.fn, (responses[i], golds[i], *extra[i])) for i in todo}
      todo = []
      for i, job in jobs.items():
        try:
          acc[i] = job.get(timeout=self.timeout_s)
        except mp.TimeoutError:  # item i hung: score 0, replace the pool, regrade what did not finish
          timeouts += 1
          later = [j for j in jobs if j > i]
          for j in later:
            if jobs[j].ready():
              bar.update(1)
              try:
                acc[j] = jobs[j].get()
              except Exception:
                errors += 1
            else:
              todo.append(j)
          self._restart()
          break
        except Exception:  # a crashing parse scores 0
          errors += 1
        finally:
          bar.update(1)
    bar.close()
    fmt = np.array([format_ok(r) for r in responses], np.float32)
    return Grades(acc, fmt, timeouts, errors)

  def close(self) -> None:
    self._restart()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
