"""The decode step both rollout engines run, and the dense engine's compiled rollout of one chunk.

`decode_one` feeds every slot's pending token, samples, scores (log-prob, exact entropy, window entropy,
HWE marks) and forks; the KV it reads and writes is `DecodeState.cache`, one of two layouts with the same
three methods (`attention`: the layers' attention of a step; `absorb`: what those wrote; `fork`):
  - `DenseCache` (`rollout.kv_cache="dense"`, `rollout_chunk`): position-indexed rows, L arrays [S, C, K, D]
    with C = T + max_new_tokens. Columns 0..T-2 hold the prompt but its last token, and the token fed at
    step k of a trajectory (the last prompt token, then each sampled token) is written to T-1+k; every
    slot has its own copy of the prompt, and a fork copies its parent's row.
  - `paged.PagedCache` (the default; `refill.py` drives it): the prompt once per group, responses in pages.
Every prompt owns G = n + max_branches consecutive slots; roots first, branch slots after them, filled in
order. Rewinding a trajectory to response position t is just setting its length to t.

Decode runs the layers unrolled over per-layer weight buffers in the compute dtype (`decode_weights`,
made once per `generate` call and held whole on each device where they fit, `decode_weight_layout`):
the price is one extra copy of the decoder weights while sampling, the gain 2.06x per decode step on an
H100 (~1.8B, bf16, batch 64; benchmarks/README.md). The host side (chunking, input preparation,
results) is `sampling.chunks`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from ares_jax import sharding
from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.layers import cache_reader
from ares_jax.models.qwen25vl import ModelInputs, Qwen25VL, decode_step, unstack_layers
from ares_jax.sampling import distributions as dist
from ares_jax.sampling.branching import fork
from ares_jax.sampling.config import SamplingConfig


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries (a pytree; S slots in groups of G, N = max_new_tokens)."""

  step: jax.Array  # [] int32 decode steps run
  cache: Any  # `DenseCache` or `paged.PagedCache`: readers, write and fork of the KV
  tokens: jax.Array  # [S, N] int32
  logprobs: jax.Array  # [S, N] float32
  entropy: jax.Array  # [S, N] float32
  window_entropy: jax.Array  # [S, N] float32
  window_valid: jax.Array  # [S, N] bool
  hwe: jax.Array  # [S, N] bool
  length: jax.Array  # [S] int32 response tokens so far
  pending: jax.Array  # [S] int32 token fed at the next step
  active: jax.Array  # [S] bool
  parent: jax.Array  # [S] int32 slot of the parent (this state's numbering), -1 for roots
  fork_pos: jax.Array  # [S] int32
  next_fork: jax.Array  # [S] int32 earliest window start this slot may fork at
  branches: jax.Array  # [P] int32 forks taken per group
  slot_prompt: jax.Array  # [S] int32 global prompt index (the random streams' key)
  first_token: jax.Array  # [S] int32 the prompt's last token (fed again by a child rewound to 0)
  last_pos: jax.Array  # [S] int32 M-RoPE position of the prompt's last token
  budget: jax.Array  # [S] int32 response tokens this slot may generate (<= N)


def initial_slots(cache, n_groups: int, group: int, n_max: int, pad_id: int) -> DecodeState:
  """A state of empty groups (no slot active) around `cache`; `admit_slots` fills groups."""
  s_slots = n_groups * group
  zeros, ints = jnp.zeros((s_slots, n_max), jnp.float32), jnp.zeros((s_slots,), jnp.int32)
  return DecodeState(
      step=jnp.int32(0), cache=cache, tokens=jnp.full((s_slots, n_max), pad_id, jnp.int32), logprobs=zeros,
      entropy=zeros, window_entropy=zeros, window_valid=zeros.astype(bool), hwe=zeros.astype(bool), length=ints,
      pending=ints, active=ints.astype(bool), parent=ints - 1, fork_pos=ints - 1, next_fork=ints,
      branches=jnp.zeros((n_groups,), jnp.int32), slot_prompt=ints, first_token=ints, last_pos=ints, budget=ints)


