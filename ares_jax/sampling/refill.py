"""Continuous batching over the paged cache (`rollout.kv_cache="paged"`).

F = `prompts_in_flight` groups decode together. The call's prompts wait in a queue of equally shaped
prefill chunks (`chunk_prompts` each, `chunks.make_chunks`); a chunk is prefilled into free groups as
soon as there are enough of them (`admit`), and the decode loop (`decode`) runs until enough groups have
ended to take the next chunk (the exit is decided on the device, so no step is spent polling), or, when
a caller wants ended groups early (`on_done`, e.g. to grade them while the rest decode), until a
chunk's worth more have ended. Ended groups are read back (`harvest`) and their slots and pages are
free again. Once no prompt waits, the loop also stops whenever at most half the groups still decode, and
those are moved into a state of half as many groups (`drain`, up to `drain_halvings` times), so a call's
tail of long trajectories does not pay for the slots of groups that have ended.

Random streams are keyed by (prompt, slot, position), so what a prompt samples does not depend on the
group it lands in, what decodes beside it, the chunking, the page size or the number of devices.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax import sharding
from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs, Qwen25VL
from ares_jax.sampling import paged
from ares_jax.sampling.config import SamplingConfig
from ares_jax.sampling.sampler import (DecodeState, StepConsts, admit_slots, decode_config, decode_one,
                                       initial_slots, prompt_ends, results)

@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def start(config: ModelConfig, sc: SamplingConfig, n_groups: int, group: int, t_prompt: int) -> DecodeState:
  """F empty groups of G slots for prompts of width T."""
  tc = config.text
  cache = paged.empty_cache(tc.num_layers, n_groups, group, t_prompt, sc.max_new_tokens, page_size=sc.page_size,
                            kv_heads=tc.num_kv_heads, head_dim=tc.head_dim,
                            dtype=jnp.dtype(sc.cache_dtype or config.dtype), attention=sc.decode_attention)
  return initial_slots(cache, n_groups, group, sc.max_new_tokens, sc.pad_id)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def admit(config: ModelConfig, sc: SamplingConfig, params, state: DecodeState, prompts: ModelInputs, groups,
          prompt_index, budget) -> DecodeState:
  """Prefills Q prompts (vision tower included) into `groups` [Q] (F: a filler row, skipped):
  `prompt_index` [Q] global prompt indices, `budget` [Q] response tokens."""
  k, v = Qwen25VL(config).apply(lora.variables(config, params), prompts, method=Qwen25VL.prefill)  # [L, Q, T, K, D]
  state = state.replace(cache=state.cache.admit(groups, k, v, prompts.mask))
  return admit_slots(state, groups, prompt_index, *prompt_ends(prompts), budget, n_roots=sc.n, pad_id=sc.pad_id)


def _busy(state: DecodeState) -> jax.Array:
  return state.active.reshape(state.branches.shape[0], -1).any(axis=1)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(3,))
def decode(config: ModelConfig, sc: SamplingConfig, weights: tuple, state: DecodeState, key, tau, idle_target):
  """Decodes until no slot is active or at least `idle_target` groups have none. Returns (state, busy [F])."""
  n_branch = sc.branches(tau is not None)
  consts = StepConsts(key=key, tau=jnp.float32(jnp.inf) if tau is None else jnp.asarray(tau, jnp.float32))
  body = functools.partial(decode_one, decode_config(config, sc), sc, sc.n + n_branch, n_branch, weights, consts)
  cond = lambda s: jnp.any(s.active) & ((~_busy(s)).sum() < idle_target)
  state = jax.lax.while_loop(cond, body, state)
  return state, _busy(state)


@functools.partial(jax.jit, static_argnums=(2,))
def harvest(state: DecodeState, groups, pad_id: int) -> dict:
  """`results` of the slots of `groups` [H], group by group; `parent` as a slot in its group (-1: root)."""
  group = state.length.shape[0] // state.branches.shape[0]
  slots = (groups[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)
  out = {k: jnp.take(v, slots, axis=0) for k, v in results(state, pad_id).items()}
  out["parent"] = jnp.where(out["parent"] >= 0, out["parent"] % group, -1)
  return out


def drain(state: DecodeState, keep: np.ndarray) -> DecodeState:
  """The groups `keep` [F'] of `state` as a state of F' groups, in that order (every array of a
  `DecodeState` leads with its group or its slot axis). Consumes `state`: its arrays are freed one at a
  time as their copies are made, so beside the old state this needs one array's copy, not a new state."""
  n_groups = state.branches.shape[0]
  group = state.length.shape[0] // n_groups
  keep = jnp.asarray(keep, jnp.int32)

  def take(x):
    if x.ndim == 0:  # the step counter
      return x
    layout = x.sharding if isinstance(x.sharding, jax.sharding.NamedSharding) else None
    out = _take_groups(x, keep, 1 if x.shape[0] == n_groups else group, layout)
    x.delete()  # freed once the copy has read it (donation cannot alias a smaller output)
    return out

  return jax.tree.map(take, state)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _take_groups(x, keep, group: int, layout):
  """x [F * group, ...] -> [F' * group, ...]: the rows of groups `keep`, laid out as x was."""
  out = jnp.take(x.reshape(-1, group, *x.shape[1:]), keep, axis=0).reshape(-1, *x.shape[1:])
  return out if layout is None else jax.lax.with_sharding_constraint(out, layout)


def layout(sc: SamplingConfig, n_prompts: int) -> tuple[int, int]:
  """(groups in flight F, prompts per prefill Q) for a call of `n_prompts`: F = `prompts_in_flight` (0: all
  of them); Q = `chunk_prompts`, else all when they all fit at once, else an eighth of F (ended groups are
  refilled in small steps)."""
  n_groups = min(sc.prompts_in_flight or n_prompts, n_prompts)
  prefill = sc.chunk_prompts or (n_groups if n_groups == n_prompts else max(1, n_groups // 8))
  return n_groups, min(prefill, n_groups)


def run(config: ModelConfig, params, weights: tuple, chunks: list, sc: SamplingConfig, key, tau, *,
        budgets: np.ndarray, on_done: Callable[[np.ndarray, dict], None] | None = None) -> dict:
  """Rolls out every chunk's prompts (`chunks.make_chunks` at `layout`'s prefill size); returns `results` of
  all B * G slots (slot g * G + i: sample i of prompt g, `parent` numbered the same way).
  `on_done(prompt rows, results of their slots)` is called for every set of groups read back, in the
  order they end."""
  n_prompts = sum(c.n_real for c in chunks)
  group = sc.n + sc.branches(tau is not None)
  n_groups = layout(sc, n_prompts)[0]
  t_prompt = chunks[0].inputs.ids.shape[1]
  with sharding.mesh_context_of(params):
    state = start(config, sc, n_groups, group, t_prompt)
  out: dict[str, np.ndarray] = {}
  free, occupant, waiting = list(range(n_groups)), {}, collections.deque(chunks)
  halvings = 0
  while waiting or occupant:
    while waiting and len(free) >= waiting[0].n_real:
      c = waiting.popleft()
      groups = np.full(len(c.rows), n_groups, np.int32)
      groups[:c.n_real] = free[:c.n_real]
      for g, row in zip(free[:c.n_real], c.rows[:c.n_real]):
        occupant[g] = int(row)
      free = free[c.n_real:]
      with sharding.mesh_context_of(params):
        state = admit(config, sc, params, state, c.inputs, groups, c.rows.astype(np.int32), budgets[c.rows])
    size = n_groups
    while not waiting and halvings < sc.drain_halvings and len(occupant) <= -(-size // 2) < size:
      size, halvings = -(-size // 2), halvings + 1
    if size < n_groups:
      keep = sorted(occupant) + free[:size - len(occupant)]  # ended or never-used groups fill the rest
      with sharding.mesh_context_of(params):
        state = drain(state, np.asarray(keep, np.int32))
      occupant = {i: occupant[g] for i, g in enumerate(keep) if g in occupant}
      n_groups, free = size, list(range(len(occupant), size))
    half = -(-n_groups // 2)
    if waiting:
      target = waiting[0].n_real  # idle groups (free ones included) the next chunk needs
    else:
      target = n_groups
      if on_done is not None:  # hand ended groups out a chunk at a time, not one round trip per group
        target = min(len(free) + len(chunks[0].rows), n_groups)
      if halvings < sc.drain_halvings and n_groups > 1:  # stop when the busy ones fit in half the groups
        target = min(target, n_groups - half)
    with sharding.mesh_context_of(params):
      state, busy = decode(config, sc, weights, state, key, tau, np.int32(target))
    busy = np.asarray(sharding.to_host(busy))
    ended = [g for g in occupant if not busy[g]]
    if not ended:
      continue
    bucket = 1 << (len(ended) - 1).bit_length()  # few compiled shapes
    index = np.asarray(ended + [ended[0]] * (bucket - len(ended)), np.int32)
    with sharding.mesh_context_of(params):
      part = sharding.to_host(harvest(state, index, sc.pad_id))
    part = {k: np.asarray(v)[:len(ended) * group] for k, v in part.items()}
    rows = np.asarray([occupant.pop(g) for g in ended])
    part["parent"] = np.where(part["parent"] >= 0, part["parent"] + np.repeat(rows, group) * group, -1)
    if not out:
      out = {k: np.zeros((n_prompts * group,) + v.shape[1:], v.dtype) for k, v in part.items()}
    slots = (rows[:, None] * group + np.arange(group)[None, :]).reshape(-1)
    for k, v in part.items():
      out[k][slots] = v
    if on_done is not None:
      on_done(rows, part)
    free.extend(ended)
  return out
