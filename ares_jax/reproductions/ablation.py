"""The AEPO ablation (the paper's Table 5 on the built-in task): from one AdaCS policy, AEPO with its parts
switched on one at a time, each over seeds; held-out accuracy and tokens per difficulty, mean +- std.

  python -m ares_jax.reproductions.ablation --config=configs/tiny.py --seeds=0,1,2 --workdir=workdirs/ablation

Variants (`variants.py`: GRPO, + dynamic KL, + entropy reward, + branching = AEPO; each adds one part to the
one before, the last is the config as given). The same command ablates the 3B/7B configs
(`--config=configs/aepo_7b.py --adacs_policy=/path/to/adacs/policy`). Without `--adacs_policy`, AdaCS runs
once first (`{workdir}/adacs/`, seed `--adacs_seed`). Each run is in `{workdir}/<variant>/seed_<s>/`
(resumable); the table is `{workdir}/ablation.json`, `ablation.md` and `ablation.png`, with the AdaCS
policy itself as the first row (the step-0 evaluation, on the same held-out problems).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from ares_jax import main as entry  # defines --config and its overrides
from ares_jax import storage
from ares_jax.reproductions import runs, tables, variants

_ADACS_POLICY = flags.DEFINE_string("adacs_policy", "", "A Hugging Face folder to start every variant from "
                                    "('' = run AdaCS once in {workdir}/adacs).")
_ADACS_SEED = flags.DEFINE_integer("adacs_seed", 0, "The seed of that AdaCS run.")
BASELINE = "AdaCS policy"


def main(argv: list[str]) -> None:
  args = runs.config_args(sys.argv)
  config = entry.config_from_flags(argv)
  runs.require_final_eval(config)
  variants.check_slugs(runs.VARIANTS.value)
  seeds, wd = [int(s) for s in runs.SEEDS.value], runs.WORKDIR.value or "workdirs/ablation"
  seconds = {}
  policy = _ADACS_POLICY.value
  if not policy:
    adacs_dir = os.path.join(wd, "adacs")
    seconds.update(runs.launch([runs.Run("adacs", adacs_dir, (*args, "--config.stage=adacs",
                                                              f"--config.seed={_ADACS_SEED.value}"))]))
    policy = os.path.join(adacs_dir, "policy")
  todo = variants.variant_runs(args, {s: policy for s in seeds}, wd, list(runs.VARIANTS.value))
  seconds.update(runs.launch([r for _, _, r in todo], runs.PARALLEL.value))

  per_row: dict[str, dict[int, dict]] = {BASELINE: {}}
  for row, s, run in todo:
    per_row.setdefault(row, {})[s] = runs.final_eval(run.workdir)
    if row == todo[0][0]:  # every variant starts from the same policy: its step-0 evaluation
      per_row[BASELINE][s] = runs.first_eval(run.workdir)
  summary = tables.summarize(per_row)
  summary.update(seeds=seeds, adacs_policy=policy, variants={row: list(o) for _, row, o in variants.VARIANTS},
                 seconds_per_run=seconds)
  paths = tables.write(summary, wd, "ablation", "AEPO ablation: held-out accuracy and tokens (mean ± std over seeds)")
  print(storage.read_text(paths[1]))
  logging.info("wrote %s", ", ".join(paths))


if __name__ == "__main__":
  app.run(main, flags_parser=entry.parse_flags)
