"""The AEPO ablation (the paper's Table 5 on the built-in task): from one AdaCS policy, AEPO with its parts
switched on one at a time, each over seeds; held-out accuracy and tokens per difficulty, mean +- std.

  python -m ares_jax.reproductions.ablation --config=configs/tiny.py --seeds=0,1,2 --workdir=workdirs/ablation

Variants (each adds one part to the one before; the last is the config as given):
  GRPO            no entropy shaping (aepo.target_mode=batch_mean: lambda = 0), no dynamic KL (one beta for
                  every bin, rho = 1), no branching (rollout.max_branches=0)
  + dynamic KL    the config's aepo.kl_bin_scale and aepo.rho (docs/design.md §5.9)
  + entropy reward the config's aepo.target_mode (the hierarchical entropy reward, §5.6)
  + branching     the config's rollout.max_branches (window-entropy branching, §5.4): full AEPO
The switches are ordinary config fields, so the same command ablates the 3B/7B configs
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
from ares_jax.reproductions import runs, tables

_ADACS_POLICY = flags.DEFINE_string("adacs_policy", "", "A Hugging Face folder to start every variant from "
                                    "('' = run AdaCS once in {workdir}/adacs).")
_ADACS_SEED = flags.DEFINE_integer("adacs_seed", 0, "The seed of that AdaCS run.")
_VARIANTS = flags.DEFINE_list("variants", [], "A subset of the variants by slug (default: all).")

GRPO = ("--config.aepo.target_mode=batch_mean", "--config.aepo.kl_bin_scale=(1.0,1.0,1.0)", "--config.aepo.rho=1.0",
        "--config.rollout.max_branches=0")
# (slug, row name, overrides): each variant drops one more of GRPO's switches, i.e. keeps one more part of AEPO.
VARIANTS = (
    ("grpo", "GRPO", GRPO),
    ("dynamic_kl", "+ dynamic KL", GRPO[0:1] + GRPO[3:]),
    ("entropy_reward", "+ entropy reward", GRPO[3:]),
    ("aepo", "+ branching (AEPO)", ()),
)
BASELINE = "AdaCS policy"


def variant_runs(args: tuple[str, ...], policy: str, seeds: list[int], workdir: str,
                 slugs: list[str]) -> list[tuple[str, int, runs.Run]]:
  """(row, seed, run) of every variant and seed, each an AEPO run from `policy`."""
  out = []
  for slug, row, overrides in VARIANTS:
    if slugs and slug not in slugs:
      continue
    for s in seeds:
      out.append((row, s, runs.Run(f"{slug} seed {s}", os.path.join(workdir, slug, f"seed_{s}"), (
          *args, *overrides, "--config.stage=aepo", f"--config.seed={s}", f"--config.model.hf_path={policy}",
          f"--config.tokenizer.path={policy}", "--config.warm_start.steps=0"))))
  return out


def main(argv: list[str]) -> None:
  args = runs.config_args(sys.argv)
  config = entry.config_from_flags(argv)
  runs.require_final_eval(config)
  unknown = set(_VARIANTS.value) - {v[0] for v in VARIANTS}
  if unknown:
    raise app.UsageError(f"--variants: unknown {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")
  seeds, wd = [int(s) for s in runs.SEEDS.value], runs.WORKDIR.value or "workdirs/ablation"
  seconds = {}
  policy = _ADACS_POLICY.value
  if not policy:
    adacs_dir = os.path.join(wd, "adacs")
    seconds.update(runs.launch([runs.Run("adacs", adacs_dir, (*args, "--config.stage=adacs",
                                                              f"--config.seed={_ADACS_SEED.value}"))]))
    policy = os.path.join(adacs_dir, "policy")
  todo = variant_runs(args, policy, seeds, wd, list(_VARIANTS.value))
  seconds.update(runs.launch([r for _, _, r in todo], runs.PARALLEL.value))

  per_row: dict[str, dict[int, dict]] = {BASELINE: {}}
  for row, s, run in todo:
    per_row.setdefault(row, {})[s] = runs.final_eval(run.workdir)
    if row == todo[0][0]:  # every variant starts from the same policy: its step-0 evaluation
      per_row[BASELINE][s] = runs.first_eval(run.workdir)
  summary = tables.summarize(per_row)
  summary.update(seeds=seeds, adacs_policy=policy, variants={row: list(o) for _, row, o in VARIANTS},
                 seconds_per_run=seconds)
  paths = tables.write(summary, wd, "ablation", "AEPO ablation: held-out accuracy and tokens (mean ± std over seeds)")
  print(storage.read_text(paths[1]))
  logging.info("wrote %s", ", ".join(paths))


if __name__ == "__main__":
  app.run(main, flags_parser=entry.parse_flags)
