"""Step metrics to `{workdir}/metrics.jsonl` and TensorBoard event files; the workdir may be `gs://`
(ares_jax.storage)."""

from __future__ import annotations

import io
import json
import math
import os
import threading
from typing import Mapping

import numpy as np

from ares_jax import sharding, storage


class MetricsWriter:
  """Appends one JSON object per step; mirrors scalars to TensorBoard (tensorboardX) when available.

  On resume, lines for steps after the restored checkpoint are dropped first, so the file reads as
  one uninterrupted run; so is a torn last line (a kill in the middle of a write), with a warning.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self._primary = sharding.is_primary()  # one writer in a multi-process run
    if not self._primary:
      return
    storage.makedirs(workdir)
    if resume_step is not None and storage.exists(self.path):
      keep = [r for r in storage.read_jsonl(self.path) if r["step"] <= resume_step]
      storage.write_jsonl(self.path, keep)
    elif resume_step is None and storage.exists(self.path):
      storage.remove(self.path)
    try:
      # tensorboardX (protobuf) is slow to import: only where event files are written
      from tensorboardX import SummaryWriter
      _register_remote_event_files()
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # metrics.jsonl is always written
      self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> dict:
    row = {"step": int(step)}
    for k, v in sorted(metrics.items()):
      v = float(np.asarray(v))
      row[k] = v if math.isfinite(v) else None
    if not self._primary:
      return row
    storage.append_lines(self.path, [json.dumps(row)])
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and v is not None:
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    return row

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `{workdir}/metrics.jsonl` (a torn last line dropped)."""
  return storage.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


class _EventObject:
  """A TensorBoard event file on an object store, which has no append: records are buffered and every
  flush rewrites the object whole (atomically, through ares_jax.storage). A file past `roll_bytes` is
  left as it is and the next records go to `<name>.<k>` (TensorBoard reads every file with "tfevents"
  in its name, in name order), so one flush never uploads more than about `roll_bytes`."""

  def __init__(self, path: str, roll_bytes: int = 8 << 20):
    self._base, self._part, self._roll = path, 0, roll_bytes
    self._buf = io.BytesIO()
    self._dirty = False
    self._lock = threading.Lock()  # tensorboardX's logger thread and the caller's flush() both flush

  def write(self, data: bytes) -> None:
    with self._lock:
      self._buf.write(data)
      self._dirty = True

  def flush(self) -> None:  # called between records only (tensorboardX writes a record, then flushes)
    with self._lock:
      if not self._dirty:
        return
      name = self._base if self._part == 0 else f"{self._base}.{self._part:05d}"
      storage.write_bytes(name, self._buf.getvalue())
      self._dirty = False
      if self._buf.tell() >= self._roll:
        self._part += 1
        self._buf = io.BytesIO()

  def close(self) -> None:
    self.flush()


class _EventObjectFactory:
  def open(self, path: str) -> _EventObject:
    return _EventObject(path)

  def directory_check(self, path: str) -> None:  # object stores have no folders to create
    del path


def _register_remote_event_files() -> None:
  """Routes tensorboardX's `gs://` event files through ares_jax.storage (epath: gcsfs or gfile) instead
  of its own writer, which needs google-cloud-storage and uploads the whole file at every flush."""
  # tensorboardX (protobuf) is slow to import: only where event files are written
  from tensorboardX import record_writer
  record_writer.register_writer_factory("gs", _EventObjectFactory())

