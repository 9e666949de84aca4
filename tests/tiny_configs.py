"""Experiment configs for tests: the files in configs/, and the small RL settings several tests share."""

from __future__ import annotations

import runpy
from pathlib import Path

import ml_collections

ROOT = Path(__file__).resolve().parents[1]


def load_config(name: str) -> ml_collections.ConfigDict:
  return runpy.run_path(str(ROOT / "configs" / name))["get_config"]()


def small_rl(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """4 prompts x (4 roots + 2 branches) per step, one 8-row micro-batch, every group kept (a near-random
  tiny policy gets most groups all wrong) and no evaluation: the loop, not learning, is under test."""
  c.rollout.n = 4
  c.rollout.max_branches = 2
  c.rollout.prompts_per_step = 4
  c.aepo.global_batch_size = 8
  c.aepo.micro_batch_size = 8
  c.aepo.filter_low = 0.0
  c.eval.every = 0
  return c
