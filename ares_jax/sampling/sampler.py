"""The compiled rollout engine: one prefill, then a `lax.while_loop` of cached decode steps that
samples, scores (log-prob, exact entropy, window entropy, HWE marks) and forks trajectories.

Layout: every prompt owns G = n + max_branches consecutive trajectory slots; roots first, branch
slots after them, filled in order. The KV cache is position-indexed, L arrays [S, C, K, D] (one per
layer, so a decode step reads and updates each in place) with C = T + max_new_tokens: slots 0..T-2
hold the prompt but its last token, and the token fed at step k of a trajectory (the last prompt
token, then each sampled token) is written to T-1+k. So rewinding a trajectory to response position t
is just setting its length to t.

Decode runs the layers unrolled over per-layer weight buffers (`models.unstack_layers`, made once per
call): the price is one extra copy of the decoder weights while sampling, the gain 2.06x per decode
step on an H100 (~1.8B, bf16, batch 64; benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from ares_jax import sharding
from ares_jax.models import positions as pos_lib
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import Qwen25VL, check_inputs, decode_step, prepare_vision, unstack_layers
from ares_jax.sampling import distributions as dist
from ares_jax.sampling.branching import fork
from ares_jax.sampling.config import Rollouts, SamplingConfig


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


def _left_align(ids: np.ndarray, mask: np.ndarray, bucket: int, pad_id: int):
  """Moves every row's tokens to the right end and pads on the left to a multiple of `bucket`."""
  p, t = ids.shape
  width = -(-t // bucket) * bucket
  out_ids = np.full((p, width), pad_id, np.int32)
  out_mask = np.zeros((p, width), np.int32)
  for i in range(p):
    row = ids[i][mask[i] > 0]
    if len(row) == 0:
      raise pos_lib.InputError(f"prompt {i} is empty (attention_mask all zero)")
    out_ids[i, width - len(row):] = row
    out_mask[i, width - len(row):] = 1
  return out_ids, out_mask


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


def _step(config: ModelConfig, params, layers, sc: SamplingConfig, group: int, n_roots: int, n_branch: int,
          key, tau, t_prompt: int, prompt_valid, first_token, last_pos, state: DecodeState) -> DecodeState:
  s_slots, n_max = state.tokens.shape
  c = state.cache_k[0].shape[1]
  write = t_prompt - 1 + state.length  # cache slot of the token fed now
  cols = jnp.arange(c)[None, :]
  cache_mask = prompt_valid | ((cols >= t_prompt - 1) & (cols < write[:, None]))
  logits, (k_new, v_new) = decode_step(config, params, layers, state.pending, last_pos + state.length,
                                       state.cache_k, state.cache_v, cache_mask)
  rows = jnp.arange(s_slots)
  put = lambda caches, new: tuple(c.at[rows, write].set(x.astype(c.dtype)) for c, x in zip(caches, new))
  cache_k, cache_v = put(state.cache_k, k_new), put(state.cache_v, v_new)

  log_probs = dist.scaled_log_probs(logits, sc.temperature)
  keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.fold_in(key, s), n))(rows, state.length)
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
  new, marked, start = _window_update(new, state.active, sc.window, tau)
  if n_branch == 0:
    return new
  return fork(new, marked, start, group=group, n_roots=n_roots, n_branch=n_branch, window=sc.window,
              first_token=first_token)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _generate(config: ModelConfig, sc: SamplingConfig, params, layers, ids, positions, mask, vision, key, tau):
  model = Qwen25VL(config)
  n_prompts, t_prompt = ids.shape
  n_branch = sc.branches(tau is not None)
  group = sc.n + n_branch
  s_slots, n_max = n_prompts * group, sc.max_new_tokens
  prompt_of = jnp.arange(s_slots) // group

  k, v = model.apply({"params": params}, ids, positions, mask, vision, method=Qwen25VL.prefill)  # [L,P,T,K,D]
  cache_dtype = jnp.dtype(sc.cache_dtype or config.dtype)
  spec = ("cache_batch", None, "cache_heads", None)
  def to_slots(x):  # [L, P, T, K, D] -> L x [S, C, K, D]
    x = jnp.take(x.astype(cache_dtype), prompt_of, axis=1)
    x = jnp.pad(x, ((0, 0), (0, 0), (0, n_max), (0, 0), (0, 0)))
    return tuple(nn.with_logical_constraint(x[i], spec) for i in range(x.shape[0]))

  prompt_valid = jnp.pad(jnp.take(mask, prompt_of, axis=0)[:, :t_prompt - 1].astype(bool),
                         ((0, 0), (0, n_max + 1)))
  first_token = jnp.take(ids[:, -1], prompt_of)
  last_pos = jnp.take(positions[0, :, -1], prompt_of)
  is_root = (jnp.arange(s_slots) % group) < sc.n
  zeros = jnp.zeros((s_slots, n_max), jnp.float32)
  state = DecodeState(
      step=jnp.int32(0), cache_k=to_slots(k), cache_v=to_slots(v),
      tokens=jnp.full((s_slots, n_max), sc.pad_id, jnp.int32), logprobs=zeros, entropy=zeros,
      window_entropy=zeros, window_valid=zeros.astype(bool), hwe=zeros.astype(bool),
      length=jnp.zeros((s_slots,), jnp.int32), pending=first_token, active=is_root,
      parent=jnp.full((s_slots,), -1, jnp.int32), fork_pos=jnp.full((s_slots,), -1, jnp.int32),
      next_fork=jnp.zeros((s_slots,), jnp.int32), branches=jnp.zeros((n_prompts,), jnp.int32))
  tau = jnp.float32(jnp.inf) if tau is None else jnp.asarray(tau, jnp.float32)
  body = functools.partial(_step, config, params, layers, sc, group, sc.n, n_branch, key, tau, t_prompt,
                           prompt_valid, first_token, last_pos)
  max_steps = n_max * (1 + n_branch)  # every fork restarts at most n_max steps
  state = jax.lax.while_loop(lambda s: (s.step < max_steps) & jnp.any(s.active), body, state)
  tokens = jnp.where(jnp.arange(n_max)[None, :] < state.length[:, None], state.tokens, sc.pad_id)
  return dict(tokens=tokens, logprobs=state.logprobs, entropy=state.entropy,
              window_entropy=state.window_entropy, window_valid=state.window_valid, hwe=state.hwe,
              length=state.length, prompt_index=prompt_of.astype(jnp.int32), parent=state.parent,
              fork_pos=state.fork_pos)


