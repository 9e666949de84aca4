"""The long run: AEPO's variants (variants.py) for hundreds of steps from each seed's own AdaCS policy, held-out
curves over steps: which part speeds convergence, which keeps easy answers short after it.

  python -m ares_jax.reproductions.long_run --config=configs/tiny.py --seeds=0,1,2 --steps=300 \
      --workdir=workdirs/long_run --parallel=2

For each seed, AdaCS runs first (`{workdir}/adacs/seed_<s>/`); then every variant (all four, or `--variants`)
runs `--steps` AEPO steps from that seed's policy with a held-out evaluation every `--eval_every` steps
(`{workdir}/<variant>/seed_<s>/`). Every run is resumable: a driver that stops (killed, a machine shared over
several sittings) continues where each run stopped, and finished runs are read back. It writes
`{workdir}/long_run.json` (the summary, `curves.summarize`, plus every seed's curves), `long_run.md` and
`long_run.png`: per variant, held-out accuracy (all and per level), tokens per level and rollout token entropy
against steps (mean +- std over seeds), the steps each needs to reach `--threshold` held-out accuracy, and the
easy answers' late drift (tokens at the easiest level over the last `--late_steps` steps minus at convergence).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from ares_jax import main as entry  # defines --config and its overrides
from ares_jax import storage
from ares_jax.reproductions import curves, runs, variants

_STEPS = flags.DEFINE_integer("steps", 300, "AEPO steps per run (overrides config.total_steps).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 25, "Held-out evaluation every this many steps (and at step 0).")
_THRESHOLD = flags.DEFINE_float("threshold", 0.9, "The held-out accuracy (all levels) that counts as converged.")
_LATE_STEPS = flags.DEFINE_integer("late_steps", 100, "The easy-answer drift: the mean over the evaluations of "
                                   "this many last steps, minus the value at convergence.")
TITLE = "The long run: held-out curves per AEPO variant (mean ± std over seeds)"


def check_flags(args: tuple[str, ...]) -> None:
  """The driver sets each run's steps and evaluation period: the same fields as overrides would be ambiguous."""
  for a in args:
    if a.startswith(("--config.total_steps=", "--config.eval.every=")):
      raise app.UsageError(f"{a}: the long run sets it per run (use --steps and --eval_every)")
  if _EVAL_EVERY.value <= 0 or _STEPS.value % _EVAL_EVERY.value:
    raise app.UsageError(f"--steps={_STEPS.value} must be a positive multiple of --eval_every={_EVAL_EVERY.value}")


def adacs_runs(args: tuple[str, ...], seeds: list[int], workdir: str) -> dict[int, runs.Run]:
  return {s: runs.Run(f"adacs seed {s}", os.path.join(workdir, "adacs", f"seed_{s}"),
                      (*args, "--config.stage=adacs", f"--config.seed={s}")) for s in seeds}


def main(argv: list[str]) -> None:
  args = runs.config_args(sys.argv)
  check_flags(args)
  entry.config_from_flags(argv)  # a config error stops here, before any run
  variants.check_slugs(runs.VARIANTS.value)
  seeds, wd = [int(s) for s in runs.SEEDS.value], runs.WORKDIR.value or "workdirs/long_run"
  adacs = adacs_runs(args, seeds, wd)
  seconds = runs.launch(list(adacs.values()), runs.PARALLEL.value)
  policies = {s: os.path.join(r.workdir, "policy") for s, r in adacs.items()}
  todo = variants.variant_runs((*args, f"--config.total_steps={_STEPS.value}",
                                f"--config.eval.every={_EVAL_EVERY.value}"), policies, wd, list(runs.VARIANTS.value))
  seconds.update(runs.launch([r for _, _, r in todo], runs.PARALLEL.value))

  per_seed: dict[str, dict[int, dict]] = {}
  for row, s, run in todo:
    rows = storage.read_jsonl(os.path.join(run.workdir, "metrics.jsonl"))
    per_seed.setdefault(row, {})[s] = curves.seed_curves(rows, _EVAL_EVERY.value)
  summary = curves.summarize(per_seed, _THRESHOLD.value, _LATE_STEPS.value)
  summary.update(seeds=seeds, steps_per_run=_STEPS.value, policies=policies, per_seed=per_seed,
                 variants_overrides={row: list(o) for _, row, o in variants.VARIANTS if row in per_seed},
                 seconds_per_run=seconds)
  base = f"{wd.rstrip('/')}/long_run"
  storage.write_json(base + ".json", summary, indent=1)
  storage.write_text(base + ".md", curves.markdown(summary, TITLE))
  curves.plot(summary, base + ".png", TITLE)
  print(storage.read_text(base + ".md"))
  logging.info("wrote %s.json, .md, .png", base)


if __name__ == "__main__":
  app.run(main, flags_parser=entry.parse_flags)
