"""The device programs of one step at a config's shapes, compiled ahead of time, and what they need.

Inputs are made by the real run's host code (`sampling.chunks.make_chunks`, `train.sequences.pack`)
from synthetic prompts of the config's shapes, then turned into `jax.ShapeDtypeStruct`s; parameters
are abstract (`models.abstract_params`) with the shardings of the logical rules. So what is compiled
here is what the run compiles, for any set of devices: a TPU topology's (`plan.py`) or the run's own
(`largest_rollout_chunk`, for `rollout.chunk_prompts=0` / `rollout.prompts_in_flight=0`). The shapes and
synthetic inputs are in `plan_inputs.py`, the rollout's programs in `rollout_plan.py`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ares_jax import models, sampling
from ares_jax import settings as settings_lib
from ares_jax.aepo import step as aepo_step
from ares_jax.compiled_memory import (GIB, ProgramPlan, abstract_like, abstract_params, device_bytes,
                                      device_hbm_gib, plan_row)
from ares_jax.models import lora
from ares_jax.train import sequences, sft
from ares_jax.train.packing import PackingSettings
from ares_jax.train import optimizer as optim_lib
from ares_jax.train import update as update_lib
from ares_jax.plan_inputs import Setting, Shapes, step_shapes, synthetic_prompts
from ares_jax.rollout_plan import largest_rollout_chunk, rollout_programs


def _at_shapes(config: ml_collections.ConfigDict, shapes: Shapes) -> ml_collections.ConfigDict:
  """The config with `rollout.max_prompt_length` as wide as the plan's prompts (`step_shapes` raises it to
  hold the images), so the update rows' default sizes (`PackingSettings.from_config`) are those of prompts
  that long."""
  c = copy.deepcopy(config)
  c.rollout.max_prompt_length = max(int(c.rollout.max_prompt_length), shapes.prompt_width)
  return c


SHORT_ANSWER = 16  # tokens: the responses of the packed layouts' worst case


def _training_rows(st: Setting, shapes: Shapes, packing: PackingSettings, n: int) -> aepo_step.UpdateRows:
  """Synthetic groups of n responses after a full-width prompt (with the plan's images), enough to fill the
  first micro-batch of `packing`'s layout with its worst case. Every micro-batch of the packed layouts holds
  the same tokens (`updates.tokens_per_micro_batch`); what varies is how many of them are prompts, each with
  its images: the most when the answers are short, so they are `SHORT_ANSWER` tokens long (the none
  layout's rows are as wide as the budget whatever the answers: full-width responses)."""
  width = shapes.response_width
  answer = width if packing.packing == "none" else min(SHORT_ANSWER, width)
  groups = packing.rows_per_micro_batch if packing.packing == "none" else (
      packing.tokens_per_micro_batch // (shapes.prompt_width + answer) + 1)
  count = groups * n
  prompts = synthetic_prompts(st.mcfg, shapes, groups)
  mask = np.arange(width)[None] < answer
  return aepo_step.UpdateRows(st.mcfg, prompts, np.arange(count) // n, [np.ones((answer,), np.int32)] * count,
                              np.zeros((count,), np.float32), np.repeat(mask, count, 0),
                              np.ones((count, width), np.float32), packing, width, 0)


def _rows_desc(ids: np.ndarray, scored: int, packing: PackingSettings, image_token_id: int) -> str:
  """The micro-step's shapes: rows x tokens, the layout, the response tokens among them, the image tokens."""
  b, t = ids.shape
  images = int((ids == image_token_id).sum())
  return (f"{b} x {t} tokens ({packing.packing}): {scored:,} response tokens"
          + (f", {images:,} image tokens" if images else ""))


def _update_plans(st: Setting, updater: update_lib.Updater, batch: Any, settings: Any, ref_bytes: int,
                  label: str, desc: str) -> tuple[list[ProgramPlan], int]:
  """The train state's creation (for its size), the gradient micro-step and the optimizer apply."""
  state = updater.abstract_state(st.params, st.mesh)
  opt_bytes = device_bytes(state.opt_state)
  accum = updater.trainable(st.params)  # same shapes, dtypes and shardings as the trainable parameters
  weight = abstract_like(np.float32(1.0), st.mesh)
  micro = st.compile(updater.micro_step, st.params, accum, abstract_like(batch, st.mesh), weight, settings)
  apply = st.compile(updater.apply, state, accum, weight)
  return [restore_row(st, state, ref_bytes, label),
          plan_row(f"{label} gradient micro-step (+ accumulation)", desc, micro,
                   opt_bytes + ref_bytes, st.hbm_gib),
          plan_row(f"{label} optimizer apply", "clip + AdamW + finite check", apply, ref_bytes, st.hbm_gib)], opt_bytes


def restore_row(st: Setting, state: Any, ref_bytes: int, label: str) -> ProgramPlan:
  """Resuming: `Checkpointer.restore_latest` onto `Updater.abstract_state` (no concrete template), then
  the reference. No program runs: orbax allocates the restored arrays (out) beside the policy loaded at
  start-up (resident); what a step checkpoint holds of the params is the adapters alone for LoRA."""
  stored = lora.adapters(st.params) if st.mcfg.lora.enabled else st.params
  out = device_bytes(stored) + device_bytes(state.replace(params=None)) + ref_bytes
  what = "train state" + (" + reference" if ref_bytes else "") + (" (adapters)" if st.mcfg.lora.enabled else "")
  return ProgramPlan(f"{label} restore (checkpoint onto abstract shapes)", what, 0, out, 0, 0,
                     device_bytes(st.params), int(st.hbm_gib * GIB))


def aepo_plans(st: Setting) -> list[ProgramPlan]:
  c, mcfg = st.config, st.mcfg
  a, r = c.aepo, c.rollout
  shapes = step_shapes(c, mcfg, r.max_response_length)
  adapted = mcfg.lora.enabled  # LoRA: adapters train; the reference is the base with them off (no copy)
  ref = None if adapted else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(a.ref_dtype), sharding=x.sharding), st.params)
  ref_bytes, param_bytes = device_bytes(ref), device_bytes(st.params)
  updater = update_lib.Updater(aepo_step.aepo_loss_fn(mcfg),
                               optim_lib.make_optimizer(settings_lib.optim(c), c.total_steps),
                               st.params, lora.frozen_names(st.params))
  packing = settings_lib.packing(_at_shapes(c, shapes), "aepo", st.mesh)
  rows = _training_rows(st, shapes, packing, r.n)
  first = rows.layout(range(len(rows)))[0]
  desc = _rows_desc(first.inputs.ids, first.tokens()[1], packing, mcfg.image_token_id)
  settings = settings_lib.loss(c)
  old = np.zeros((len(rows), rows.width), np.float32)
  micro = aepo_step.micro_batches(rows, np.arange(len(rows)), old, old, settings)[0]
  update_plans, opt_bytes = _update_plans(st, updater, micro.batch, settings, ref_bytes, "AEPO", desc)

  sc = settings_lib.sampling(c, mcfg, 0)
  resident = opt_bytes + ref_bytes  # beside the policy (an argument of every program here)
  paged_engine = sc.kv_cache == "paged"
  fixed = r.prompts_in_flight if paged_engine else r.chunk_prompts
  if fixed:
    chunk = fixed
  else:
    chunk, roll = largest_rollout_chunk(st, sc, shapes, resident, r.prompts_per_step)
  # the chosen size again with the paged decode step's costs; the smallest when none fits, to show by how much
  roll = rollout_programs(st, sc, chunk or 1, shapes, resident) if fixed or paged_engine or not chunk else roll
  if not paged_engine:
    n_calls = -(-r.prompts_per_step // max(chunk, 1))
    roll = [roll[0], dataclasses.replace(roll[1], shapes=roll[1].shapes + f"; {n_calls} calls per step")]

  inputs, src = abstract_like(first.inputs, st.mesh), abstract_like(first.src, st.mesh)
  old_c = st.compile(sequences.score_tokens, mcfg, st.params, inputs, src, float(r.temperature))
  ref_c = st.compile(sequences.score_tokens, lora.base_config(mcfg), st.params if adapted else ref, inputs, src,
                     float(r.temperature))
  ref_name = "reference log-probs (" + ("base: adapters off" if adapted else a.ref_dtype) + ")"
  scoring = [plan_row("old log-probs (policy)", desc, old_c, resident, st.hbm_gib),
             plan_row(ref_name, desc, ref_c, opt_bytes + (0 if adapted else param_bytes), st.hbm_gib)]
  return roll + scoring + update_plans


def adacs_plans(st: Setting) -> list[ProgramPlan]:
  """Pass-rate rollouts (n samples, no branching) and the SFT step of AdaCS."""
  c, mcfg = st.config, st.mcfg
  a = c.adacs
  shapes = step_shapes(c, mcfg, a.max_response_length)
  sc = settings_lib.sampling(c, mcfg, 0, n=a.pass_rate_samples, max_branches=0)
  roll_shapes = dataclasses.replace(shapes, response_width=sc.max_new_tokens)
  fixed = c.rollout.prompts_in_flight if sc.kv_cache == "paged" else c.rollout.chunk_prompts
  chunk = fixed or largest_rollout_chunk(st, sc, roll_shapes, 0, a.pass_rate_batch, False)[0] or 1
  roll = rollout_programs(st, sc, chunk, roll_shapes, 0, branching=False, label="pass-rate rollout")
  s = settings_lib.adacs_sft(_at_shapes(c, shapes), st.mesh)
  updater = sft.make_sft(mcfg, st.params, s.optim, 1, s.frozen)
  rows = _training_rows(st, shapes, s.packing, 1)  # one cold-start response per prompt
  micro = sft.micro_batches(mcfg, [rows.prompts[g] for g in rows.group], rows.responses, s.packing, 0,
                            shapes.response_width)[0]
  desc = _rows_desc(micro.batch.inputs.ids, int(micro.batch.loss_mask.sum()), s.packing, mcfg.image_token_id)
  update_plans, _ = _update_plans(st, updater, micro.batch, micro.settings, 0, "SFT", desc)
  return roll[1:] + update_plans


def plan_step(config: ml_collections.ConfigDict, devices: list[Any], hbm_gib: float) -> list[ProgramPlan]:
  """Every device program of one step of `config.stage` (aepo, adacs, or ares = both) on `devices`."""
  st = Setting.create(config, devices, hbm_gib)
  plans = []
  if config.stage in ("adacs", "ares"):
    plans += adacs_plans(st)
  if config.stage in ("aepo", "ares"):
    plans += aepo_plans(st)
  if not plans:
    raise ValueError(f"config.stage={config.stage!r}: memory plans exist for the aepo, adacs and ares stages")
  return plans


def auto_chunk(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, mcfg: models.ModelConfig,
               sc: sampling.SamplingConfig, most: int, resident_bytes: int = 0, branching: bool = True) -> int:
  """`rollout.chunk_prompts=0` (dense) or `rollout.prompts_in_flight=0` (paged) resolved on the run's own
  devices: the largest chunk or groups in flight (<= `most`) whose rollout programs fit beside
  `resident_bytes`. On CPU without `plan.hbm_gib` the budget is host memory, which a CPU-sized model does
  not approach: all prompts at once, without compiling."""
  field = "rollout.prompts_in_flight" if sc.kv_cache == "paged" else "rollout.chunk_prompts"
  device = mesh.devices.flat[0]
  if device.platform == "cpu" and config.plan.hbm_gib <= 0:
    logging.info("%s=0 on CPU: all %d prompts at once (set plan.hbm_gib to plan them)", field, most)
    return most
  hbm = device_hbm_gib(device, config.plan.hbm_gib)
  st = Setting(config, mesh, mcfg, hbm, abstract_params(mcfg, mesh))
  shapes = step_shapes(config, mcfg, sc.max_new_tokens)
  chunk, plans = largest_rollout_chunk(st, sc, shapes, resident_bytes, most, branching)
  if not chunk:
    raise ValueError(f"{field}=0: not even the smallest size fits {hbm:.1f} GiB per device "
                     f"beside {resident_bytes / GIB:.1f} GiB of state; run `python -m ares_jax.plan` for the table")
  logging.info("%s=0: %d prompts (peak %.2f of %.1f GiB per device)", field, chunk,
               max(p.peak for p in plans) / GIB, hbm)
  return chunk