def admit_slots(state: DecodeState, groups: jax.Array, prompt_index: jax.Array, last_token: jax.Array,
                last_pos: jax.Array, budget: jax.Array, *, n_roots: int, pad_id: int) -> DecodeState:
  """Resets the slots of `groups` [Q] (out of range: skipped) for new prompts: `prompt_index`, their last
  token and its M-RoPE position, their response budget (all [Q]); the roots become active."""
  n_groups = state.branches.shape[0]
  group = state.length.shape[0] // n_groups
  per_slot = lambda x: jnp.repeat(x, group)  # [Q] -> [Q * G]
  slots = (groups[:, None] * group + jnp.arange(group)[None, :]).reshape(-1)
  slots = jnp.where(per_slot(groups) < n_groups, slots, state.length.shape[0])  # dropped
  is_root = jnp.tile(jnp.arange(group) < n_roots, groups.shape[0])
  set_ = lambda buf, val: buf.at[slots].set(val, mode="drop")
  n_max = state.tokens.shape[1]
  return state.replace(
      tokens=set_(state.tokens, jnp.full((slots.shape[0], n_max), pad_id, jnp.int32)),
      logprobs=set_(state.logprobs, 0.0), entropy=set_(state.entropy, 0.0),
      window_entropy=set_(state.window_entropy, 0.0), window_valid=set_(state.window_valid, False),
      hwe=set_(state.hwe, False), length=set_(state.length, 0), pending=set_(state.pending, per_slot(last_token)),
      active=set_(state.active, is_root), parent=set_(state.parent, -1), fork_pos=set_(state.fork_pos, -1),
      next_fork=set_(state.next_fork, 0), branches=state.branches.at[groups].set(0, mode="drop"),
      slot_prompt=set_(state.slot_prompt, per_slot(prompt_index)), first_token=set_(state.first_token,
                                                                                   per_slot(last_token)),
      last_pos=set_(state.last_pos, per_slot(last_pos)), budget=set_(state.budget, per_slot(budget)))


def _window_update(state: DecodeState, was_active, w: int, tau):
  """Scores the newest complete window [length - w, length) of every slot that just grew."""
  if w > state.entropy.shape[1]:  # max_new_tokens < w: no window can ever complete
    return state, jnp.zeros_like(was_active), jnp.zeros_like(state.length)
  t = state.length - w
  ok = was_active & (t >= 0)
  start = jnp.maximum(t, 0)
  win = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (w,)))(state.entropy, start).mean(-1)
  at = (jnp.arange(state.tokens.shape[1])[None, :] == start[:, None]) & ok[:, None]
  marked = win >= tau
  return state.replace(
      window_entropy=jnp.where(at, win[:, None], state.window_entropy),
      window_valid=state.window_valid | at,
      hwe=jnp.where(at, marked[:, None], state.hwe)), ok & marked, start


@struct.dataclass
class DenseCache:
  """The position-indexed cache: L arrays [S, C, K, D] per k and v, C = T + N, every slot its own row
  (the prompt copied into each). Fed token k of a slot goes to column T - 1 + k."""

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  prompt_valid: jax.Array  # [S, C] bool: columns holding real prompt tokens
  t_prompt: int = struct.field(pytree_node=False)

  def attention(self, length, active):
    """(this cache, the L layers' attention of a decode step at response position `length` [S])."""
    del active
    cols = jnp.arange(self.prompt_valid.shape[1])[None, :]
    mask = self.prompt_valid | ((cols >= self.t_prompt - 1) & (cols < (self.t_prompt - 1 + length)[:, None]))
    return self, [cache_reader(k, v, mask[:, None, :]) for k, v in zip(self.k, self.v)]

  def absorb(self, updates, length, active):
    """Writes the fed tokens' (k, v) [S, 1, K, D] of each layer (`updates`) at column T - 1 + length."""
    del active  # an ended slot's column is never read again: writing it costs less than masking
    at = self.t_prompt - 1 + length
    return self.replace(k=tuple(_write_cache(c, kv[0][:, 0], at) for c, kv in zip(self.k, updates)),
                        v=tuple(_write_cache(c, kv[1][:, 0], at) for c, kv in zip(self.v, updates)))

  def fork(self, any_fork, src_in_group, is_child, t_child, n_roots):
    """Each new child's row replaced by its parent's (`branching.fork`), in place: one row per group and
    branch slot is read and written (a whole-cache gather would double the cache's memory)."""
    del is_child, t_child
    n_groups, group = src_in_group.shape

    def copy_rows(cache):
      grouped = cache.reshape(n_groups, group, *cache.shape[1:])
      for j in range(n_roots, group):  # only branch slots can be new children
        rows = jax.vmap(lambda g, i: jax.lax.dynamic_index_in_dim(g, i, 0, keepdims=False))(
            grouped, src_in_group[:, j])
        grouped = grouped.at[:, j].set(rows)
      return grouped.reshape(cache.shape)

    # One conditional per cache array rather than one around the whole cache: a conditional's result is
    # a buffer apart from its operand, so this bounds the extra memory by one layer's cache.
    cond_copy = lambda c: jax.lax.cond(any_fork, copy_rows, lambda x: x, c)
    return self.replace(k=tuple(map(cond_copy, self.k)), v=tuple(map(cond_copy, self.v)))


def _write_cache(cache: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
  """cache [S, C, K, D], new [S, K, D], at [S]: row s gets new[s] at column at[s]. A per-row dynamic
  update (a scatter with a batch dimension) stays local when the slot axis is sharded; indexing with
  (arange(S), at) would be an unstructured scatter the partitioner may replicate."""
  upd = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x[None].astype(c.dtype), i, axis=0)
  return jax.vmap(upd)(cache, new, at)


