"""One optimizer update from several micro-batches (gradient accumulation), with a non-finite guard.

Micro-batches are run one at a time by a jitted value-and-grad: their shapes may differ (image
buckets, response widths), which a single scanned program could not take. Each micro-batch carries
a weight so that the weighted sum of micro-batch losses is the mini-batch loss (e.g. its share of
the mini-batch's loss tokens for a token mean). A non-finite loss or gradient skips the update:
parameters and optimizer state are untouched and `TrainState.skipped` counts it.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import optax

from ares_jax.train.state import TrainState

LossFn = Callable[[Any, dict, Hashable], tuple[jax.Array, dict]]  # (params, arrays, static) -> (loss, metrics)


def frozen_mask(params: Any, frozen_prefixes: Sequence[str]) -> Any:
  """True for trainable leaves; leaves under a frozen top-level name (e.g. 'visual') are False."""
  return {k: jax.tree.map(lambda _: k not in frozen_prefixes, v) for k, v in params.items()}


def freeze(tx: optax.GradientTransformation, params: Any, frozen_prefixes: Sequence[str]):
  """Wraps `tx` so that frozen subtrees get zero updates (and no optimizer state)."""
  if not frozen_prefixes:
    return tx
  labels = jax.tree.map(lambda t: "train" if t else "freeze", frozen_mask(params, frozen_prefixes))
  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


class Updater:
  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation):
    self.tx = tx
    self._grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(2,))
    self._apply = jax.jit(self._apply_impl, donate_argnums=(0,))

  def _apply_impl(self, state: TrainState, grads, loss):
    ok = jnp.isfinite(loss) & jax.tree.reduce(lambda a, g: a & jnp.all(jnp.isfinite(g)), grads, jnp.bool_(True))
    grads = jax.tree.map(lambda g: jnp.where(ok, g, 0.0), grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return state.replace(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                         skipped=state.skipped + (~ok).astype(jnp.int32)), ok, optax.tree.norm(grads)

  def update(self, state: TrainState, micro_batches: Sequence[tuple[dict, Hashable, float]]):
    """micro_batches: (arrays, static spec, weight). Returns (new state, metrics dict of floats)."""
    total = None
    loss_sum = 0.0
    metrics: dict[str, float] = {}
    for arrays, static, weight in micro_batches:
      (loss, m), grads = self._grad(state.params, arrays, static)
      grads = jax.tree.map(lambda g: g * weight, grads)
      total = grads if total is None else jax.tree.map(jnp.add, total, grads)
      loss_sum = loss_sum + loss * weight
      for k, v in m.items():
        metrics[k] = metrics.get(k, 0.0) + float(v) * weight
    state, ok, gnorm = self._apply(state, total, jnp.asarray(loss_sum, jnp.float32))
    metrics.update(loss=float(loss_sum), grad_norm=float(gnorm), update_skipped=float(not bool(ok)))
    return state, metrics
