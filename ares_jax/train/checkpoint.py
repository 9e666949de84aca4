"""Checkpoints with orbax's CheckpointManager: asynchronous, bounded, resumable, sharding-aware.

A step checkpoint holds the whole `TrainState` (params, optimizer, step, RNG, statistics) plus a small
JSON record (data position, anything the loop needs to continue exactly). Why each choice:

- Asynchronous (`checkpoint.async_save`): `save` returns once the arrays are copied to host memory and
  the files are written by a background thread while the next step runs; orbax waits for the previous
  write before starting the next one, and `wait`/`close` wait for the last. The copy is taken before
  `save` returns, so the next update may donate the state's buffers.
- Bounded (`checkpoint.keep`): orbax prunes all but the newest `keep` step checkpoints.
- Written once (`save_once`): data that never changes during a run (AEPO's reference policy) lives in
  `{directory}/<name>/`, outside the step sequence: no step rewrites it and pruning never deletes it.
- Atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it when complete, so a run killed in the
  middle of a write resumes from the last finished checkpoint (leftover temporary folders are removed
  when the next manager opens the directory).
- Fallback (`restore_latest`): a newest checkpoint that cannot be read (truncated or corrupt files, a
  missing item) is reported with a warning and the one before it is used. In a multi-process run every
  process must restore the same step, so the processes agree on success before accepting a step.
- Sharding-aware: a restore reads onto the shardings of its template, so a run saved on one mesh
  resumes on another (e.g. 8 devices, then 4).
- Adapters only (`adapters_only`, LoRA policies): a step checkpoint holds the train state with its params
  cut to the adapters (the frozen base never changes); a restore takes the base from the template.
- Versioned (`FORMAT_VERSION`): every step checkpoint's JSON record holds the format it was written in,
  and the directory holds it too (`format.json`, for the items saved once). A checkpoint of another
  format is refused with one line naming both versions, before any array is read. A step without a
  version predates versioning: it is tried (the format of the last unversioned release reads as this
  one), and when no such step restores onto this version's train state, that is the one line.
- Onto abstract shapes: `restore` takes a template of `jax.ShapeDtypeStruct`s carrying the target
  shardings (`Updater.abstract_state`), so no concrete optimizer state is built only to be replaced.
The directory may be local or `gs://` (etils epath, as orbax uses); every process calls every method.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from jax.experimental import multihost_utils

from ares_jax import storage
from ares_jax.models import lora


class _QuietOrbax(logging.Filter):
  """Orbax logs every save step at INFO through absl; keep its warnings and errors only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _quiet_orbax() -> None:
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _QuietOrbax) for f in handler.filters):
    handler.addFilter(_QuietOrbax())


@dataclasses.dataclass(frozen=True, kw_only=True)
class CheckpointSettings:
  """`config.checkpoint_every` and `config.checkpoint.*` (see configs.base_config; settings.checkpoint)."""

  every: int = 50  # a step checkpoint every this many steps, and at the last step
  keep: int = 3  # step checkpoints kept (the newest); data saved once is never pruned
  async_save: bool = True  # write in the background while the next step runs
  preemption: bool = True  # SIGTERM / JAX's preemption notice: finish the step, checkpoint, exit 0


# Bump when what a checkpoint holds changes shape or meaning (TrainState fields, stored subtrees, meta keys).
# 1: every checkpoint before versions were recorded; 2: TrainState(step, params, opt_state, rng, stats,
# skipped), LoRA runs storing the adapters only.
FORMAT_VERSION = 2
_FORMAT_FILE = "format.json"


class FormatMismatch(RuntimeError):
  """A checkpoint written in another format version than this code reads (`found` None: unversioned, and
  it did not restore: `detail` says how)."""

  def __init__(self, where: str, found: int | None, detail: str = ""):
    found_text = "none recorded (format 1 or older)" if found is None else str(found)
    why = f" and it does not restore onto this version's train state ({detail})" if detail else ""
    super().__init__(
        f"{where}: checkpoint format version {found_text}, this ares_jax reads version {FORMAT_VERSION}{why}; "
        f"start fresh (a new --config.workdir, or delete its checkpoints/) or resume with the ares_jax release "
        f"that wrote it")
    self.found = found


class Restored(NamedTuple):
  step: int
  state: Any
  meta: dict


