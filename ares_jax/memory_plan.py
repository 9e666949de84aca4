"""The device programs of one step at a config's shapes, compiled ahead of time, and what they need.

Inputs are made by the real run's host code (`sampling.chunks.make_chunks`, `train.sequences.pack`)
from synthetic prompts of the config's shapes, then turned into `jax.ShapeDtypeStruct`s; parameters
are abstract (`models.abstract_params`) with the shardings of the logical rules. So what is compiled
here is what the run compiles, for any set of devices: a TPU topology's (`plan.py`) or the run's own
(`largest_rollout_chunk`, for `rollout.chunk_prompts=0`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ares_jax import models, sampling, sharding
from ares_jax import settings as settings_lib
from ares_jax.aepo import step as aepo_step
from ares_jax.compiled_memory import (GIB, Compiled, ProgramPlan, abstract_like, abstract_params, compile_program,
                                      device_bytes, device_hbm_gib, plan_row)
from ares_jax.models import lora
from ares_jax.sampling import chunks as chunks_lib
from ares_jax.sampling import paged, refill, sampler
from ares_jax.sampling.sampler import decode_weights, rollout_chunk
from ares_jax.train import sequences, sft
from ares_jax.train import optimizer as optim_lib
from ares_jax.train import update as update_lib

# --- synthetic inputs of the config's shapes -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The shapes one step runs at: prompt and response widths, images per prompt and their grid."""

  prompt_width: int
  response_width: int
  images_per_prompt: int
  grid: tuple[int, int, int]  # (t, h, w) patches of one image
  note: str = ""

  @property
  def image_tokens(self) -> int:
    return self.images_per_prompt * math.prod(self.grid) // 4

  def describe(self, rows: int) -> str:
    img = f", {self.images_per_prompt} img {self.grid[1] * 14}x{self.grid[2] * 14} px" if self.images_per_prompt else ""
    return f"{rows} x ({self.prompt_width} + {self.response_width}){img}{self.note}"