@struct.dataclass
class StepConsts:
  """What every decode step of a call reads and never changes."""

  key: jax.Array  # the call's key; each slot draws from fold_in(key, global prompt, slot in group, length)
  tau: jax.Array  # [] tau_high (inf: no marks, no branching)


def decode_one(config: ModelConfig, sc: SamplingConfig, group: int, n_branch: int, weights: tuple,
               consts: StepConsts, state: DecodeState) -> DecodeState:
  """One decode step of every slot: feed, sample, score, window, fork (either cache layout)."""
  top, layers = weights  # `decode_weights`
  s_slots, n_max = state.tokens.shape
  cache, attend = state.cache.attention(state.length, state.active)
  logits, updates = decode_step(config, top, layers, state.pending, state.last_pos + state.length, attend)
  cache = cache.absorb(updates, state.length, state.active)

  log_probs = dist.scaled_log_probs(logits, sc.temperature)
  # Streams keyed by (prompt, slot, position), not by row: the same seed samples the same tokens
  # whatever the chunk size, the other prompts of the call or the row a prompt is decoded in.
  fold = lambda p, j, n: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(consts.key, p), j), n)
  keys = jax.vmap(fold)(state.slot_prompt, jnp.arange(s_slots) % group, state.length)
  sample_from = log_probs
  if sc.suppress_ids:
    sample_from = log_probs.at[:, jnp.asarray(sc.suppress_ids)].set(jnp.finfo(jnp.float32).min)
  tok = jax.vmap(lambda k, lp: dist.sample(k, lp, sc.temperature, sc.top_k, sc.top_p))(keys, sample_from)
  lp_tok = jnp.take_along_axis(log_probs, tok[:, None], axis=-1)[:, 0]
  at = (jnp.arange(n_max)[None, :] == state.length[:, None]) & state.active[:, None]
  upd = lambda buf, val: jnp.where(at, val[:, None].astype(buf.dtype), buf)
  tokens, logprobs = upd(state.tokens, tok), upd(state.logprobs, lp_tok)
  entropy = upd(state.entropy, dist.token_entropy(log_probs)) if sc.track_entropy else state.entropy
  length = state.length + state.active
  is_eos = jnp.isin(tok, jnp.asarray(sc.eos_ids or (-1,), jnp.int32))
  active = state.active & ~is_eos & (length < state.budget)
  new = state.replace(step=state.step + 1, cache=cache, tokens=tokens, logprobs=logprobs, entropy=entropy,
                      length=length, pending=jnp.where(state.active, tok, state.pending), active=active)
  if not sc.track_entropy:
    return new
  new, marked, start = _window_update(new, state.active, sc.window, consts.tau)
  if n_branch == 0:
    return new
  return fork(new, marked, start, group=group, n_roots=sc.n, n_branch=n_branch, window=sc.window)


@functools.partial(jax.jit, static_argnums=(0, 2))
def decode_weights(config: ModelConfig, params, lora_merged: bool = True) -> tuple[dict, tuple]:
  """What decoding reads, in the compute dtype, made once per `generate` call: the embedding, final
  norm and LM head, and the decoder's weights as L per-layer trees (each its own buffer; see
  `models.decode_step` for why unstacked). Casting here instead of per step keeps fp32 master
  weights from being converted at every decode step, and halves this copy under bf16. A LoRA
  policy's adapters are merged into these per-layer copies (`lora_merged`; decode then runs
  `decode_config`) or kept beside them."""
  dtype = config.compute_dtype
  top = {k: v for k, v in params.items() if k not in ("decoder", "visual", lora.POLICY_KEY)}
  cast = lambda tree: jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)
  layers = unstack_layers(params)
  if config.lora.enabled and lora_merged:
    layers = tuple(lora.merge_into(lora.base_params(l), lora.adapters(l), config.lora.scale, n_lead=0)
                   for l in layers)
  return cast(top), cast(layers)


DECODE_WEIGHTS_SHARE = 0.25  # of a device's memory that whole decode weights may take


def decode_weight_layout(weights: tuple, hbm_bytes: int | None) -> tuple:
  """Shardings for `decode_weights`: whole on every device (over `tensor` only) when that takes at most
  DECODE_WEIGHTS_SHARE of `hbm_bytes` (None: unknown, as on CPU), else as they are. FSDP-sharded
  weights would be all-gathered at every decode step (memory plans count it: `collective_bytes`); held
  whole they cost memory once per `generate` call instead (at 7B in bf16, 14 GiB on every device)."""
  whole = sharding.without_batch_axes(weights)
  if hbm_bytes and sharding.device_bytes_of(weights, whole) > DECODE_WEIGHTS_SHARE * hbm_bytes:
    return jax.tree.map(lambda x: x.sharding, weights)
  return whole


