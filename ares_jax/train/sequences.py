"""Teacher-forced scoring of prompt + response rows.

`token_logprobs` / `score_tokens` score any row layout of `train.packing` (each token by the logits of the
column its `src` names). `pack` builds the padded layout, [left padding | prompt | response | right padding]
with the prompt region `P` wide and the response region `R` wide (both bucketed), where response token j
of every row sits at column P + j and is scored by the logits at column P + j - 1 (`response_logprobs`,
`score`: what tests and benchmarks compare against).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ares_jax.data.batching import Prompt, prompt_batch, round_up
from ares_jax.models import lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs, Qwen25VL, media_positions, media_vision


@dataclasses.dataclass
class Packed:
  """Host arrays for one forward over prompt + response rows."""

  inputs: ModelInputs  # ids / mask [B, P + R], positions [3, B, P + R], vision
  prompt_width: int  # P


def pack(config: ModelConfig, prompts: Sequence[Prompt], responses: Sequence[np.ndarray], pad_id: int,
         prompt_bucket: int = 64, response_width: int | None = None, min_windows: int = 1) -> Packed:
  """Rows prompt_i + responses_i; `response_width` fixes R (default: the longest response, bucketed)."""
  batch = prompt_batch(prompts, pad_id, prompt_bucket)
  p_width = batch["input_ids"].shape[1]
  r_width = response_width or round_up(max(len(r) for r in responses), 16)
  b = len(prompts)
  resp = np.full((b, r_width), pad_id, np.int32)
  rmask = np.zeros((b, r_width), np.int32)
  for i, r in enumerate(responses):
    resp[i, :len(r)] = r
    rmask[i, :len(r)] = 1
  ids = np.concatenate([batch["input_ids"], resp], axis=1)
  mask = np.concatenate([batch["attention_mask"], rmask], axis=1)
  vision = media_vision(config, batch, min_windows)
  positions = media_positions(config, ids, mask, batch)
  return Packed(ModelInputs(ids, positions, mask, vision), p_width)


def scored_logits(model_config: ModelConfig, params, inputs: ModelInputs, dropout_key=None) -> jax.Array:
  """Logits of a policy tree; `dropout_key` turns LoRA dropout on (training only)."""
  rngs = None if dropout_key is None else {"dropout": dropout_key}
  return Qwen25VL(model_config).apply(lora.variables(model_config, params), inputs, rngs=rngs)


def response_logprobs(model_config: ModelConfig, params, inputs: ModelInputs, prompt_width: int,
                      temperature: float = 1.0, with_entropy: bool = False, dropout_key=None):
  """log p(response token j | prefix) [B, R] under softmax(logits / temperature), and optionally the
  full-vocabulary entropy [B, R] of those distributions. Traceable (use inside jit / grad)."""
  logits = scored_logits(model_config, params, inputs, dropout_key)
  logits = logits[:, prompt_width - 1:-1].astype(jnp.float32) / (temperature if temperature > 0 else 1.0)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  targets = inputs.ids[:, prompt_width:]
  logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  if not with_entropy:
    return logp
  return logp, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)


def token_logprobs(model_config: ModelConfig, params, inputs: ModelInputs, src: jax.Array, temperature: float = 1.0,
                   dropout_key=None) -> jax.Array:
  """log p(token at column t | what precedes it) [B, T] under softmax(logits / temperature), read from the
  logits of column `src[b, t]` (`packing.Rows.src`); meaningless where nothing is scored. Traceable.

  Only the scored tokens' logits and each column's log-sum-exp are read: no log-softmax over [B, T, V] is
  materialised beside the logits."""
  logits = scored_logits(model_config, params, inputs, dropout_key).astype(jnp.float32)
  logits = logits / (temperature if temperature > 0 else 1.0)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  rows = jnp.arange(src.shape[0])[:, None]
  return logits[rows, src, inputs.ids] - lse[rows, src]


@functools.partial(jax.jit, static_argnums=(0, 4))
def score_tokens(model_config: ModelConfig, params, inputs: ModelInputs, src: jax.Array, temperature: float):
  """Jitted `token_logprobs` (old-policy and reference log-probs of update rows)."""
  return token_logprobs(model_config, params, inputs, src, temperature)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def score(model_config: ModelConfig, params, inputs: ModelInputs, prompt_width: int, temperature: float):
  """Jitted `response_logprobs` (old-policy and reference log-probs)."""
  return response_logprobs(model_config, params, inputs, prompt_width, temperature)
