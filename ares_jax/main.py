"""ares_jax entry point: reads an ml_collections config file and runs the stage it names.

  python -m ares_jax.main --config=configs/tiny.py
  python -m ares_jax.main --config=configs/aepo_7b.py --config.model.hf_path=/data/Qwen2.5-VL-7B-Instruct

Any field can be overridden with `--config.some.field=value`; a field the config does not have is a
flag error that names it. Stage modules are imported only when dispatched, so flag parsing stays fast
and no JAX backend starts before `jax.distributed.initialize()` (config.distributed=True).
"""

from __future__ import annotations

import importlib
import logging as logging_std
import os
import re
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from ares_jax import config_checks  # no JAX: the config is checked before any device starts

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of configuration and input errors too.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with --config.field=value.",
    lock_config=True)

# stage name -> "module:function" taking the config. Only stages that exist are listed.
STAGES: dict[str, str] = {
    "inspect": "ares_jax.stages.inspect_model:run",
    "sample": "ares_jax.stages.sample:run",
    "aepo": "ares_jax.stages.aepo:run",
    "adacs": "ares_jax.stages.adacs:run",
    "ares": "ares_jax.stages.pipeline:run",
    "eval": "ares_jax.stages.evaluate:run",
}


class StageNotAvailable(ValueError):
  """A stage name that the config asks for but this version of ares_jax does not run."""


def resolve_stage(name: str) -> Callable[[Any], Any]:
  """The function that runs stage `name`; a clear error for an unknown one."""
  if name not in STAGES:
    raise StageNotAvailable(f"unknown stage {name!r}; available: {', '.join(STAGES)}")
  module, fn = STAGES[name].split(":")
  return getattr(importlib.import_module(module), fn)


def _bad_override_message(argv: list[str], error: Exception) -> str:
  """'--config.mesh.fsdpp=2: config.mesh has no field 'fsdpp' (Did you mean "fsdp" ...?)'."""
  text = str(error.args[0] if error.args else error)
  found = re.search(r"'([^'\\]+)\\?'", text)
  key = found.group(1) if found else None
  hint = re.search(r'Did you mean "[^"]+" instead of "[^"]+"\?', text)
  suffix = f" ({hint.group(0)})" if hint else ""
  for arg in argv[1:]:
    if key and arg.startswith("--config."):
      parts = arg.split("=", 1)[0][len("--config."):].split(".")
      if key in parts:
        parent = ".".join(["config", *parts[:parts.index(key)]])
        return f"{arg}: {parent} has no field {key!r}{suffix}"
  return f"a --config override names a field the config does not have: {key or text}{suffix}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad `--config.a.b` override reported as a one-line error naming the field.

  ml_collections raises a bare KeyError/AttributeError (with a traceback) for an unknown field.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:
    sys.stderr.write(f"FATAL Flags parsing error: {_bad_override_message(argv, e)}\n")
    sys.exit(1)


def init_distributed() -> None:
  """`jax.distributed.initialize()` before any device is touched.

  TPU pods, SLURM, Open MPI and Kubernetes are detected by JAX itself (no arguments). Elsewhere
  (plain multi-node GPU or CPU runs, see launch/gpu.sh) JAX reads JAX_COORDINATOR_ADDRESS and we
  pass JAX_NUM_PROCESSES / JAX_PROCESS_ID from the environment.
  """
  import jax  # after flag parsing: JAX reads its environment when imported (ares_jax.plan sets it after importing us)

  kwargs = {}
  for env, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
    if os.environ.get(env):
      kwargs[key] = int(os.environ[env])
  # CPU processes need a collectives backend of their own (GPU/TPU backends ignore this setting).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


class _CompilesOnly(logging_std.Filter):
  """Of JAX's compile log (`jax_log_compiles`), keeps the line naming each new program and its shapes (its
  seconds are in `compile_log`'s line)."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return not record.getMessage().startswith("Finished")


def setup_compilation(config) -> None:
  """The persistent compilation cache (a relaunch, or every process of a pod, reuses compiled
  programs) and a log line for every new compile (`compile_log`: name, seconds, cache hit); with
  `log_compiles`, JAX's own line with its shapes too, so shape churn is visible."""
  import jax  # after flag parsing: JAX reads its environment when imported (ares_jax.plan sets it after importing us)
  from ares_jax import compile_log  # imports JAX: after flag parsing, as above

  compile_log.install()
  if config.get("compilation_cache_dir"):
    path = config.compilation_cache_dir
    path = path if "://" in path else os.path.expanduser(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if config.get("log_compiles", False):
    jax.config.update("jax_log_compiles", True)
    logging_std.getLogger("jax").addFilter(_CompilesOnly())
    for name in ("jax._src.dispatch", "jax._src.interpreters.pxla"):
      logging_std.getLogger(name).addFilter(_CompilesOnly())


def config_from_flags(argv: list[str]):
  """The experiment config of `--config` (and its overrides); a usage error when absent or when
  positional arguments were given. Shared by the stage entry point and `ares_jax.plan`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required")
  return config


def main(argv: list[str]) -> None:
  config = config_from_flags(argv)
  try:
    run = resolve_stage(config.stage)
  except StageNotAvailable as e:
    sys.stderr.write(f"FATAL: {e}\n")
    sys.exit(2)
  problems = config_checks.problems(config)
  if problems:  # all of them, one line each, before any device or file is touched
    sys.stderr.write("".join(f"FATAL: {p}\n" for p in problems))
    sys.exit(2)
  if config.get("distributed", False):
    init_distributed()
  setup_compilation(config)
  logging.info("stage %s with config:\n%s", config.stage, config)
  try:
    run(config)
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value or not is_user_error(e):
      raise
    sys.stderr.write(f"FATAL: {e}\n(run with --verbose for the traceback)\n")
    sys.exit(2)


def is_user_error(e: BaseException) -> bool:
  """Errors in what the user gave (config, checkpoint, data, mesh), whose message says what to fix: shown as
  one line. Anything else is a bug and keeps its traceback."""
  # These modules import JAX: only once a stage has run (see `init_distributed`).
  from ares_jax import sharding  # after flag parsing, as above
  from ares_jax.data.processor import ProcessorError  # after flag parsing, as above
  from ares_jax.models import ConfigError  # after flag parsing, as above
  from ares_jax.models.hf_io import CheckpointError  # after flag parsing, as above
  from ares_jax.train.checkpoint import FormatMismatch  # after flag parsing, as above
  from ares_jax.train.run_control import SkippedUpdatesError  # after flag parsing, as above (lr too high)
  return isinstance(e, (ConfigError, CheckpointError, ProcessorError, sharding.MeshError, FileNotFoundError,
                        SkippedUpdatesError, FormatMismatch))


def cli() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(cli())
