"""The policy a training stage starts from and the folders it exports, with or without LoRA adapters.

With adapters (`config.model.lora.rank` > 0, models/lora.py) step checkpoints hold the adapters and
their optimizer state only (`Checkpointer(adapters_only=True)`), so a base that the run itself made (the
tiny config's warm start) is saved once beside them as "base"; exports are the merged policy as a
Hugging Face folder (`{workdir}/policy/`), the adapters as a PEFT folder (`{workdir}/policy_adapter/`)
and, when the base is no Hugging Face folder on disk, the base (`{workdir}/base/`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ml_collections
from absl import logging

from ares_jax import models, storage
from ares_jax.models import lora, peft_io
from ares_jax.train.checkpoint import Checkpointer

BASE_ITEM = "base"  # the saved-once checkpoint item of a run-made base


def warm_start_due(config: ml_collections.ConfigDict) -> bool:
  """Whether a fresh run warm-starts (the synthetic task; over a loaded checkpoint only when asked)."""
  return (config.warm_start.steps > 0 and config.data.kind == "synthetic"
          and (not config.model.hf_path or config.warm_start.over_checkpoint))


def starting_params(config: ml_collections.ConfigDict, ckpt: Checkpointer, params: Any,
                    warm: Callable[[Any], Any]) -> Any:
  """`params`, warm-started by `warm(params)` on a fresh run when due. With adapters, a warm-started base
  is saved once in `ckpt` and restored from there on a resumed run (its step checkpoints lack it)."""
  adapted = lora.POLICY_KEY in params
  if adapted and ckpt.has(BASE_ITEM):
    base = ckpt.restore_once(BASE_ITEM, lora.base_params(params))
    return lora.with_adapters(base, lora.adapters(params))
  if ckpt.latest_step() is None and warm_start_due(config):
    params = warm(params)
    if adapted:
      ckpt.save_once(BASE_ITEM, lora.base_params(params))
  return params


def base_folder(config: ml_collections.ConfigDict) -> str | None:
  """The Hugging Face folder holding the run's base, if one does (`model.hf_path`, not warm-started over)."""
  return config.model.hf_path if config.model.hf_path and not warm_start_due(config) else None


def save_base(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, params: Any, tokenizer: Any) -> str:
  """The base (a LoRA policy's adapters left out) as a Hugging Face folder, `{workdir}/base/`."""
  base = os.path.join(config.workdir, "base")
  models.save_hf(base, lora.base_config(mcfg), lora.base_params(params), tokenizer=tokenizer)
  return base


def export(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, params: Any, tokenizer: Any) -> str:
  """Writes `{workdir}/policy/` (transformers loads it), plus with adapters `{workdir}/policy_adapter/`
  (peft loads it onto the base) and, when the base is no folder on disk, `{workdir}/base/` (once).
  Every process gathers the weights; process 0 writes. Returns the policy folder."""
  policy = os.path.join(config.workdir, "policy")
  if not mcfg.lora.enabled:
    models.save_hf(policy, mcfg, params, tokenizer=tokenizer)  # the tokenizer inside the same atomic folder
    return policy
  base_cfg = lora.base_config(mcfg)
  models.save_hf(policy, base_cfg, lora.merged(mcfg, params), tokenizer=tokenizer)
  base = base_folder(config)
  if base is None:
    base = os.path.join(config.workdir, "base")
    if not storage.exists(os.path.join(base, "config.json")):  # the base never changes during a run
      save_base(config, mcfg, params, tokenizer)
  peft_io.save_peft(os.path.join(config.workdir, "policy_adapter"), mcfg, params, os.path.abspath(base)
                    if not storage.is_remote(base) else base)
  logging.info("exported %s (merged) and %s/policy_adapter (PEFT, base %s)", policy, config.workdir, base)
  return policy
