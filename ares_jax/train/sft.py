"""Supervised fine-tuning on (prompt, response) pairs: masked cross-entropy on assistant tokens only.

Used by the AdaCS stage and by the tiny config's warm start. The vision tower is frozen by default
(its parameters get no gradient, no update and no optimizer state).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from tqdm import tqdm

from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs
from ares_jax.train import optimizer as optim_lib
from ares_jax.data.batching import Prompt
from ares_jax.train import packing as packing_lib
from ares_jax.train.packing import PackingSettings
from ares_jax.train.sequences import token_logprobs
from ares_jax.train.update import MicroBatch, Updater


@dataclasses.dataclass(frozen=True, kw_only=True)
class SftSettings:
  """One SFT run: its optimizer, how its micro-batches are laid out (`config.updates`) and the top-level parameter
  names it freezes (ignored by a LoRA policy, which trains its adapters only). From `config.adacs` or
  `config.warm_start` (settings.py)."""

  optim: optim_lib.OptimSettings
  packing: PackingSettings
  frozen: tuple[str, ...] = ("visual",)


@struct.dataclass
class SftBatch:
  """One SFT micro-batch: update rows (`train.packing.Rows`, any layout) and the response tokens trained on."""

  inputs: ModelInputs  # [B, T]
  src: jax.Array  # [B, T] int32: the column whose logits predict each token
  loss_mask: jax.Array  # [B, T] float32


def sft_loss(model_config: ModelConfig):
  """(params, SftBatch, None, dropout key) -> (mean negative log-likelihood of the response tokens, metrics)."""
  def loss(params, batch: SftBatch, settings=None, dropout_key=None):
    logp = token_logprobs(model_config, params, batch.inputs, batch.src, dropout_key=dropout_key)
    mask = batch.loss_mask
    n = jnp.maximum(mask.sum(), 1)
    nll = -(logp * mask).sum() / n
    return nll, {"nll": nll, "tokens": mask.sum().astype(jnp.float32)}
  return loss


def micro_batches(model_config: ModelConfig, prompts: Sequence[Prompt], responses: Sequence[np.ndarray],
                  packing: PackingSettings, pad_id: int, response_width: int | None = None) -> list[MicroBatch]:
  """(prompt, response) pairs laid out as `packing` says, each micro-batch weighted by its share of the loss
  tokens. Pairs that hold the same Prompt object share it (shared_prompt: computed once)."""
  first: dict[int, int] = {}
  unique: list[Prompt] = []
  for p in prompts:
    if id(p) not in first:
      first[id(p)] = len(unique)
      unique.append(p)
  group = np.array([first[id(p)] for p in prompts])
  total = sum(len(r) for r in responses)
  out = []
  for r in packing_lib.layout(model_config, unique, group, responses, pad_id, packing, width=response_width):
    mask = r.scored.astype(np.float32)
    out.append(MicroBatch(SftBatch(r.inputs, r.src, mask), None, float(mask.sum() / max(total, 1))))
  return out


def make_sft(model_config: ModelConfig, params: Any, optim: optim_lib.OptimSettings, total_steps: int,
             frozen: Sequence[str] = ("visual",)) -> Updater:
  """The SFT updater; `params` (arrays or abstract shapes) give the shardings of its programs. A policy
  with LoRA adapters trains them only (`lora.frozen_names`)."""
  return Updater(sft_loss(model_config), optim_lib.make_optimizer(optim, total_steps), params,
                 lora.frozen_names(params, tuple(frozen)), dropout=lora.uses_dropout(model_config))


def run_sft(model_config: ModelConfig, params: Any, batches, settings: SftSettings, steps: int, *, pad_id: int,
            rng: jax.Array, desc: str = "sft", on_step=None) -> tuple[Any, list[float]]:
  """Runs `steps` updates; `batches(step) -> (prompts, responses)`. Returns params and the losses."""
  updater = make_sft(model_config, params, settings.optim, steps, settings.frozen)
  state = updater.init_state(params, rng)
  losses = []
  for step in tqdm(range(steps), desc=desc, leave=False):
    prompts, responses = batches(step)
    state, m = updater.update(state, micro_batches(model_config, prompts, responses, settings.packing, pad_id))
    losses.append(m["loss"])
    if on_step is not None:
      on_step(step, m)
  return state.params, losses
