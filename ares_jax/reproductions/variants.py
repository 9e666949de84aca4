"""AEPO's parts switched on one at a time (the paper's Table 5), as config overrides, and the runs that train
each variant from an AdaCS policy: shared by the ablation (`ablation`) and the long run (`long_run`).

  GRPO             no entropy shaping (aepo.target_mode=batch_mean: lambda = 0), no dynamic KL (one beta for
                   every bin, rho = 1), no branching (rollout.max_branches=0)
  + dynamic KL     the config's aepo.kl_bin_scale and aepo.rho (docs/design.md §5.9)
  + entropy reward the config's aepo.target_mode (the hierarchical entropy reward, §5.6)
  + branching      the config's rollout.max_branches (window-entropy branching, §5.4): full AEPO
The switches are ordinary config fields, so the same variants ablate the 3B/7B configs.
"""

from __future__ import annotations

import os

from absl import app

from ares_jax.reproductions import runs

GRPO = ("--config.aepo.target_mode=batch_mean", "--config.aepo.kl_bin_scale=(1.0,1.0,1.0)", "--config.aepo.rho=1.0",
        "--config.rollout.max_branches=0")
# (slug, row name, overrides): each variant drops one more of GRPO's switches, i.e. keeps one more part of AEPO.
VARIANTS = (
    ("grpo", "GRPO", GRPO),
    ("dynamic_kl", "+ dynamic KL", GRPO[0:1] + GRPO[3:]),
    ("entropy_reward", "+ entropy reward", GRPO[3:]),
    ("aepo", "+ branching (AEPO)", ()),
)


def check_slugs(slugs: list[str]) -> None:
  unknown = set(slugs) - {v[0] for v in VARIANTS}
  if unknown:
    raise app.UsageError(f"--variants: unknown {sorted(unknown)}; choose from {[v[0] for v in VARIANTS]}")


def variant_runs(args: tuple[str, ...], policies: dict[int, str], workdir: str,
                 slugs: list[str]) -> list[tuple[str, int, runs.Run]]:
  """(row, seed, run) of every variant (those in `slugs`; all when empty) and seed, each an AEPO run of
  `args` from that seed's policy (`policies`: seed -> a Hugging Face folder) in `{workdir}/<slug>/seed_<s>`."""
  out = []
  for slug, row, overrides in VARIANTS:
    if slugs and slug not in slugs:
      continue
    for s, policy in policies.items():
      out.append((row, s, runs.Run(f"{slug} seed {s}", os.path.join(workdir, slug, f"seed_{s}"), (
          *args, *overrides, "--config.stage=aepo", f"--config.seed={s}", f"--config.model.hf_path={policy}",
          f"--config.tokenizer.path={policy}", "--config.warm_start.steps=0"))))
  return out
