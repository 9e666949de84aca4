"""The train state pytree: everything a resumed run needs to continue step for step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


@struct.dataclass
class TrainState:
  """step; policy params; optimizer state; RNG key; running algorithm statistics.

  `stats` holds the EMA state of AEPO (tau_high EMA, per-bin target EMA, whether they are set) so
  that `target_mode="ema"` and `tau_ema` resume exactly; `skipped` counts updates dropped for a
  non-finite loss or gradient.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  stats: dict[str, jax.Array]
  skipped: jax.Array

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng,
               stats=initial_stats(), skipped=jnp.zeros((), jnp.int32))


def initial_stats() -> dict[str, jax.Array]:
  """tau_high of the last batch (its EMA when `tau_ema` > 0) and the per-bin target EMA of
  `target_mode="ema"`; NaN means "not set yet" (the first batch is a warm-up without branching)."""
  return {"tau_high": jnp.full((), jnp.nan, jnp.float32), "target_ema": jnp.full((3,), jnp.nan, jnp.float32)}