def step_shapes(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, response_width: int) -> Shapes:
  """Prompt width from `rollout.max_prompt_length`, image load from `config.plan`; a prompt width too
  small for the images is raised to hold them (said in the shapes column: such prompts would be
  skipped by the run's length check unless max_prompt_length is raised to match)."""
  p, vc = config.plan, mcfg.vision
  pixels = p.image_pixels or config.processor.max_pixels
  side = int(math.isqrt(int(pixels)))
  factor = vc.patch_size * vc.spatial_merge_size
  h, w = smart_resize(side, side, factor=factor, min_pixels=config.processor.min_pixels, max_pixels=pixels)
  grid = (1, h // vc.patch_size, w // vc.patch_size)
  width = int(config.rollout.max_prompt_length)
  shapes = Shapes(width, response_width, int(p.images_per_prompt), grid)
  need = shapes.image_tokens + 2 * shapes.images_per_prompt + 32
  if need > width:
    raised = sequences.round_up(need, 64)
    shapes = dataclasses.replace(shapes, prompt_width=raised, note=f" (prompt raised from {width} to hold the images)")
  return shapes


def synthetic_batch(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> dict:
  """A processor batch of n synthetic prompts whose pixel rows are abstract (a chunk of hundreds of
  max_pixels images would not fit in host memory; pixel values do not change device memory)."""
  batch = sequences.prompt_batch([sequences.Prompt(ids) for ids in _prompt_ids(mcfg, shapes, n)], 0)
  if shapes.images_per_prompt:
    grid = np.tile(np.asarray(shapes.grid, np.int64), (n * shapes.images_per_prompt, 1))
    batch["image_grid_thw"] = grid
    batch["pixel_values"] = jax.ShapeDtypeStruct((int(grid.prod(-1).sum()), mcfg.vision.patch_dim), jnp.float32)
  return batch


def _prompt_ids(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> list[np.ndarray]:
  per_image = math.prod(shapes.grid) // mcfg.vision.merge_unit
  image = [mcfg.vision_start_token_id] + [mcfg.image_token_id] * per_image + [mcfg.vision_end_token_id]
  ids = image * shapes.images_per_prompt
  return [np.asarray(ids + [1] * (shapes.prompt_width - len(ids)), np.int32)] * n


def synthetic_prompts(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> list[sequences.Prompt]:
  """n prompts filling `shapes.prompt_width` tokens, with their images (zero pixels: values do not
  change memory)."""
  ids = _prompt_ids(mcfg, shapes, 1)[0]
  if not shapes.images_per_prompt:
    return [sequences.Prompt(ids) for _ in range(n)]
  grid = np.tile(np.asarray(shapes.grid, np.int64), (shapes.images_per_prompt, 1))
  pixels = np.zeros((int(grid.prod(-1).sum()), mcfg.vision.patch_dim), np.float32)
  return [sequences.Prompt(ids, pixels, grid) for _ in range(n)]


# --- the programs of a step ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
  """What every program of a plan shares: the devices' mesh, the model, HBM, the abstract policy."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  mcfg: models.ModelConfig
  hbm_gib: float
  params: Any  # abstract policy parameters

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, devices: list[Any], hbm_gib: float) -> "Setting":
    m = config.mesh
    mesh = sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=devices)
    mcfg = settings_lib.model(config.model)
    return cls(config, mesh, mcfg, hbm_gib, abstract_params(mcfg, mesh))

  def compile(self, fn: Callable, *args, **kwargs) -> Compiled:
    return compile_program(fn, *args, mesh=self.mesh, **kwargs)


def rollout_programs(st: Setting, sc: sampling.SamplingConfig, chunk: int, shapes: Shapes, resident: int,
                     branching: bool = True, label: str = "rollout", costs: bool = True) -> list[ProgramPlan]:
  """The per-call decode-weight copy and the rollout's programs: for `rollout.kv_cache="dense"` one chunk
  of `chunk` prompts (prefill with the vision tower, decode loop); for "paged" `chunk` groups in flight
  (`paged_programs`)."""
  weights = st.compile(decode_weights, st.mcfg, st.params, sc.lora_merged)
  # placed as `generate` places them (whole on every device where they fit): the row shows the placed copy
  layout = sampler.decode_weight_layout(weights.out, int(st.hbm_gib * GIB))
  placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), weights.out, layout)
  weights = dataclasses.replace(weights, out=placed, out_bytes=sharding.device_bytes_of(placed, layout))
  if sc.kv_cache == "paged":
    return paged_programs(st, sc, chunk, shapes, resident, weights, branching=branching, label=label, costs=costs)
  sc = dataclasses.replace(sc, chunk_prompts=chunk)
  c = chunks_lib.make_chunks(st.mcfg, synthetic_batch(st.mcfg, shapes, chunk), sc)[0]
  prompts, key = abstract_like((c.inputs, jax.random.key(0)), st.mesh)
  tau = abstract_like(np.float32(1.0), st.mesh) if branching else None
  offset = abstract_like(np.int32(0), st.mesh)
  budget = abstract_like(np.zeros((chunk,), np.int32), st.mesh)
  roll = st.compile(rollout_chunk, st.mcfg, sc, st.params, weights.out, prompts, key, tau, prompt_offset=offset,
                    budget=budget)
  desc = f"{chunk} prompts x {sc.n + sc.branches(branching)} slots, {shapes.prompt_width} + {sc.max_new_tokens}"
  if shapes.images_per_prompt:
    desc += f", {chunk * shapes.images_per_prompt} img {shapes.grid[1] * 14}x{shapes.grid[2] * 14} px"
  return [plan_row("decode weights (per generate call)", f"{st.mcfg.dtype} copy of the decoder", weights,
                   resident, st.hbm_gib),
          plan_row(f"{label} chunk (prefill + decode loop)", desc + shapes.note, roll, resident, st.hbm_gib)]


def paged_programs(st: Setting, sc: sampling.SamplingConfig, n_groups: int, shapes: Shapes, resident: int,
                   weights: Compiled, *, branching: bool, label: str, costs: bool) -> list[ProgramPlan]:
  """The paged engine's programs with `n_groups` groups in flight: prefilling a chunk of prompts into
  free groups, and the decode loop. With `costs`, one decode step compiled apart at half the response
  budget live (`PagedCache.cost_blocks`) gives the decode row's flops, bytes and collectives per step,
  beside the dense engine's step at the same shapes (bytes per prompt-step of both in the JSON)."""
  group = sc.n + sc.branches(branching)
  prefill = sc.chunk_prompts or max(1, n_groups // 8)  # `refill.layout` for a step of more prompts
  c = chunks_lib.make_chunks(st.mcfg, synthetic_batch(st.mcfg, shapes, prefill),
                             dataclasses.replace(sc, chunk_prompts=prefill))[0]
  t_prompt = c.inputs.ids.shape[1]
  state = st.compile(refill.start, st.mcfg, sc, n_groups, group, t_prompt).out
  prompts, key = abstract_like((c.inputs, jax.random.key(0)), st.mesh)
  per_prompt = abstract_like(np.zeros((prefill,), np.int32), st.mesh)
  admit = st.compile(refill.admit, st.mcfg, sc, st.params, state, prompts, per_prompt, per_prompt, per_prompt)
  tau = abstract_like(np.float32(1.0), st.mesh) if branching else None
  decode = st.compile(refill.decode, st.mcfg, sc, weights.out, state, key, tau, abstract_like(np.int32(0), st.mesh))
  img = f", {shapes.images_per_prompt} img {shapes.grid[1] * 14}x{shapes.grid[2] * 14} px" if shapes.images_per_prompt else ""
  desc = f"{n_groups} groups in flight x {group} slots, {t_prompt} + {sc.max_new_tokens}, pages of {sc.page_size}"
  extra: tuple = ()
  if costs:
    live = max(sc.max_new_tokens // 2, 1)
    span = paged.block_pages_for(sc.page_size) * sc.page_size
    at_live = state.replace(cache=state.cache.replace(cost_blocks=-(-live // span)))
    step = st.compile(sampler.one_step, st.mcfg, sc, branching, weights.out, at_live, key)
    dense = st.compile(sampler.one_step, st.mcfg, sc, branching, weights.out,
                       dense_state(st, sc, n_groups, group, t_prompt), key)
    decode = dataclasses.replace(decode, flops=step.flops, bytes_accessed=step.bytes_accessed,
                                 collective_bytes=step.collective_bytes)
    per_step = lambda c: None if c.bytes_accessed is None else c.bytes_accessed / n_groups
    extra = (("decode_step_live_tokens", live), ("decode_step_bytes", step.bytes_accessed),
             ("bytes_per_prompt_step", per_step(step)), ("dense_decode_step_bytes", dense.bytes_accessed),
             ("dense_bytes_per_prompt_step", per_step(dense)),
             ("dense_decode_step_collective_bytes", dense.collective_bytes))
    desc += f"; cost columns: one step at {live} live response tokens"
  return [plan_row("decode weights (per generate call)", f"{st.mcfg.dtype} copy of the decoder", weights,
                   resident, st.hbm_gib),
          plan_row(f"{label}: prefill into free groups", f"{prefill} prompts{img}", admit, resident, st.hbm_gib),
          plan_row(f"{label}: paged decode loop", desc + shapes.note, decode, resident, st.hbm_gib, extra)]


def dense_state(st: Setting, sc: sampling.SamplingConfig, n_prompts: int, group: int, t_prompt: int) -> Any:
  """The dense engine's decode state at these shapes as abstract arrays (not compiled: it need not fit),
  its caches sharded as `rollout_chunk` shards them."""
  shapes = jax.eval_shape(lambda: sampler.dense_start(st.mcfg, sc, n_prompts, group, t_prompt))
  cache_spec = ("cache_batch", None, "cache_heads", None)
  def place(x):
    names = cache_spec if x.ndim == 4 else (("cache_batch",) + (None,) * (x.ndim - 1) if x.ndim else ())
    spec = sharding.logical_to_spec(names, x.shape, st.mesh)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.NamedSharding(st.mesh, spec))
  return jax.tree.map(place, shapes)


def largest_rollout_chunk(st: Setting, sc: sampling.SamplingConfig, shapes: Shapes, resident: int, most: int,
                          branching: bool = True) -> tuple[int, list[ProgramPlan]]:
  """The largest prompts-per-call that fits beside `resident` bytes, up to `most`. Chunks are multiples
  of the smallest one whose slots divide evenly over the batch-sharding devices (else the KV cache
  would be replicated). A rollout's memory is close to affine in its prompts (the KV cache and the
  per-slot buffers) though bucketed shapes bend it, so two small compiles start a bracketed search by
  interpolation that ends within a sixteenth: a handful of compiles, never one of the whole batch.
  The paged engine's groups in flight are searched the same way (multiples of the batch-sharding devices,
  its group axis being the sharded one), without the cost compiles.
  Returns (chunk, its plans); (0, []) when not even the smallest fits."""
  batch_devices = st.mesh.shape["data"] * st.mesh.shape["fsdp"]
  base = batch_devices // math.gcd(batch_devices, sc.n + sc.branches(branching))
  if sc.kv_cache == "paged":
    base = batch_devices
  budget = st.config.plan.usable * st.hbm_gib * GIB
  top = sequences.round_up(most, base)
  def plan(n):
    plans = rollout_programs(st, sc, n, shapes, resident, branching, costs=False)
    logging.info("rollout chunk (paged: groups in flight) of %d prompts: peak %.2f GiB (budget %.2f GiB)", n, peak(plans) / GIB, budget / GIB)
    return plans
  peak = lambda plans: max(p.peak for p in plans)
  small = plan(base)
  if peak(small) > budget:
    return 0, []
  if top == base:
    return base, small
  # Bracket the largest fitting chunk between one that fits (lo) and one that does not (hi), guessing
  # by linear interpolation (extrapolation while hi is unknown); stop within a sixteenth.
  lo, lo_plans, lo_peak = base, small, peak(small)
  hi, hi_peak = None, None
  second = min(8 * base, top)  # far enough from the first point for a slope that buckets do not hide
  probe = plan(second)
  slope = max((peak(probe) - lo_peak) / (second - base), 1.0)
  if peak(probe) <= budget:
    lo, lo_plans, lo_peak = second, probe, peak(probe)
  else:
    hi, hi_peak = second, peak(probe)
  while lo < top:
    if hi is None:
      guess = min(top, int((budget - lo_peak) / slope) + lo)
    else:
      if hi - lo <= max(base, lo // 16):
        break
      guess = lo + int((budget - lo_peak) / max(hi_peak - lo_peak, 1.0) * (hi - lo))
    guess = guess // base * base
    guess = min(max(guess, lo + base), top if hi is None else hi - base)
    if hi is not None and guess <= lo:
      break
    plans = plan(guess)
    if peak(plans) <= budget:
      slope = max((peak(plans) - lo_peak) / (guess - lo), 1.0)
      lo, lo_plans, lo_peak = guess, plans, peak(plans)
    else:
      hi, hi_peak = guess, peak(plans)
  return lo, lo_plans


def _training_rows(st: Setting, shapes: Shapes, micro_batch_size: int):
  """`micro_batch_size` synthetic prompt + full-width response rows, as the AEPO step holds them."""
  mb, width = micro_batch_size, shapes.response_width
  prompts = synthetic_prompts(st.mcfg, shapes, mb)
  responses = [np.ones((width,), np.int32)] * mb
  mask = np.ones((mb, width), bool)
  return aepo_step.UpdateRows(st.mcfg, prompts, responses, np.zeros((mb,), np.float32), mask,
                              np.ones((mb, width), np.float32), mb, width, 0)


def _update_plans(st: Setting, updater: update_lib.Updater, batch: Any, settings: Any, ref_bytes: int,
                  label: str) -> tuple[list[ProgramPlan], int]:
  """The train state's creation (for its size), the gradient micro-step and the optimizer apply."""
  state = updater.abstract_state(st.params, st.mesh)
  opt_bytes = device_bytes(state.opt_state)
  accum = updater.trainable(st.params)  # same shapes, dtypes and shardings as the trainable parameters
  weight = abstract_like(np.float32(1.0), st.mesh)
  micro = st.compile(updater.micro_step, st.params, accum, abstract_like(batch, st.mesh), weight, settings)
  apply = st.compile(updater.apply, state, accum, weight)
  rows = batch.inputs.ids.shape
  return [restore_row(st, state, ref_bytes, label),
          plan_row(f"{label} gradient micro-step (+ accumulation)", f"{rows[0]} x {rows[1]} tokens", micro,
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
  rows = _training_rows(st, shapes, a.micro_batch_size)
  settings = settings_lib.loss(c, rows.packed(range(a.micro_batch_size)).prompt_width)
  old = np.zeros((len(rows), rows.width), np.float32)
  micro = aepo_step.micro_batches(rows, np.arange(len(rows)), old, old, settings)[0]
  update_plans, opt_bytes = _update_plans(st, updater, micro.batch, settings, ref_bytes, "AEPO")

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

  p = rows.packed(range(a.micro_batch_size))
  inputs = abstract_like(p.inputs, st.mesh)
  desc = f"{a.micro_batch_size} x ({p.prompt_width} + {rows.width})"
  old_c = st.compile(sequences.score, mcfg, st.params, inputs, p.prompt_width, float(r.temperature))
  ref_c = st.compile(sequences.score, lora.base_config(mcfg), st.params if adapted else ref, inputs, p.prompt_width,
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
  s = settings_lib.adacs_sft(c)
  updater = sft.make_sft(mcfg, st.params, s.optim, 1, s.frozen)
  prompts = synthetic_prompts(mcfg, shapes, a.micro_batch_size)
  responses = [np.ones((shapes.response_width,), np.int32)] * a.micro_batch_size
  micro = sft.micro_batches(mcfg, prompts, responses, a.micro_batch_size, 0, shapes.response_width)[0]
  update_plans, _ = _update_plans(st, updater, micro.batch, micro.settings, 0, "SFT")
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