def _abstract(template: Any) -> Any:
  """ShapeDtypeStructs carrying the template's shardings: what orbax restores onto."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, template)


def restore_template(updater: Any, params: Any, mesh: jax.sharding.Mesh, ckpt: "Checkpointer") -> Any:
  """What `ckpt.restore_latest` restores onto: `updater.abstract_state` (no memory), with the concrete
  `params` where the checkpoints hold adapters only (the frozen base is taken from them)."""
  template = updater.abstract_state(params, mesh)
  return template.replace(params=params) if ckpt.adapters_only else template


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (a collective in a multi-process run)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok], np.int32))))


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class Checkpointer:
  """Step checkpoints of `{"state": pytree, "meta": json}` in `directory`, plus named items saved once.
  Opening a directory written in another format version raises `FormatMismatch` (nothing is read)."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True, adapters_only: bool = False):
    _quiet_orbax()
    self.adapters_only = adapters_only
    d = os.fspath(directory)
    self.directory = storage.path(d if storage.is_remote(d) else os.path.abspath(os.path.expanduser(d)))
    self._check_format()
    self._mgr = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True,
                                             enable_async_checkpointing=async_save,
                                             cleanup_tmp_directories=True))

  def _check_format(self) -> None:
    """Refuses a directory of another format; records this one's where none is recorded (a new directory,
    or one of unversioned steps, which `restore` checks one by one)."""
    record = self.directory / _FORMAT_FILE
    if record.exists():
      found = int(storage.read_json(record).get("format_version", -1))
      if found != FORMAT_VERSION:
        raise FormatMismatch(str(self.directory), found)
    elif jax.process_index() == 0:
      storage.write_json(record, {"format_version": FORMAT_VERSION})

  @classmethod
  def from_settings(cls, directory: str, settings: CheckpointSettings, adapters_only: bool = False) -> "Checkpointer":
    return cls(directory, keep=settings.keep, async_save=settings.async_save, adapters_only=adapters_only)

  def _stored(self, state: Any) -> Any:
    """What a step checkpoint holds of a TrainState: all of it, or (adapters_only) params cut to the adapters."""
    if not self.adapters_only:
      return state
    return state.replace(params={lora.POLICY_KEY: lora.adapters(state.params)})

  def steps(self) -> list[int]:
    """Steps of the finished checkpoints, oldest first (a write still in flight is not among them)."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def path_of(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing step `step`; returns once the arrays are copied off the devices (asynchronous), or
    once the files are written (`async_save=False`). Waits for the previous write first."""
    meta = {**meta, "format_version": FORMAT_VERSION}
    self._mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self._stored(state)),
                                                 meta=ocp.args.JsonSave(meta)), force=True)

  def wait(self) -> None:
    """Blocks until every started write is complete (and committed)."""
    self._mgr.wait_until_finished()

  def meta(self, step: int) -> tuple[dict, int | None]:
    """The JSON record of step `step`, read alone, and its format version (None: unversioned);
    `FormatMismatch` when it records another version."""
    meta = dict(self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    found = meta.pop("format_version", None)
    if found is not None and found != FORMAT_VERSION:
      raise FormatMismatch(str(self.path_of(step)), found)
    return meta, found

  def restore(self, state_template: Any, step: int | None = None) -> tuple[Any, dict]:
    """Step `step` (default: the newest) onto the shardings and dtypes of `state_template` (abstract
    `jax.ShapeDtypeStruct`s with shardings, or concrete arrays), without fallback. The step's format is
    checked before any array is read; an unversioned step that does not restore raises `FormatMismatch`.
    With `adapters_only` the template's params must be concrete: the frozen base comes from them."""
    step = self.latest_step() if step is None else step
    meta, version = self.meta(step)
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(self._stored(state_template)))))
    except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore errors of every kind)
      if version is None:
        raise FormatMismatch(str(self.path_of(step)), None, _one_line(e)) from e
      raise
    if version is None:
      absl_logging.warning("%s records no format version (written before versions were recorded); it restored "
                           "onto this version's train state", self.path_of(step))
    state = out.state
    if self.adapters_only:  # the frozen base comes from the template
      state = state.replace(params=lora.with_adapters(lora.base_params(state_template.params),
                                                      lora.adapters(state.params)))
    return state, meta

  def restore_latest(self, state_template: Any) -> Restored | None:
    """The newest checkpoint that every process can read, or None when there is none. An unreadable one is
    reported with a warning, moved aside to `unreadable-<step>` (kept for inspection; the step can then be
    written again) and the one before it tried; when none can be read the newest one's error is raised."""
    self.wait()
    first_error, skipped = None, []
    for step in reversed(self.steps()):
      try:
        state, meta = self.restore(state_template, step)
        error = None
      except FormatMismatch as e:
        if e.found is not None:  # another version: not damage; an older step of the same run cannot help
          raise
        state, meta, error = None, None, e  # unversioned and unreadable: damaged, or of an older format
      except Exception as e:  # pylint: disable=broad-except  (tensorstore, JSON, missing items: all unreadable)
        state, meta, error = None, None, e
      if _all_processes(error is None):
        self._move_aside(skipped)
        return Restored(step, state, meta)
      first_error = first_error or error
      skipped.append(step)
      absl_logging.warning("checkpoint %s is unreadable (%s); falling back to the one before it",
                           self.path_of(step), _one_line(error) if error else "on another process")
    if first_error is not None:
      raise first_error
    if skipped:
      raise RuntimeError(f"no checkpoint in {self.directory} could be read on every process")
    return None

  def _move_aside(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        aside = self.directory / f"unreadable-{step}"
        if aside.exists():
          aside.rmtree()
        storage.move_folder(self.path_of(step), aside)
        absl_logging.warning("moved the unreadable checkpoint %s to %s", self.path_of(step), aside)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint: unreadable steps moved aside")
    self._mgr.reload()

  def save_once(self, name: str, tree: Any) -> None:
    """Writes `tree` to `{directory}/{name}/` (replacing an earlier copy) and waits for it: for data that
    stays the same through a run, saved before the first step checkpoint that needs it."""
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(self.directory / name, tree, force=True)
      ckptr.wait_until_finished()

  def has(self, name: str) -> bool:
    return (self.directory / name).exists()

  def restore_once(self, name: str, template: Any) -> Any:
    """`{directory}/{name}/` onto the shardings and dtypes of `template`."""
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(self.directory / name, _abstract(template))

  def close(self) -> None:
    """Waits for the last write, then releases the manager."""
    self._mgr.close()
