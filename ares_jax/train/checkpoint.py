"""Checkpoints with orbax's CheckpointManager: atomic, resumable, sharding-aware.

A checkpoint holds the whole `TrainState` (params, optimizer, step, RNG, statistics) plus a small
JSON record (data position, anything the loop needs to continue exactly). Orbax writes to a
temporary directory and renames it when complete, so a run killed mid-write resumes from the last
finished checkpoint.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging


class _QuietOrbax(logging.Filter):
  """Orbax logs every save step at INFO through absl; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _quiet_orbax() -> None:
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


class Checkpointer:
  def __init__(self, directory: str, max_to_keep: int = 3):
    _quiet_orbax()
    self.directory = os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 meta=ocp.args.JsonSave(meta)))
    self._mgr.wait_until_finished()

  def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings and dtypes of `state_template` (concrete or abstract arrays)."""
    step = self.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    out = self._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def close(self) -> None:
    self._mgr.close()
