"""Verifiable rewards on the host (design.md 5.7): accuracy by math-verify, a format check.

Grading runs in a persistent pool of worker processes, started and warmed (math-verify imported)
before the first item so start-up never counts against an item; each item then has a timeout.
This module imports nothing heavy: spawned workers load it by name. A parse that hangs
or crashes scores 0 and is counted, and a hung worker is replaced, so grading never stalls training.
Model output is only ever parsed, never evaluated.

The workers ignore SIGTERM and SIGINT: a preemption notice sent to the whole process group (or cgroup)
reaches the training process, which finishes the step in flight, grading included, before its checkpoint;
had the workers died with it, that step's items would have timed out and trained on rewards of 0. The
parent ends them itself (`close`: finish, then SIGKILL after a grace period; also at interpreter exit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import re
import signal
import time
from multiprocessing import util as mp_util
from multiprocessing.connection import wait
from typing import Any, Sequence

import numpy as np
from tqdm import tqdm

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


def _serve(conn, fn) -> None:
  """A worker: grades (index, args) messages from the parent until it gets None or the parent is gone."""
  signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent decides when a worker stops (module docstring)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  import math_verify  # noqa: F401  (first import takes seconds: before the first item's clock starts)
  conn.send(None)
  while True:
    try:
      msg = conn.recv()
    except (EOFError, OSError):  # the parent died without saying goodbye
      return
    if msg is None:
      return
    i, args = msg
    try:
      conn.send((i, True, float(fn(*args))))
    except Exception:  # pylint: disable=broad-except  (a crashing parse scores 0)
      conn.send((i, False, 0.0))


@dataclasses.dataclass
class _Worker:
  """One worker process and the pipe to it (its own pipe: a worker killed mid-item holds no shared lock)."""

  process: Any
  conn: Any
  item: int | None = None  # the item it is grading
  deadline: float = 0.0

  def kill(self) -> None:
    self.process.kill()
    self.process.join()
    self.conn.close()


def _stop_workers(workers: list[_Worker], grace_s: float) -> None:
  """Asks every worker to exit, waits up to `grace_s` seconds, SIGKILLs the rest (they ignore SIGTERM)."""
  for w in workers:
    with contextlib.suppress(OSError):
      w.conn.send(None)
  deadline = time.monotonic() + grace_s
  for w in workers:
    w.process.join(max(0.0, deadline - time.monotonic()))
    if w.process.is_alive():
      w.kill()
    else:
      w.conn.close()
  workers.clear()


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
  A worker whose item runs past the limit is killed and replaced; `close` (or the end of the process)
  ends the workers: `grace_s` to exit, then SIGKILL.
  """

  def __init__(self, workers: int = 2, timeout_s: float = 5.0, fn=grade_one, grace_s: float = 5.0):
    self.workers, self.timeout_s, self.fn, self.grace_s = max(1, workers), timeout_s, fn, grace_s
    self._ctx = mp.get_context("spawn")  # fork would copy a JAX process with live threads
    self._pool: list[_Worker] = []
    # Runs before multiprocessing's exit hook joins child processes (which would wait forever on a worker
    # that ignores SIGTERM) when the process ends without `close`.
    self._finalizer = mp_util.Finalize(self, _stop_workers, args=(self._pool, 0.0), exitpriority=20)

  def _start_worker(self) -> _Worker:
    parent, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_serve, args=(child, self.fn), name="ares_jax grader")
    proc.start()
    child.close()
    return _Worker(proc, parent)

  def _get_pool(self) -> list[_Worker]:
    if not self._pool:
      fresh = [self._start_worker() for _ in range(self.workers)]
      for w in fresh:  # warmed up (math-verify imported) before any item's clock starts
        w.conn.recv()
      self._pool.extend(fresh)
    return self._pool

  def grade(self, responses: Sequence[str], golds: Sequence[str],
            extra: Sequence[tuple] | None = None, desc: str | None = None) -> Grades:
    """`fn` on every (response, gold, *extra[i]); a hung or crashing item scores 0 and is counted.
    `desc`: show a progress bar under that name (benchmarks grade thousands of items at once).

    In a multi-process run this is a collective: process 0 grades and broadcasts its grades, so every
    process applies the same rewards even when a wall-clock timeout would have struck on one host only
    (and the other hosts start no grading workers)."""
    import jax  # JAX stays out of the grading worker processes, which import this module

    if jax.process_count() == 1 or not len(responses):
      return self._grade_here(responses, golds, extra, desc)
    # JAX stays out of the grading worker processes, which import this module
    from jax.experimental import multihost_utils

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

    extra = [()] * len(responses) if extra is None else extra
    bar = tqdm(total=len(responses), desc=desc, unit="item", leave=False, disable=desc is None)
    acc = np.zeros(len(responses), np.float32)
    timeouts = errors = 0
    todo = list(range(len(responses)))[::-1]
    pool = self._get_pool()
    busy: dict[Any, _Worker] = {}
    while todo or busy:
      for w in list(pool):  # hand out items to idle workers
        if w.item is None and todo:
          i = todo[-1]
          try:
            w.conn.send((i, (responses[i], golds[i], *extra[i])))
          except OSError:  # it died while idle (killed from outside): a fresh one takes the item next round
            self._replace(w)
            continue
          w.item, w.deadline = todo.pop(), time.monotonic() + self.timeout_s
          busy[w.conn] = w
      first = min(w.deadline for w in busy.values())
      for conn in wait(list(busy), timeout=max(0.0, first - time.monotonic())):
        w = busy.pop(conn)
        try:
          i, ok, value = conn.recv()
        except (EOFError, OSError):  # the worker died (killed from outside): its item scores 0
          i, ok, value = w.item, False, 0.0
          self._replace(w)
        acc[i], errors, w.item = value, errors + (not ok), None
        bar.update(1)
      now = time.monotonic()
      for conn, w in list(busy.items()):
        if w.deadline <= now:  # hung: score 0, replace the worker
          del busy[conn]
          timeouts += 1
          w.item = None
          self._replace(w)
          bar.update(1)
    bar.close()
    fmt = np.array([format_ok(r) for r in responses], np.float32)
    return Grades(acc, fmt, timeouts, errors)

  def _replace(self, w: _Worker) -> None:
    """Kills worker `w` and puts a fresh one (warmed up) in its place."""
    w.kill()
    fresh = self._start_worker()
    fresh.conn.recv()
    self._pool[self._pool.index(w)] = fresh

  def close(self) -> None:
    """Ends the workers (`grace_s` to exit, then SIGKILL); a later `grade` starts new ones."""
    _stop_workers(self._pool, self.grace_s)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
