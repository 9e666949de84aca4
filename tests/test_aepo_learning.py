"""AEPO learns on the tiny default: the claim the README makes, checked on every CI run.

The tiny config's warm-started policy computes each step right when greedy but slips (one step one
too high) about one step in ten when it samples; AEPO's accuracy reward should teach it not to. This
runs the default `aepo` settings (warm start, rollouts, rewards, update) for 20 steps and compares
held-out accuracy, the mean over 4 samples of 128 prompts, before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ares_jax.stages import aepo as aepo_stage
from tiny_configs import load_config


@pytest.mark.slow
def test_tiny_aepo_raises_held_out_sampled_accuracy(tmp_path):
  c = load_config("tiny.py")
  c.stage = "aepo"
  c.workdir = str(tmp_path)
  c.mesh.fsdp = 1  # one of the 8 simulated devices: 8 on a 2-core CPU would be ~5x slower
  c.total_steps = c.eval.every = 20
  c.checkpoint_every = 20
  aepo_stage.run(c)
  rows = [json.loads(line) for line in (Path(tmp_path) / "metrics.jsonl").read_text().splitlines()]
  first, last = rows[0], rows[-1]
  assert (first["step"], last["step"]) == (0, 20)
  # Measured 0.65 -> 0.85 on one device (512 samples each, standard error ~0.02).
  assert first["eval/accuracy"] < 0.8
  assert last["eval/accuracy"] > first["eval/accuracy"] + 0.07, (first["eval/accuracy"], last["eval/accuracy"])