def generate(config: ModelConfig, params, batch: dict, sampling_config: SamplingConfig, key: jax.Array,
             tau_high: float | None = None) -> Rollouts:
  """Samples `n` trajectories per prompt (plus HWE branches when `tau_high` is given).

  `batch` is the processor output: input_ids, attention_mask (left or right padding), and
  optionally pixel_values / image_grid_thw. Deterministic for a given `key`.
  """
  sc = sampling_config
  if sc.suppress_ids is None:
    sc = dataclasses.replace(sc, suppress_ids=(config.image_token_id, config.video_token_id,
                                               config.vision_start_token_id, config.vision_end_token_id))
  ids = np.asarray(batch["input_ids"])
  mask = np.asarray(batch["attention_mask"])
  pixel_values, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
  check_inputs(config, ids, mask, pixel_values, grid)
  ids, mask = _left_align(ids, mask, sc.prompt_bucket, sc.pad_id)
  vision = None
  if pixel_values is not None and grid is not None:
    vision = prepare_vision(config, np.asarray(pixel_values), np.asarray(grid))
  positions, _ = pos_lib.mrope_positions(ids, mask, grid if vision else None, config)
  with sharding.mesh_context_of(params):
    out = _generate(config, sc, params, unstack_layers(params), ids, positions, mask, vision, key,
                    None if tau_high is None else np.float32(tau_high))
  return Rollouts(**{k: np.asarray(v) for k, v in sharding.to_host(out).items()})
