"""The train state pytree: everything a resumed run needs to continue step for step.

Parameters split by top-level name into a trainable and a frozen part (e.g. the vision tower during
SFT): the optimizer sees the trainable part only, so a frozen subtree has no optimizer state (and,
in `train/update.py`, no gradient or accumulator buffers).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import struct


def split_params(params: dict, frozen: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees of `params` by top-level name; works on arrays and on abstract shapes."""
  unknown = set(frozen) - set(params)
  if unknown:
    raise ValueError(f"frozen={tuple(frozen)}: {sorted(unknown)} not among the parameters' top-level names "
                     f"{sorted(params)}")
  return ({k: v for k, v in params.items() if k not in frozen}, {k: v for k, v in params.items() if k in frozen})


def merge_params(trainable: dict, frozen: dict) -> dict:
  return {**trainable, **frozen}


@struct.dataclass
class TrainState:
  """step; policy params (all of them); optimizer state (trainable part only); RNG key; running statistics.

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
  def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array,
             frozen: Sequence[str] = ()) -> "TrainState":
    """Optimizer state for the parameters outside the `frozen` top-level names only."""
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(split_params(params, frozen)[0]),
               rng=rng, stats=initial_stats(), skipped=jnp.zeros((), jnp.int32))


def initial_stats() -> dict[str, jax.Array]:
  """tau_high of the last batch (its EMA when `tau_ema` > 0) and the per-bin target EMA of
  `target_mode="ema"`; NaN means "not set yet" (the first batch is a warm-up without branching)."""
  return {"tau_high": jnp.full((), jnp.nan, jnp.float32), "target_ema": jnp.full((3,), jnp.nan, jnp.float32)}
