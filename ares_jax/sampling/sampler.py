"""The compiled rollout program of one chunk of prompts: one prefill, then a `lax.while_loop` of cached
decode steps that samples, scores (log-prob, exact entropy, window entropy, HWE marks) and forks.

Layout: every prompt owns G = n + max_branches consecutive trajectory slots; roots first, branch
slots after them, filled in order. The KV cache is position-indexed, L arrays [S, C, K, D] (one per
layer, so a decode step reads and updates each in place) with C = T + max_new_tokens: slots 0..T-2
hold the prompt but its last token, and the token fed at step k of a trajectory (the last prompt
token, then each sampled token) is written to T-1+k. So rewinding a trajectory to response position t
is just setting its length to t.

Decode runs the layers unrolled over per-layer weight buffers in the compute dtype (`decode_weights`,
made once per `generate` call): the price is one extra copy of the decoder weights while sampling,
the gain 2.06x per decode step on an H100 (~1.8B, bf16, batch 64; benchmarks/README.md). The host
side (chunking, input preparation, results) is `sampling.chunks`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs, Qwen25VL, decode_step, unstack_layers
from ares_jax.sampling import distributions as dist
from ares_jax.sampling.branching import fork
from ares_jax.sampling.config import SamplingConfig


@struct.dataclass
class DecodeState:
  """Everything the decode loop carries (a pytree; S slots, N = max_new_tokens, C cache length)."""

  step: jax.Array  # [] int32
  cache_k: tuple[jax.Array, ...]  # L x [S, C, K, D]
  cache_v: tuple[jax.Array, ...]
  tokens: jax.Array  # [S, N] int32
  logprobs: jax.Array  # [S, N] float32
  entropy: jax.Array  # [S, N] float32
  window_entropy: jax.Array  # [S, N] float32
  window_valid: jax.Array  # [S, N] bool
  hwe: jax.Array  # [S, N] bool
  length: jax.Array  # [S] int32 response tokens so far
  pending: jax.Array  # [S] int32 token fed at the next step
  active: jax.Array  # [S] bool
  parent: jax.Array  # [S] int32
  fork_pos: jax.Array  # [S] int32
  next_fork: jax.Array  # [S] int32 earliest window start this slot may fork at
  branches: jax.Array  # [P] int32 forks taken per prompt


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
class ChunkConsts:
  """What every decode step of one chunk reads and never changes (S slots, T prompt width)."""

  key: jax.Array  # the call's key; each slot draws from fold_in(key, global prompt, slot in group, length)
  tau: jax.Array  # [] tau_high (inf: no marks, no branching)
  slot_prompt: jax.Array  # [S] int32 global prompt index of each slot (chunk offset included)
  slot_in_group: jax.Array  # [S] int32
  prompt_valid: jax.Array  # [S, C] bool: cache columns holding real prompt tokens
  first_token: jax.Array  # [S] int32 the prompt's last token (fed again by a child rewound to 0)
  last_pos: jax.Array  # [S] int32 M-RoPE position of the prompt's last token


def _write_cache(cache: jax.Array, new: jax.Array, at: jax.Array) -> jax.Array:
  """cache [S, C, K, D], new [S, K, D], at [S]: row s gets new[s] at column at[s]. A per-row dynamic
  update (a scatter with a batch dimension) stays local when the slot axis is sharded; indexing with
  (arange(S), at) would be an unstructured scatter the partitioner may replicate."""
  upd = lambda c, x, i: jax.lax.dynamic_update_slice_in_dim(c, x[None].astype(c.dtype), i, axis=0)
  return jax.vmap(upd)(cache, new, at)


def _step(config: ModelConfig, sc: SamplingConfig, group: int, n_branch: int, t_prompt: int, weights: tuple,
          consts: ChunkConsts, state: DecodeState) -> DecodeState:
  top, layers = weights  # `decode_weights`
  s_slots, n_max = state.tokens.shape
  c = state.cache_k[0].shape[1]
  write = t_prompt - 1 + state.length  # cache slot of the token fed now
  cols = jnp.arange(c)[None, :]
  cache_mask = consts.prompt_valid | ((cols >= t_prompt - 1) & (cols < write[:, None]))
  logits, (k_new, v_new) = decode_step(config, top, layers, state.pending, consts.last_pos + state.length,
                                       state.cache_k, state.cache_v, cache_mask)
  cache_k = tuple(_write_cache(ck, x, write) for ck, x in zip(state.cache_k, k_new))
  cache_v = tuple(_write_cache(cv, x, write) for cv, x in zip(state.cache_v, v_new))

  log_probs = dist.scaled_log_probs(logits, sc.temperature)
  # Streams keyed by (prompt, slot, position), not by row: the same seed samples the same tokens
  # whatever the chunk size or the other prompts of the call.
  fold = lambda p, j, n: jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(consts.key, p), j), n)
  keys = jax.vmap(fold)(consts.slot_prompt, consts.slot_in_group, state.length)
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
  active = state.active & ~is_eos & (length < n_max)
  new = state.replace(step=state.step + 1, cache_k=cache_k, cache_v=cache_v, tokens=tokens, logprobs=logprobs,
                      entropy=entropy, length=length, pending=jnp.where(state.active, tok, state.pending),
                      active=active)
  if not sc.track_entropy:
    return new
  new, marked, start = _window_update(new, state.active, sc.window, consts.tau)
  if n_branch == 0:
    return new
  return fork(new, marked, start, group=group, n_roots=sc.n, n_branch=n_branch, window=sc.window,
              first_token=consts.first_token)


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


def decode_config(config: ModelConfig, sc: SamplingConfig) -> ModelConfig:
  """The model config decode steps run: without adapters when they are merged into the weights."""
  return lora.base_config(config) if sc.lora_merged else config


@functools.partial(jax.jit, static_argnums=(0, 1))
def rollout_chunk(config: ModelConfig, sc: SamplingConfig, params, weights: tuple, prompts: ModelInputs, key, tau,
                  prompt_offset):
  """One compiled rollout of a chunk of P prompts: prefill (vision tower included), then the decode
  loop over P * (n + branches) slots. `weights`: `decode_weights(config, params, sc.lora_merged)`;
  `prompts`: left-aligned prompts (`chunks.make_chunks`). `tau` None: no marks and no branching (a static choice);
  `prompt_offset` [] int32: the global index of the chunk's first prompt (for the random streams).
  Returns a dict of device arrays (see `Rollouts`), `parent` indexing this chunk's slots."""
  model = Qwen25VL(config)
  ids, positions, mask = prompts.ids, prompts.positions, prompts.mask
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

  first_token = jnp.take(ids[:, -1], prompt_of)
  consts = ChunkConsts(
      key=key, tau=jnp.float32(jnp.inf) if tau is None else jnp.asarray(tau, jnp.float32),
      slot_prompt=(prompt_offset + prompt_of).astype(jnp.int32),
      slot_in_group=(jnp.arange(s_slots) % group).astype(jnp.int32),
      prompt_valid=jnp.pad(jnp.take(mask, prompt_of, axis=0)[:, :t_prompt - 1].astype(bool), ((0, 0), (0, n_max + 1))),
      first_token=first_token, last_pos=jnp.take(positions[0, :, -1], prompt_of))
  zeros = jnp.zeros((s_slots, n_max), jnp.float32)
  state = DecodeState(
      step=jnp.int32(0), cache_k=to_slots(k), cache_v=to_slots(v),
      tokens=jnp.full((s_slots, n_max), sc.pad_id, jnp.int32), logprobs=zeros, entropy=zeros,
      window_entropy=zeros, window_valid=zeros.astype(bool), hwe=zeros.astype(bool),
      length=jnp.zeros((s_slots,), jnp.int32), pending=first_token, active=consts.slot_in_group < sc.n,
      parent=jnp.full((s_slots,), -1, jnp.int32), fork_pos=jnp.full((s_slots,), -1, jnp.int32),
      next_fork=jnp.zeros((s_slots,), jnp.int32), branches=jnp.zeros((n_prompts,), jnp.int32))
  body = functools.partial(_step, decode_config(config, sc), sc, group, n_branch, t_prompt, weights, consts)
  max_steps = n_max * (1 + n_branch)  # every fork restarts at most n_max steps
  state = jax.lax.while_loop(lambda s: (s.step < max_steps) & jnp.any(s.active), body, state)
  tokens = jnp.where(jnp.arange(n_max)[None, :] < state.length[:, None], state.tokens, sc.pad_id)
  return dict(tokens=tokens, logprobs=state.logprobs, entropy=state.entropy,
              window_entropy=state.window_entropy, window_valid=state.window_valid, hwe=state.hwe,
              length=state.length, prompt_index=prompt_of.astype(jnp.int32), parent=state.parent,
              fork_pos=state.fork_pos)
