"""Verifiable rewards on the host (docs/design.md §5.7): accuracy by math-verify, a format check.

Grading runs in a persistent pool of worker processes (data/grading_pool.py), each item with a timeout: a
parse that hangs or crashes scores 0 and is counted, and a hung worker is replaced, so grading never stalls
training. Model output is only ever parsed, never evaluated. A grade is a pure function of (response,
gold), so grading items early, late or in any order gives the same grades (a timeout aside).

Two ways in: `Grader.grade` grades a list and waits; `Grader.batch` opens a batch whose items are graded
in the background as they are put (a feeder thread keeps the workers busy while the main thread is inside
JAX calls), and `result` waits only for what is left. The AEPO stage puts each group of trajectories as
it ends, so most grading hides behind the decoding of the rest.

The workers ignore SIGTERM and SIGINT (the step in flight is graded in full before a preemption's
checkpoint); `close` ends them (finish, then SIGKILL after a grace period; also at interpreter exit).
This module imports nothing heavy: spawned workers load it by name.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import re
from multiprocessing import util as mp_util
from typing import Sequence

import numpy as np
from tqdm import tqdm

from ares_jax.data import grading_pool

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


@dataclasses.dataclass
class Grades:
  accuracy: np.ndarray  # [S] float32 in {0, 1}
  format: np.ndarray  # [S] float32 in {0, 1}
  timeouts: int
  errors: int


class GradingBatch:
  """Items graded in the background from the moment they are `put`; `result` waits for the rest.

  Made by `Grader.batch`. Items carry integer `keys` (by default their order of arrival) and `result`
  returns their grades sorted by key, so a batch filled in any order (e.g. groups of a rollout as they
  end) gives what grading the items in key order at once would.
  """

  def __init__(self, feeder: grading_pool.Feeder | None):
    self._feeder = feeder  # None: another process grades (see `Grader.batch`)
    self._keys: list[int] = []
    self._responses: list[str] = []
    self._acc: list[float] = []
    self._left = self._timeouts = self._errors = 0
    self._error: BaseException | None = None
    self._done = False

  def put(self, responses: Sequence[str], golds: Sequence[str], extra: Sequence[tuple] | None = None,
          keys: Sequence[int] | None = None) -> None:
    """Queues `fn(responses[i], golds[i], *extra[i])` for every i; returns at once. `keys`: one distinct
    integer per item, the order `result` sorts by (give them for every put or for none)."""
    if self._done:
      raise RuntimeError("put after result: a grading batch is read once")
    n, first = len(responses), len(self._responses)
    if len(golds) != n or (extra is not None and len(extra) != n) or (keys is not None and len(keys) != n):
      raise ValueError(f"{n} responses need as many golds, extra tuples and keys")
    extra = [()] * n if extra is None else extra
    self._keys.extend(range(first, first + n) if keys is None else (int(k) for k in keys))
    self._responses.extend(responses)
    if self._feeder is None or not n:
      return
    with self._feeder.cond:
      self._acc.extend([0.0] * n)
      self._left += n
    self._feeder.put([(self, first + i, (responses[i], golds[i], *extra[i])) for i in range(n)])

  def settle(self, index: int, value: float, outcome: str) -> None:
    """An item's grade (called by the feeder thread, its lock held)."""
    self._acc[index] = value
    self._left -= 1
    self._timeouts += outcome == "timeout"
    self._errors += outcome == "error"

  def fail(self, error: BaseException) -> None:
    self._error = error

  def result(self, desc: str | None = None) -> Grades:
    """The grades of every item put, sorted by key; waits for those not graded yet. `desc`: show a
    progress bar under that name while waiting.

    In a multi-process run this is a collective (every process calls it, having put the same items):
    process 0 grades and broadcasts its grades, so every process applies the same rewards even when a
    wall-clock timeout would have struck on one host only (and the other hosts start no grading workers)."""
    import jax  # JAX stays out of the grading worker processes, which import this module

    self._done = True
    n = len(self._responses)
    order = np.argsort(np.asarray(self._keys, np.int64), kind="stable")
    if n and np.any(np.diff(np.asarray(self._keys)[order]) == 0):
      raise ValueError("a grading batch's keys must be distinct")
    fmt = np.array([format_ok(self._responses[i]) for i in order], np.float32).reshape(n)
    acc, counts = np.zeros(n, np.float32), np.zeros(2, np.int32)
    if self._feeder is not None and n:
      self._wait(desc)
      acc, counts = np.asarray(self._acc, np.float32)[order], np.array([self._timeouts, self._errors], np.int32)
    if jax.process_count() > 1 and n:
      from jax.experimental import multihost_utils  # late, as jax above

      acc, counts = (np.asarray(x) for x in multihost_utils.broadcast_one_to_all((acc, counts)))
    return Grades(acc.astype(np.float32), fmt, int(counts[0]), int(counts[1]))

  def _wait(self, desc: str | None) -> None:
    total = len(self._responses)
    with tqdm(total=total, desc=desc, unit="item", leave=False, disable=desc is None) as bar, self._feeder.cond:
      while self._left and self._error is None:
        bar.update(total - self._left - bar.n)
        self._feeder.cond.wait()
    if self._error is not None:
      raise self._error


class Grader:
  """Grades items in `workers` processes with a `timeout_s` limit per item.

  `fn(response, gold, *extra) -> float` must be importable by module name (it runs in spawned workers);
  `extra`, when given, holds each item's further arguments (e.g. a benchmark item's options).
  A judge that calls math-verify there passes `timeout_seconds=None`: the pool's timeout is the limit.
  A worker whose item runs past the limit is killed and replaced; `close` (or the end of the process)
  ends the workers: `grace_s` to exit, then SIGKILL.
  """

  def __init__(self, workers: int = 2, timeout_s: float = 5.0, fn=grade_one, grace_s: float = 5.0):
    self.workers, self.timeout_s, self.fn, self.grace_s = max(1, workers), timeout_s, fn, grace_s
    # spawn: fork would copy a JAX process with live threads
    self._feeder = grading_pool.Feeder(mp.get_context("spawn"), fn, self.workers, timeout_s)
    # Runs before multiprocessing's exit hook joins child processes (which would wait forever on a worker
    # that ignores SIGTERM) when the process ends without `close`.
    self._finalizer = mp_util.Finalize(self, self._feeder.stop, args=(0.0,), exitpriority=20)

  def batch(self) -> GradingBatch:
    """An empty batch: its items are graded in the background as they are put (`GradingBatch`). In a
    multi-process run only process 0 grades; `result` broadcasts its grades."""
    import jax  # JAX stays out of the grading worker processes, which import this module

    return GradingBatch(self._feeder if jax.process_index() == 0 else None)

  def grade(self, responses: Sequence[str], golds: Sequence[str],
            extra: Sequence[tuple] | None = None, desc: str | None = None) -> Grades:
    """`fn` on every (response, gold, *extra[i]), waiting for all; a hung or crashing item scores 0 and is
    counted. `desc`: show a progress bar under that name (benchmarks grade thousands of items at once).
    A collective in a multi-process run (`GradingBatch.result`)."""
    batch = self.batch()
    batch.put(responses, golds, extra)
    return batch.result(desc)

  def close(self) -> None:
    """Ends the workers (`grace_s` to exit, then SIGKILL); items not graded yet fail their batch's
    `result`. A later `put` or `grade` starts new workers."""
    self._feeder.stop(self.grace_s)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
