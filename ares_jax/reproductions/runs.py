"""Runs of `python -m ares_jax.main` for the reproduction drivers, and what they evaluated.

A run is a config file plus `--config.*` overrides in a workdir of its own; its log goes to
`{workdir}.log`. Several run at once with `parallel` > 1 (on a 2-core CPU, two runs finish sooner than
one after the other: much of a tiny run is Python on one core)."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

from ares_jax import storage

# The drivers' shared flags (absl flags are global: each is defined once, here).
SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds: one run each (per variant for the ablation).")
WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs and the tables go (default: workdirs/<driver>).")
PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at once.")
VARIANTS = flags.DEFINE_list("variants", [], "A subset of the AEPO variants by slug (default: all; variants.py).")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  workdir: str
  args: tuple[str, ...]  # --config=... and --config.field=value overrides


def launch(runs: list[Run], parallel: int = 1) -> dict[str, float]:
  """Runs each (unless its workdir holds a DONE marker), `parallel` at a time; returns wall seconds per run
  (0 for runs found finished). A run that fails raises with the tail of its log."""
  def one(run: Run) -> float:
    if storage.exists(os.path.join(run.workdir, "DONE")):
      return 0.0
    log = log_path(run)
    os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
      code = subprocess.call([sys.executable, "-m", "ares_jax.main", *run.args, f"--config.workdir={run.workdir}"],
                             stdout=f, stderr=subprocess.STDOUT)
    if storage.is_remote(run.workdir):  # beside its workdir, as for a local run
      storage.write_bytes(run.workdir + ".log", storage.read_bytes(log))
    if code != 0:
      with open(log) as f:
        tail = f.read()[-3000:]
      raise RuntimeError(f"run {run.name} ({run.workdir}) exited {code}; the end of {log}:\n{tail}")
    seconds = time.perf_counter() - t0
    storage.write_json(os.path.join(run.workdir, "DONE"), {"seconds": seconds})
    logging.info("%s finished in %.0f s", run.name, seconds)
    return seconds

  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    return dict(zip([r.name for r in runs], pool.map(one, runs)))


def log_path(run: Run) -> str:
  """Where a run's output goes while it runs: `{workdir}.log`, or for a gs:// workdir (an object store
  cannot be appended to) a local file under the temp folder, copied beside the workdir when the run ends."""
  if not storage.is_remote(run.workdir):
    return run.workdir + ".log"
  return os.path.join(tempfile.gettempdir(), "ares_jax_runs", run.workdir.split("://", 1)[1] + ".log")


def final_eval(workdir: str) -> dict[str, float]:
  """The last held-out evaluation an AEPO run logged (`eval/*` of its metrics.jsonl)."""
  evals = [r for r in storage.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/accuracy" in r]
  if not evals:
    raise ValueError(f"{workdir}/metrics.jsonl holds no held-out evaluation (config.eval.every = 0?)")
  return {k: v for k, v in evals[-1].items() if k.startswith("eval/") or k == "step"}


def first_eval(workdir: str) -> dict[str, float]:
  """The evaluation an AEPO run logged before its first update (step 0)."""
  evals = [r for r in storage.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "eval/accuracy" in r]
  if not evals or evals[0].get("step") != 0:
    raise ValueError(f"{workdir}/metrics.jsonl holds no step-0 evaluation")
  return {k: v for k, v in evals[0].items() if k.startswith("eval/")}


def require_final_eval(config) -> None:
  """The drivers read each run's last held-out evaluation as its result: it must come at the last step."""
  if config.eval.every <= 0 or config.total_steps % config.eval.every:
    raise app.UsageError(f"config.total_steps={config.total_steps} must be a multiple of config.eval.every="
                     f"{config.eval.every}: the tables read each run's evaluation at its last step")


def config_args(argv: list[str]) -> tuple[str, ...]:
  """The `--config` and `--config.*` arguments of a driver's command line, to pass on to each run (less
  workdir and seed, which the driver sets per run)."""
  keep = []
  for a in argv[1:]:
    if a.startswith(("--config.workdir", "--config.seed=")):
      raise app.UsageError(f"{a}: the driver sets each run's workdir and seed (use --workdir and --seeds)")
    if a == "--config":
      raise app.UsageError("write --config=FILE (with '=')")
    if a.startswith(("--config=", "--config.")):
      keep.append(a)
  return tuple(keep)
