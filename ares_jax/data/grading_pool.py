"""The grading pool's machinery: worker processes, and the feeder thread that keeps them busy.

The feeder thread owns the workers. It hands queued items to idle workers, collects their answers and
enforces each item's timeout, so items queued while the main thread is inside a long JAX call (a rollout's
decode; compiled calls release the GIL) are graded meanwhile, not after it returns. The main thread only
queues items (`Feeder.put`, which never blocks on a worker) and waits for results on `Feeder.cond`.

Workers are started and warmed up (math-verify imported) before they get an item, so start-up never counts
against an item's timeout; a worker whose item runs past the timeout is killed and a fresh one started
without stopping the others (it gets items once warm). A hung or crashing item scores 0 and is counted.

The workers ignore SIGTERM and SIGINT: a preemption notice sent to the whole process group (or cgroup)
reaches the training process, which finishes the step in flight, grading included, before its checkpoint;
had the workers died with it, that step's items would have timed out and trained on rewards of 0. The
parent ends them itself (`Feeder.stop`: finish, then SIGKILL after a grace period).

This module imports nothing heavy: spawned workers load it by name.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Any, Callable, Protocol


class Sink(Protocol):
  """Where an item's outcome goes (a grading batch); called by the feeder thread with `Feeder.cond` held."""

  def settle(self, index: int, value: float, outcome: str) -> None:  # outcome: "ok", "error" or "timeout"
    ...

  def fail(self, error: BaseException) -> None:  # the item will never be graded (the pool stopped or broke)
    ...


Item = tuple  # (sink, index in its sink, the arguments of fn)


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
  ready: bool = False  # warmed up: it has sent its first message
  item: Item | None = None  # the item it is grading
  deadline: float = 0.0

  def kill(self) -> None:
    self.process.kill()
    self.process.join()
    self.conn.close()


def stop_workers(workers: list[_Worker], grace_s: float) -> None:
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


class Feeder:
  """`size` workers running `fn` with `timeout_s` per item, fed by a background thread (module docstring).

  The thread and the workers start with the first item and run until `stop`; items put after a `stop`
  start them again."""

  def __init__(self, ctx, fn: Callable[..., float], size: int, timeout_s: float):
    self.cond = threading.Condition()  # guards the queue and every sink's state
    self._ctx, self._fn, self._size, self._timeout_s = ctx, fn, size, timeout_s
    self._todo: collections.deque[Item] = collections.deque()
    self._pool: list[_Worker] = []
    self._thread: threading.Thread | None = None
    self._stopping, self._grace_s = False, 0.0
    # Wakes the thread from `wait` when items arrive; one message at most in flight (`_woken`).
    self._wake_r, self._wake_w = ctx.Pipe(duplex=False)
    self._woken = False

  def put(self, items: list[Item]) -> None:
    """Queues `items` for the workers; returns at once."""
    with self.cond:
      self._todo.extend(items)
      if self._thread is None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ares_jax grading feeder", daemon=True)
        self._thread.start()
      self._wake()

  def pids(self) -> list[int]:
    """The worker processes' ids (for operators and tests: the workers must never outlive the parent)."""
    return [w.process.pid for w in list(self._pool)]

  def stop(self, grace_s: float) -> None:
    """Stops the thread and ends the workers (`grace_s` to exit, then SIGKILL); items still queued or in
    hand fail their sinks."""
    with self.cond:
      thread, self._stopping, self._grace_s = self._thread, True, grace_s
      if thread is not None:
        self._wake()
    if thread is not None and thread is not threading.current_thread():
      thread.join(grace_s + 30.0)
    stop_workers(self._pool, grace_s)  # emptied by the thread already, unless it is stuck
    with self.cond:
      if self._thread is thread and (thread is None or not thread.is_alive()):
        self._thread = None

  def _wake(self) -> None:  # with `cond` held
    if not self._woken:
      self._woken = True
      self._wake_w.send_bytes(b"w")

  def _start_worker(self) -> _Worker:
    parent, child = self._ctx.Pipe()
    proc = self._ctx.Process(target=_serve, args=(child, self._fn), name="ares_jax grader")
    proc.start()
    child.close()
    return _Worker(proc, parent)

  def _replace(self, w: _Worker) -> None:
    """Kills worker `w` and starts a fresh one in its place (it gets items once warm)."""
    w.kill()
    self._pool[self._pool.index(w)] = self._start_worker()

  def _run(self) -> None:
    error: BaseException = RuntimeError("the grader was closed before these items were graded")
    try:
      self._pool.extend(self._start_worker() for _ in range(self._size - len(self._pool)))
      while self._step():
        pass
    except BaseException as e:  # pylint: disable=broad-except  (reported to every waiting sink)
      error = RuntimeError(f"the grading pool failed: {e!r}")
      error.__cause__ = e
    finally:
      with self.cond:
        for item in [*self._todo, *(w.item for w in self._pool if w.item is not None)]:
          item[0].fail(error)
        self._todo.clear()
        self.cond.notify_all()
        if not self._stopping:  # broke: a later `put` starts afresh
          self._thread = None
      stop_workers(self._pool, self._grace_s)

  def _step(self) -> bool:
    """Hands out items, waits for an answer, a timeout or new items; False once asked to stop."""
    with self.cond:
      if self._woken:
        self._wake_r.recv_bytes()
        self._woken = False
      if self._stopping:
        return False
      idle = [w for w in self._pool if w.ready and w.item is None]
      hand = [(w, self._todo.popleft()) for w in idle[:len(self._todo)]]
    for w, item in hand:  # outside the lock: a send may wait for the pipe
      try:
        w.conn.send((item[1], item[2]))
      except OSError:  # it died while idle (killed from outside): the item goes back, a fresh worker comes
        with self.cond:
          self._todo.appendleft(item)
        self._replace(w)
        continue
      w.item, w.deadline = item, time.monotonic() + self._timeout_s
    busy = [w for w in self._pool if w.item is not None]
    first = min((w.deadline for w in busy), default=None)
    watched = {w.conn: w for w in self._pool if w.item is not None or not w.ready}
    ready = wait([*watched, self._wake_r], timeout=None if first is None else max(0.0, first - time.monotonic()))
    for conn in ready:
      if conn is self._wake_r:
        continue
      w = watched[conn]
      try:
        msg = conn.recv()
      except (EOFError, OSError):
        if not w.ready:
          raise RuntimeError(f"a grading worker exited while starting (exit code {w.process.exitcode})") from None
        self._settle(w, 0.0, "error")  # the worker died (killed from outside): its item scores 0
        self._replace(w)
        continue
      if not w.ready:  # its warm-up message
        w.ready = True
      else:
        _, ok, value = msg
        self._settle(w, value, "ok" if ok else "error")
    now = time.monotonic()
    for w in list(self._pool):
      if w.item is not None and w.deadline <= now:  # hung: score 0, replace the worker
        self._settle(w, 0.0, "timeout")
        self._replace(w)
    return True

  def _settle(self, w: _Worker, value: float, outcome: str) -> None:
    with self.cond:
      sink, index, _ = w.item
      w.item = None
      sink.settle(index, value, outcome)
      self.cond.notify_all()
