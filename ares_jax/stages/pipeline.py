"""Stage `ares`: the whole method, AdaCS then AEPO from the policy AdaCS saved.

Each half runs in its own sub-workdir ({workdir}/adacs, {workdir}/aepo) with its own checkpoints, so
a killed pipeline resumes inside whichever half it was in; a finished AdaCS (its report written) is
not run again. AdaCS prints its result table when it ends; at the end one table compares the held-out
evaluations before AdaCS, after AdaCS and after AEPO (stages/results.py).
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from absl import logging

from ares_jax import sharding, storage
from ares_jax.stages import adacs, aepo, results


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  first = config.copy_and_resolve_references()
  with first.unlocked():
    first.workdir = os.path.join(config.workdir, "adacs")
  report_path = os.path.join(first.workdir, "adacs_report.json")
  policy = os.path.join(first.workdir, "policy")
  if storage.exists(report_path) and storage.exists(os.path.join(policy, "config.json")):
    logging.info("AdaCS already finished in %s; going on to AEPO", first.workdir)
    report = None
  else:
    report = adacs.run(first)

  second = config.copy_and_resolve_references()
  with second.unlocked():
    second.workdir = os.path.join(config.workdir, "aepo")
    second.model.hf_path = policy  # AdaCS's policy; also AEPO's reference policy
    second.tokenizer.path = policy  # saved beside the weights (tiny runs build theirs in code)
    second.warm_start.steps = 0
  out = aepo.run(second, print_result=False)
  if sharding.is_primary():
    print(results.ares_table(config, first.workdir, second.workdir), flush=True)
  return {"adacs": report, "aepo": out}
