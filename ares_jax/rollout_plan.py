"""The rollout's device programs in a memory plan, and the largest rollout that fits: prompts per call
for the dense engine, groups in flight for the paged one (`largest_rollout_chunk`)."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from absl import logging

from ares_jax import sampling, sharding
from ares_jax.compiled_memory import GIB, Compiled, ProgramPlan, abstract_like, plan_row
from ares_jax.sampling import chunks as chunks_lib
from ares_jax.sampling import paged, refill, sampler
from ares_jax.sampling.sampler import decode_weights, rollout_chunk
from ares_jax.plan_inputs import Setting, Shapes, synthetic_batch
from ares_jax.train import sequences


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
  desc = (f"{chunk} prompts x {sc.n + sc.branches(branching)} slots, {shapes.prompt_width} + {sc.max_new_tokens}"
          f"{shapes.media(chunk)}")
  return [plan_row("decode weights (per generate call)", f"{st.mcfg.dtype} copy of the decoder", weights,
                   resident, st.hbm_gib),
          plan_row(f"{label} chunk (prefill + decode loop)", desc + shapes.note, roll, resident, st.hbm_gib,
                   (("prompts_per_call", chunk),))]


def paged_programs(st: Setting, sc: sampling.SamplingConfig, n_groups: int, shapes: Shapes, resident: int,
                   weights: Compiled, *, branching: bool, label: str, costs: bool) -> list[ProgramPlan]:
  """The paged engine's programs with `n_groups` groups in flight: prefilling a chunk of prompts into
  free groups, and the decode loop. With `costs`, one decode step compiled apart at half the response
  budget live (`PagedCache.cost_blocks`) gives the decode row's flops and collectives per step; its bytes
  are the weights and live KV a step reads, with the dense engine's KV per prompt-step beside them."""
  group = sc.n + sc.branches(branching)
  sc = sc.for_platform(st.mesh.devices.flat[0].platform)
  prefill = sc.chunk_prompts or max(1, n_groups // 8)  # `refill.layout` for a step of more prompts
  c = chunks_lib.make_chunks(st.mcfg, synthetic_batch(st.mcfg, shapes, prefill),
                             dataclasses.replace(sc, chunk_prompts=prefill))[0]
  t_prompt = c.inputs.ids.shape[1]
  state = st.compile(refill.start, st.mcfg, sc, n_groups, group, t_prompt).out
  if state is None:  # XLA refused the page pools themselves: nothing else can be compiled against them
    shards = sharding.batch_shards(st.mesh)
    raise ValueError(f"rollout.prompts_in_flight={n_groups}: the page pools of {n_groups} groups do not fit a "
                     f"device" + (f" (not a multiple of the {shards} devices the batch is split over, so they are "
                                  "not split)" if n_groups % shards else ""))
  prompts, key = abstract_like((c.inputs, jax.random.key(0)), st.mesh)
  per_prompt = abstract_like(np.zeros((prefill,), np.int32), st.mesh)
  admit = st.compile(refill.admit, st.mcfg, sc, st.params, state, prompts, per_prompt, per_prompt, per_prompt)
  tau = abstract_like(np.float32(1.0), st.mesh) if branching else None
  decode = st.compile(refill.decode, st.mcfg, sc, weights.out, state, key, tau, abstract_like(np.int32(0), st.mesh))
  img = shapes.media()
  desc = (f"{n_groups} groups in flight x {group} slots, {t_prompt} + {sc.max_new_tokens}, pages of {sc.page_size}, "
          f"{sc.decode_attention} attention")
  extra: tuple = (("groups_in_flight", n_groups),)  # with the prefill's prompts per call: `step_time`'s calls
  if costs:
    live = max(sc.max_new_tokens // 2, 1)
    span = paged.block_pages_for(sc.page_size) * sc.page_size
    at_live = state.replace(cache=state.cache.replace(cost_blocks=-(-live // span)))
    step = st.compile(sampler.one_step, st.mcfg, sc, branching, weights.out, at_live, key)
    # HBM a decode step must read: the decode weights and the KV in use (the prompt once per group, each
    # slot's `live` response tokens), against the dense engine's full rows. XLA's TPU cost model is no
    # guide here: it counts every in-place page write as a read and write of the whole pool.
    tc = st.mcfg.text
    kv_token = 2 * tc.num_layers * tc.num_kv_heads * tc.head_dim * np.dtype(sc.cache_dtype or st.mcfg.dtype).itemsize
    paged_kv, dense_kv = (t_prompt - 1 + group * live) * kv_token, group * (t_prompt + sc.max_new_tokens) * kv_token
    groups_per_device = n_groups / (st.mesh.shape["data"] * st.mesh.shape["fsdp"])
    step_bytes = weights.out_bytes + groups_per_device * paged_kv / st.mesh.shape["tensor"]
    decode = dataclasses.replace(decode, flops=step.flops, bytes_accessed=step_bytes,
                                 collective_bytes=step.collective_bytes)
    extra += (("decode_step_live_tokens", live), ("decode_step_bytes", step_bytes),
             ("xla_decode_step_bytes", step.bytes_accessed), ("kv_bytes_per_prompt_step", paged_kv),
             ("dense_kv_bytes_per_prompt_step", dense_kv), ("kv_read_ratio", paged_kv / dense_kv))
    desc += (f"; cost columns: one step at {live} live response tokens, bytes = decode weights + live KV "
             f"({paged_kv / dense_kv:.2f} of the dense engine's KV per prompt-step)")
  return [plan_row("decode weights (per generate call)", f"{st.mcfg.dtype} copy of the decoder", weights,
                   resident, st.hbm_gib),
          plan_row(f"{label}: prefill into free groups", f"{prefill} prompts{img}", admit, resident, st.hbm_gib,
                   (("prompts_per_call", prefill),)),
          plan_row(f"{label}: paged decode loop", desc + shapes.note, decode, resident, st.hbm_gib, extra)]


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
  unit = "groups in flight" if sc.kv_cache == "paged" else "prompts per call"
  logging.info("chunk search: the most %s (a multiple of %d, at most %d) whose rollout fits %.3g GiB per device",
               unit, base, top, budget / GIB)
  def plan(n):
    plans = rollout_programs(st, sc, n, shapes, resident, branching, costs=False)
    logging.info("chunk search: %d %s: peak %.3g GiB of %.3g GiB: %s", n, unit, peak(plans) / GIB, budget / GIB,
                 "fits" if peak(plans) <= budget else "does not fit")
    return plans
  peak = lambda plans: max(p.peak for p in plans)
  small = plan(base)
  if peak(small) > budget:
    return 0, []
  if top == base:
    return base, small
  # Bracket the largest fitting chunk between one that fits (lo) and one that does not (hi). After a probe
  # that fits, extrapolate along the slope of the last two that fit (the peak bends upwards as other
  # programs take over, so a line to hi would creep up by one base at a time); after one that does not,
  # interpolate between lo and hi. Stop within a sixteenth.
  lo, lo_plans, lo_peak = base, small, peak(small)
  hi, hi_peak = None, None
  second = min(8 * base, top)  # far enough from the first point for a slope that buckets do not hide
  probe = plan(second)
  slope = max((peak(probe) - lo_peak) / (second - base), 1.0)
  if peak(probe) <= budget:
    lo, lo_plans, lo_peak = second, probe, peak(probe)
  else:
    hi, hi_peak = second, peak(probe)
  fitted = hi is None
  while lo < top:
    if hi is not None and hi - lo <= max(base, lo // 16):
      break
    if fitted:
      guess = min(top, int((budget - lo_peak) / slope) + lo)
    else:
      guess = lo + int((budget - lo_peak) / max(hi_peak - lo_peak, 1.0) * (hi - lo))
    guess = guess // base * base
    guess = min(max(guess, lo + base), top if hi is None else hi - base)
    if hi is not None and guess <= lo:
      break
    plans = plan(guess)
    fitted = peak(plans) <= budget
    if fitted:
      slope = max((peak(plans) - lo_peak) / (guess - lo), 1.0)
      lo, lo_plans, lo_peak = guess, plans, peak(plans)
    else:
      hi, hi_peak = guess, peak(plans)
  return lo, lo_plans
