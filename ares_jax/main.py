"""ares_jax entry point: reads an ml_collections config file and runs the stage it names.

  python -m ares_jax.main --config=configs/tiny.py
  python -m ares_jax.main --config=configs/aepo_7b.py --config.model.hf_path=/data/Qwen2.5-VL-7B-Instruct

Any field can be overridden with `--config.some.field=value`. Before any model, tokenizer or checkpoint
is loaded and before the workdir is created, the config is checked and every data, pool and benchmark
file it names is opened and its columns looked at, one line each. A config or input error exits 2 with
one line naming the field or file (`--verbose` adds the traceback). Stage modules are imported only when
dispatched, so flag parsing stays fast and no JAX backend starts before `jax.distributed.initialize()`
(config.distributed=True).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging as logging_std
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from ares_jax import config_checks  # no JAX: the config is checked before any device starts
from ares_jax.stages import inputs  # no JAX either: the files are checked before any device starts

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py); override fields with --config.field=value.",
    lock_config=True)
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the whole config at startup, and the traceback of configuration "
                             "and input errors.")

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


HELP_FLAGS = ("-h", "-help", "--help", "-?", "--helpshort", "--helpfull")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the experiment files of a checkout


def fatal(lines: Sequence[str]) -> NoReturn:
  """Exit 2 with one `FATAL:` line per problem: the way every config and input error ends."""
  sys.stderr.write("".join(f"FATAL: {line}\n" for line in lines))
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with every flag error one line and exit code 2, and `--help` (or `-h`) exiting 0 with the
  stages and configs (absl's own help exits 1 and names neither).

  ml_collections raises a bare KeyError/AttributeError (with a traceback) for an unknown field.
  """
  asked = [a for a in argv[1:] if a.split("=", 1)[0] in HELP_FLAGS]
  if asked:
    print(help_text(full="--helpfull" in asked))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # an unknown flag, a value of the wrong type, a config file that raised
    text = str(e).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # A config file that raised: the flag, then the exception's last line (--verbose: all of it).
    fatal([text if "--verbose" in argv or len(lines) < 2 else f"{lines[0].rstrip(':')}: {lines[-1]}"])
  except (KeyError, AttributeError) as e:
    fatal([_bad_override_message(argv, e)])


def summary_line(path: str | Path) -> str:
  """The first sentence of a Python file's module docstring, without a leading "Stage `name`:". The file is
  parsed, not imported: `--help` starts no JAX."""
  doc = ast.get_docstring(ast.parse(Path(path).read_text(encoding="utf-8"))) or ""
  first = []
  for line in doc.splitlines():  # the first paragraph, up to a blank or an indented (example) line
    if not line.strip() or line.startswith(" "):
      break
    first.append(line.strip())
  text = re.sub(r"^Stage `[^`]+`:\s*", "", " ".join(first))
  end = re.search(r"(?<=[.!?])\s", text)
  return text[:end.start()] if end else text


def help_text(full: bool = False) -> str:
  """The program's docstring (this module's, or `ares_jax.plan`'s, which parses flags here too), the stages
  and the configs of `configs/` (their docstrings' first sentence), and ares_jax's flags (`full`: every
  flag of every module)."""
  doc = getattr(sys.modules.get("__main__"), "__doc__", None) or __doc__
  lines = [doc.strip(), "", "stages (--config.stage=NAME; every config sets one):"]
  width = max(map(len, STAGES))
  for name, target in STAGES.items():
    lines.append(f"  {name:<{width}}  {summary_line(importlib.util.find_spec(target.split(':')[0]).origin)}")
  files = sorted(CONFIGS.glob("*.py")) if CONFIGS.is_dir() else []
  shown = [p if os.path.relpath(p).startswith("..") else os.path.relpath(p) for p in map(str, files)]
  lines += ["", f"configs (--config=PATH): {'' if files else f'none found in {CONFIGS}'}".rstrip()]
  width = max(map(len, shown), default=0)
  lines += [f"  {name:<{width}}  {summary_line(p)}" for name, p in zip(shown, files)]
  lines += ["", "flags:"]
  ours = {f.name: f for module, defined in flags.FLAGS.flags_by_module_dict().items() if "ares_jax" in module
          for f in defined}  # main's and, under ares_jax.plan, the planner's
  lines += [f"  --{f.name}: {f.help}" for f in ours.values()]
  lines.append("  --config.FIELD=VALUE: any field of the config (every field: docs/configs.md)")
  lines.append("  --helpfull: every flag of every module" if not full else "\n" + flags.FLAGS.get_help())
  return "\n".join(lines)


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
  """The experiment config of `--config` (and its overrides); a usage error (exit code 2) when absent, when
  its file could not be loaded or when positional arguments were given. Shared by the stage entry point and
  `ares_jax.plan`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=configs/<experiment>.py is required (--help lists the configs)", exitcode=2)
  try:
    config.get("stage")
  except OSError as e:  # ml_collections defers a config file it could not load to the config's first use
    path = config_flags.get_config_filename(flags.FLAGS["config"])
    why = "no such file" if not os.path.exists(path) else str(e).strip().splitlines()[-1].strip()
    raise app.UsageError(f"--config={path}: {why} (--help lists the configs)", exitcode=2) from None
  return config


def describe_config() -> str:
  """'configs/tiny.py with --config.mesh.fsdp=2 ...': what a log needs to rerun it (the whole config with
  --verbose; logged in full it buried the one line that mattered)."""
  holder = flags.FLAGS["config"]
  overrides = " ".join(f"--config.{k}={v!r}" for k, v in config_flags.get_override_values(holder).items())
  return config_flags.get_config_filename(holder) + (f" with {overrides}" if overrides else "")


def main(argv: list[str]) -> None:
  try:
    config = config_from_flags(argv)
  except app.UsageError as e:
    fatal([str(e)])
  # All problems, one line each, before any device, model or file is touched and before the workdir exists.
  problems = config_checks.problems(config)
  if problems:
    fatal(problems)
  fine, problems = inputs.check(config)
  for line in fine:
    logging.info("%s", line)
  if problems:
    fatal(problems)
  try:
    run = resolve_stage(config.stage)
  except StageNotAvailable as e:
    fatal([str(e)])
  if config.get("distributed", False):
    init_distributed()
  setup_compilation(config)
  logging.info("stage %s: %s", config.stage, describe_config())
  if _VERBOSE.value:
    logging.info("config:\n%s", config)
  try:
    run(config)
  except Exception as e:  # pylint: disable=broad-except
    if _VERBOSE.value or not is_user_error(e):
      raise
    fatal([f"{e} (--verbose shows the traceback)"])


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
