"""The entropy-difficulty law over seeds: held-out accuracy and tokens per difficulty before AdaCS, after
AdaCS and after AEPO (mean +- std), from the whole `ares` pipeline run once per seed.

  python -m ares_jax.reproductions.law --config=configs/tiny.py --seeds=0,1,2 --workdir=workdirs/law

writes `{workdir}/law.json` (the summary, every seed's numbers and the law's checks per seed),
`law.md` and `law.png`; each seed's run is in `{workdir}/seed_{s}/` (resumable). The three evaluations use
the same held-out problems (split 1; AdaCS's before/after SFT and AEPO's `eval/*`). The law, as ARES states
it and as this driver checks it per seed: AdaCS raises Spearman(length, difficulty) over the base; AEPO
then raises the hardest problems' accuracy and length and does not lengthen the easiest ones (by more than
`EASY_TOLERANCE`, 1%).
"""

from __future__ import annotations

import os
import sys

from absl import app, logging

from ares_jax import main as entry  # pylint: disable=unused-import  (defines --config and its overrides)
from ares_jax import storage
from ares_jax.reproductions import runs, tables

STAGES = ("before AdaCS", "after AdaCS", "after AEPO")
# "Does not lengthen the easiest": at most 1% longer. AdaCS already brings the easiest level to the quick
# answer's length, the floor (58 tokens on the checks task; a careful one is 103), where a single careful
# sample among hundreds moves the mean by a tenth of a token (seed 0 since the update rows were packed:
# 58.14 -> 58.27); a real lengthening is several tokens.
EASY_TOLERANCE = 0.01


def seed_evals(workdir: str) -> dict[str, dict[str, float]]:
  """The three held-out evaluations of one pipeline run."""
  report = storage.read_json(os.path.join(workdir, "adacs", "adacs_report.json"))
  return {"before AdaCS": report["eval_before_sft"], "after AdaCS": report["eval_after_sft"],
          "after AEPO": runs.final_eval(os.path.join(workdir, "aepo"))}


def law_checks(evals: dict[str, dict[str, float]], ds: list[int]) -> dict[str, bool]:
  """The law on one seed (`ds` sorted: ds[0] the easiest, ds[-1] the hardest difficulty)."""
  base, sft, rl = evals["before AdaCS"], evals["after AdaCS"], evals["after AEPO"]
  easy, hard = ds[0], ds[-1]
  key = "eval/spearman_length_vs_difficulty"
  return {
      "adacs_raises_spearman": bool(sft[key] > base[key]),
      "aepo_raises_hardest_accuracy": bool(rl[f"eval/accuracy_d{hard}"] > sft[f"eval/accuracy_d{hard}"]),
      "aepo_lengthens_hardest": bool(rl[f"eval/length_d{hard}"] > sft[f"eval/length_d{hard}"]),
      "aepo_does_not_lengthen_easiest": bool(
          rl[f"eval/length_d{easy}"] <= (1 + EASY_TOLERANCE) * sft[f"eval/length_d{easy}"]),
  }


def summarize(workdir: str, seeds: list[int]) -> dict:
  per_seed = {s: seed_evals(os.path.join(workdir, f"seed_{s}")) for s in seeds}
  summary = tables.summarize({st: {s: per_seed[s][st] for s in seeds} for st in STAGES})
  checks = {str(s): law_checks(per_seed[s], summary["difficulties"]) for s in seeds}
  return dict(summary, seeds=seeds, per_seed={str(s): e for s, e in per_seed.items()}, law=checks,
              law_holds_on_every_seed=all(all(c.values()) for c in checks.values()))


def main(argv: list[str]) -> None:
  args = runs.config_args(sys.argv)
  config = entry.config_from_flags(argv)
  runs.require_final_eval(config)
  seeds = [int(s) for s in runs.SEEDS.value]
  wd = runs.WORKDIR.value or "workdirs/law"
  todo = [runs.Run(f"seed {s}", os.path.join(wd, f"seed_{s}"), (*args, "--config.stage=ares", f"--config.seed={s}"))
          for s in seeds]
  seconds = runs.launch(todo, runs.PARALLEL.value)
  summary = summarize(wd, seeds)
  summary["seconds_per_run"] = seconds
  paths = tables.write(summary, wd, "law", "held-out accuracy and tokens per difficulty (mean ± std over seeds)")
  print(storage.read_text(paths[1]))
  print("law per seed:", summary["law"])
  logging.info("wrote %s", ", ".join(paths))


if __name__ == "__main__":
  app.run(main, flags_parser=entry.parse_flags)
