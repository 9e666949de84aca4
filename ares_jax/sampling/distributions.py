"""Per-step quantities of the next-token distribution, computed from logits already in hand.

H_t (docs/design.md §5.1) is the exact full-vocabulary entropy of the temperature-scaled distribution;
the log-prob of the sampled token is taken under the same (unfiltered) distribution, which is
what a teacher-forced recomputation with `models.forward` gives. top-k / top-p only restrict
where the sample is drawn from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def scaled_log_probs(logits: jax.Array, temperature: float) -> jax.Array:
  """log softmax(logits / T) over the full vocabulary, float32. T = 0 (greedy) scores at T = 1."""
  t = temperature if temperature > 0 else 1.0
  return jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)


def token_entropy(log_probs: jax.Array) -> jax.Array:
  """H_t = -sum_j p_tj log p_tj over the last axis."""
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def restrict_support(log_probs: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets log-probs outside the top-k / nucleus (top-p) support to -inf. 0 / 1.0 switch them off.

  The nucleus is the smallest set of most likely tokens whose mass reaches top_p (the most likely
  token is always kept).
  """
  neg = jnp.finfo(log_probs.dtype).min
  if top_k and top_k < log_probs.shape[-1]:
    kth = jax.lax.top_k(log_probs, top_k)[0][..., -1:]
    log_probs = jnp.where(log_probs >= kth, log_probs, neg)
  if top_p < 1.0:
    sorted_lp = jnp.sort(log_probs, axis=-1)[..., ::-1]
    p = jnp.exp(sorted_lp)
    mass_before = jnp.cumsum(p, axis=-1) - p
    keep = mass_before < top_p * jnp.sum(p, axis=-1, keepdims=True)
    threshold = jnp.min(jnp.where(keep, sorted_lp, jnp.inf), axis=-1, keepdims=True)
    log_probs = jnp.where(log_probs >= threshold, log_probs, neg)
  return log_probs


def sample(key: jax.Array, log_probs: jax.Array, temperature: float, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """One token per row of `log_probs` [..., V]; argmax when temperature == 0."""
  if temperature <= 0:
    return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, restrict_support(log_probs, top_k, top_p), axis=-1).astype(jnp.int32)