def device_memory() -> int | None:
  """The first device's memory in bytes, if its backend says (TPU and GPU do, CPU does not)."""
  stats = jax.local_devices()[0].memory_stats() or {}  # another process's devices have no stats here
  return stats.get("bytes_limit")


def decode_config(config: ModelConfig, sc: SamplingConfig) -> ModelConfig:
  """The model config decode steps run: without adapters when they are merged into the weights."""
  return lora.base_config(config) if sc.lora_merged else config


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(4,))
def one_step(config: ModelConfig, sc: SamplingConfig, branching: bool, weights: tuple, state: DecodeState, key):
  """A single decode step of `state` as its own program: what memory plans compile to read one step's
  cost (XLA's cost analysis counts a loop body once, whatever the loop's trip count)."""
  n_branch = sc.branches(branching)
  consts = StepConsts(key=key, tau=jnp.float32(1.0 if branching else jnp.inf))
  return decode_one(decode_config(config, sc), sc, sc.n + n_branch, n_branch, weights, consts, state)


def results(state: DecodeState, pad_id: int) -> dict:
  """The rollout record's arrays of every slot of `state` (`Rollouts`' fields but `prompt_index`)."""
  n_max = state.tokens.shape[1]
  tokens = jnp.where(jnp.arange(n_max)[None, :] < state.length[:, None], state.tokens, pad_id)
  return dict(tokens=tokens, logprobs=state.logprobs, entropy=state.entropy, window_entropy=state.window_entropy,
              window_valid=state.window_valid, hwe=state.hwe, length=state.length, parent=state.parent,
              fork_pos=state.fork_pos)


def prompt_ends(prompts: ModelInputs) -> tuple[jax.Array, jax.Array]:
  """(last token [P], its M-RoPE position [P]) of left-aligned prompts."""
  return prompts.ids[:, -1], prompts.positions[0, :, -1]


@functools.partial(jax.jit, static_argnums=(0, 1))
def rollout_chunk(config: ModelConfig, sc: SamplingConfig, params, weights: tuple, prompts: ModelInputs, key, tau, *,
                  prompt_offset, budget):
  """One compiled rollout of a chunk of P prompts over a dense cache (`rollout.kv_cache="dense"`): prefill
  (vision tower included), then the decode loop over P * (n + branches) slots. `weights`:
  `decode_weights(config, params, sc.lora_merged)`; `prompts`: left-aligned prompts (`chunks.make_chunks`).
  `tau` None: no marks and no branching (a static choice); `prompt_offset` [] int32: the global index of
  the chunk's first prompt (for the random streams); `budget` [P] int32: response tokens per prompt.
  Returns `results` of this chunk's slots, `parent` indexing them."""
  model = Qwen25VL(config)
  ids, mask = prompts.ids, prompts.mask
  n_prompts, t_prompt = ids.shape
  n_branch = sc.branches(tau is not None)
  group = sc.n + n_branch
  s_slots, n_max = n_prompts * group, sc.max_new_tokens
  prompt_of = jnp.arange(s_slots) // group

  k, v = model.apply(lora.variables(config, params), prompts, method=Qwen25VL.prefill)  # [L, P, T, K, D]
  cache_dtype = jnp.dtype(sc.cache_dtype or config.dtype)
  spec = ("cache_batch", None, "cache_heads", None)
  def to_slots(x):  # [L, P, T, K, D] -> L x [S, C, K, D]
    x = jnp.take(x.astype(cache_dtype), prompt_of, axis=1)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n_max), (0, 0), (0, 0)))
    return tuple(nn.with_logical_constraint(x[i], spec) for i in range(x.shape[0]))

  prompt_valid = jnp.pad(jnp.take(mask, prompt_of, axis=0)[:, :t_prompt - 1].astype(bool), ((0, 0), (0, n_max + 1)))
  cache = DenseCache(k=to_slots(k), v=to_slots(v), prompt_valid=prompt_valid, t_prompt=t_prompt)
  state = initial_slots(cache, n_prompts, group, n_max, sc.pad_id)
  state = admit_slots(state, jnp.arange(n_prompts), prompt_offset + jnp.arange(n_prompts), *prompt_ends(prompts),
                      budget, n_roots=sc.n, pad_id=sc.pad_id)
  consts = StepConsts(key=key, tau=jnp.float32(jnp.inf) if tau is None else jnp.asarray(tau, jnp.float32))
  body = functools.partial(decode_one, decode_config(config, sc), sc, group, n_branch, weights, consts)
  max_steps = n_max * (1 + n_branch)  # every fork restarts at most n_max steps
  state = jax.lax.while_loop(lambda s: (s.step < max_steps) & jnp.any(s.active), body, state)
  return results(state, sc.pad_id)
