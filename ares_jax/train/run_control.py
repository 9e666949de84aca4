"""When a training loop stops before its last step: preemption (stop cleanly, resumable) and runs whose
updates keep coming out non-finite (stop with an error instead of spinning).

Preemption. Spot and maintenance-preempted TPU slices (and batch schedulers) send SIGTERM some time before
they kill a job. `StopRequests.should_stop(step)`, called by every process at the end of every step,
turns that into one step at which every process stops; the loop then writes a checkpoint at that step
and raises `Preempted` (a `SystemExit` with code 0). How a request is detected and agreed on:

- one process: a Python SIGTERM handler sets a flag; `should_stop` reads it (no cost).
- several processes after `jax.distributed.initialize()` with JAX's preemption service (the default):
  `jax.distributed.initialize()` installs JAX's own (C++) SIGTERM handler in every process, which only
  records a notice and spreads it through the coordination service (nothing asked it before, which is why
  SIGTERM left a multi-process run training on); `multihost_utils.reached_preemption_sync_point(step)`
  then returns True on every process at the same step (the largest step any process has reported, plus
  one: the end of the step in progress once the notice has spread; JAX polls for SIGTERM once a second, so
  a step shorter than that may run one more). Cost: a local check, ~3 us per step (measured, CPU). The
  step ids must be the training steps, as orbax's CheckpointManager passes the same ids to the same
  service when it saves. (In the `ares` pipeline AEPO counts from 1 again after AdaCS's SFT: a notice that
  falls between the two loops may only be honoured at AEPO step T+1, T the SFT's last step.)
- several processes without that service (`jax_enable_preemption_service=False`): the Python handler,
  and an any-reduction of the flags (`process_allgather`) at every step: 2-6 ms per step (2 CPU processes,
  gloo; measured by tests/test_preemption.py).

A second SIGTERM to a single process (or with the allgather fallback) kills it at once (the default
action), for when waiting for the step is not wanted.

tests/test_preemption.py checks all of this with real SIGTERMs sent from outside, as a scheduler sends them.
"""

from __future__ import annotations

import signal
import threading
import time

import jax
import numpy as np
from absl import logging
from jax._src import distributed  # the preemption sync manager's state (no public accessor)
from jax.experimental import multihost_utils


class Preempted(SystemExit):
  """Raised after the checkpoint at `step` is written (`where`; None for a loop without checkpoints, which a
  rerun redoes): the process exits with code 0 and the same command, with the same workdir, resumes."""

  def __init__(self, stage: str, step: int, where: str | None):
    super().__init__(0)
    self.stage, self.step, self.where = stage, step, where
    logging.warning("%s", self)  # SystemExit(0) prints nothing: this line says where to resume from

  def __str__(self) -> str:
    if self.where is None:
      return (f"{self.stage}: preempted; stopped after step {self.step} (it keeps no checkpoint); rerun the "
              "same command (same --config.workdir) to start it again and go on")
    return (f"{self.stage}: preempted; stopped after step {self.step} with a checkpoint at {self.where}; "
            "rerun the same command (same --config.workdir) to resume from it")


class SkippedUpdatesError(RuntimeError):
  """Too many optimizer updates in a row were skipped as non-finite: the run makes no progress."""


def _jax_preemption_service() -> bool:
  """Whether JAX's preemption sync manager runs (a multi-process run after jax.distributed.initialize)."""
  state = distributed.global_state
  return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class StopRequests:
  """Detects preemption requests and agrees on the step to stop at (see the module docstring).

  `loop` names the loop in the log line of a request. Use as a context manager (or call `close`) so that the
  previous SIGTERM handler comes back."""

  def __init__(self, enabled: bool = True, loop: str = ""):
    self.enabled, self.loop = enabled, loop
    self._requested_at: float | None = None
    self._previous = None
    self._installed = False
    multi = jax.process_count() > 1
    if not enabled:
      self.mode = "off"
    elif multi and _jax_preemption_service():
      self.mode = "jax"
    else:
      self.mode = "allgather" if multi else "signal"
      if threading.current_thread() is threading.main_thread():
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
      else:  # signal handlers can only be set from the main thread
        logging.warning("not on the main thread: SIGTERM keeps its default action (no preemption checkpoint)")
    logging.info("preemption: %s", {"off": "not handled", "signal": "SIGTERM handler",
                                    "jax": "JAX preemption sync point", "allgather": "SIGTERM handler + allgather"
                                    }[self.mode])

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._requested_at = time.monotonic()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once

  def should_stop(self, step: int) -> bool:
    """Whether every process stops after `step`; all processes call this at the end of every step."""
    if self.mode == "off":
      return False
    if self.mode == "jax":
      stop = bool(multihost_utils.reached_preemption_sync_point(step))
    elif self.mode == "allgather":
      flags = multihost_utils.process_allgather(np.array([self._requested_at is not None], np.int32))
      stop = bool(np.any(flags))
    else:
      stop = self._requested_at is not None
    if stop:
      since = ("" if self._requested_at is None else
               f", SIGTERM {time.monotonic() - self._requested_at:.1f} s ago on this process")
      logging.warning("%spreemption requested (%s%s): stopping after step %d", f"{self.loop}: " if self.loop else "",
                      self.mode, since, step)
    return stop

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
      self._installed = False

  def __enter__(self) -> "StopRequests":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class SkipGuard:
  """Counts optimizer updates skipped as non-finite in a row; `tripped` once there are `limit` (0: never).
  Every process sees the same skip flags (they come from global values), so all processes stop together."""

  def __init__(self, limit: int, field: str = "aepo.max_skipped_updates"):
    self.limit, self.field, self.in_a_row = int(limit), field, 0

  def observe(self, skipped: float | bool) -> None:
    self.in_a_row = self.in_a_row + 1 if skipped else 0

  @property
  def tripped(self) -> bool:
    return self.limit > 0 and self.in_a_row >= self.limit

  def error(self, step: int, last_checkpoint_step: int | None) -> SkippedUpdatesError:
    return SkippedUpdatesError(
        f"step {step}: the last {self.in_a_row} optimizer updates were all skipped because the loss or gradient "
        f"norm was not finite (NaN/inf), so the run no longer learns; lower config.optim.lr or check the data "
        f"and dtypes, or raise config.{self.field} (0 = never stop). Last checkpoint: step {last_checkpoint_step}")
