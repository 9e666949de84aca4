"""What a `gs://` workdir costs against a local one: the same tiny AEPO run, local and on a GCS API on loopback.

    python benchmarks/object_store.py [--steps=2,6] [--repeats=1]

Starts fake-gcs-server (ares_jax.gcs_emulator), warms a shared compilation cache with one local run, then
runs `python -m ares_jax.main` on the tiny config (the preemption tests' small AEPO run: 4 prompts x 6
slots, 16-token responses, a checkpoint every 2 steps) for each step count, locally and with a gs://
workdir, alternating. Prints wall time per run and the cost of one step (the slope between the two step
counts), which is what the object store adds per step: metrics and event-file uploads and orbax's writes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ares_jax import gcs_emulator  # noqa: E402

FLAGS = ["--config=configs/tiny.py", "--config.stage=aepo", "--config.checkpoint_every=2",
         "--config.checkpoint.keep=2", "--config.warm_start.steps=0", "--config.eval.every=0", "--config.rollout.n=4",
         "--config.rollout.max_branches=2", "--config.rollout.prompts_per_step=4",
         "--config.rollout.max_response_length=16", "--config.rollout.chunk_prompts=4",
         "--config.aepo.global_batch_size=8", "--config.aepo.micro_batch_size=8", "--config.aepo.filter_low=0.0",
         "--config.data.min_steps=1", "--config.data.max_steps=3", "--config.log_compiles=False",
         "--config.grading_workers=1"]


def run(workdir: str, steps: int, cache: str, env: dict) -> float:
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, "-m", "ares_jax.main", *FLAGS, f"--config.total_steps={steps}",
                         f"--config.workdir={workdir}", f"--config.compilation_cache_dir={cache}"],
                        cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"{workdir}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return time.perf_counter() - t0


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", default="2,6")
  p.add_argument("--repeats", type=int, default=1)
  args = p.parse_args()
  lo, hi = (int(x) for x in args.steps.split(","))
  tmp = tempfile.mkdtemp(prefix="ares_jax_bench_store.")
  cache = os.path.join(tmp, "xla_cache")
  with gcs_emulator.start(buckets=["bench"]) as emu:
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", **emu.env)
    run(os.path.join(tmp, "warm"), lo, cache, env)  # compiles every program once
    walls: dict[tuple[str, int], list[float]] = {}
    for r in range(args.repeats):
      for steps in (lo, hi):
        for where, workdir in (("local", os.path.join(tmp, f"local_{r}_{steps}")),
                               ("gs://", f"gs://bench/run_{r}_{steps}")):
          walls.setdefault((where, steps), []).append(run(workdir, steps, cache, env))
  best = {k: min(v) for k, v in walls.items()}
  print(f"\n| workdir | {lo} steps (s) | {hi} steps (s) | per step (s) |")
  print("|---|---|---|---|")
  for where in ("local", "gs://"):
    a, b = best[(where, lo)], best[(where, hi)]
    print(f"| {where} | {a:.1f} | {b:.1f} | {(b - a) / (hi - lo):.2f} |")
  extra = ((best[("gs://", hi)] - best[("gs://", lo)]) - (best[("local", hi)] - best[("local", lo)])) / (hi - lo)
  print(f"\ngs:// adds {extra:+.2f} s per step (best of {args.repeats}; emulator on loopback, same machine)")


if __name__ == "__main__":
  main()
