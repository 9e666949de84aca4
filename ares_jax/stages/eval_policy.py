"""Stage `eval`: accuracy and response length of a policy on held-out prompts (greedy, or the mean
over `config.eval.samples` samples per prompt at the rollout temperature).

  python -m ares_jax.main --config=configs/tiny.py --config.stage=eval \
      --config.model.hf_path=workdirs/tiny/adacs/policy

The policy is `config.model.hf_path` (e.g. the folder AdaCS saves), else the random initialisation;
prompts are the held-out split of `config.data` (the synthetic task or a JSONL file). Writes
`{workdir}/eval.json` and prints accuracy and length per difficulty when the prompts carry one.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections

from ares_jax import sharding
from ares_jax.stages import setup
from ares_jax.stages.evaluation import evaluate


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  b = setup.build(config)
  stream = setup.prompt_stream(config, b.processor, 1)
  sc = setup.chunked(config, b, setup.sampling_config(config, b.tokenizer, b.mcfg), config.eval.prompts)
  with setup.build_grader(config) as grader:
    out = evaluate(b.mcfg, b.params, stream, grader, b.tokenizer, sc, config.eval.prompts,
                   jax.random.key(config.seed), config.eval.samples)
  out = {k.removeprefix("eval/"): v for k, v in out.items()}
  out.update(policy=config.model.hf_path or "random initialisation", prompts=config.eval.prompts,
             samples=config.eval.samples,
             skipped_rows=dict(stream.skipped))
  if sharding.is_primary():
    with open(os.path.join(config.workdir, "eval.json"), "w") as f:
      json.dump(out, f, indent=1)
  how = f"mean@{config.eval.samples}" if config.eval.samples > 0 else "greedy"
  print(f"policy {out['policy']}: {how} accuracy {out['accuracy']:.3f}, mean length {out['length']:.1f} tokens "
        f"over {config.eval.prompts} held-out prompts")
  levels = sorted(int(k.removeprefix("accuracy_d")) for k in out if k.startswith("accuracy_d"))
  if levels:
    print(f"{'difficulty':>10s} {'accuracy':>9s} {'length':>8s}")
    for d in levels:
      print(f"{d:10d} {out[f'accuracy_d{d}']:9.3f} {out[f'length_d{d}']:8.1f}")
    print(f"Spearman(length, difficulty) = {out['spearman_length_vs_difficulty']:.3f}")
  return out
