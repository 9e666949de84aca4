"""One optimizer update from several micro-batches (gradient accumulation), as two compiled programs.

    updater = Updater(loss_fn, tx, params, frozen=("visual",))
    state = updater.init_state(params, rng)
    state, metrics = updater.update(state, [MicroBatch(batch, settings, weight), ...])

`loss_fn(params, batch, settings, dropout_key) -> (loss, metrics dict of scalars)`; `batch` is a pytree of
arrays (a dataclass such as `aepo.step.AepoBatch`), `settings` a hashable (frozen dataclass) static
argument, `dropout_key` None or a key for LoRA dropout (`dropout=True`). `params` given to the
constructor may be arrays or `jax.ShapeDtypeStruct`s: their NamedShardings (if they span a mesh) become
the shardings of the gradients, the accumulator and the updated parameters, and their mesh the one the
model's logical-axis activation constraints refer to.

The compiled programs are attributes, so a memory planner can lower them ahead of time with
ShapeDtypeStructs that carry NamedShardings:

    updater.micro_step(params, accum, batch, weight, settings, dropout_key=None)
        -> (accum, weight * loss, {k: weight * v})
        params: the whole tree (frozen part included); accum: shaped like `updater.trainable(params)`,
        DONATED; weight: float32 scalar, traced (no recompiles per weight); settings: static.
    updater.apply(state, accum, loss) -> (state, ok, grad_norm)
        state (TrainState) DONATED; loss: float32 scalar, the sum of the micro-steps' weighted losses;
        ok: bool scalar; grad_norm: float32 scalar (0 when skipped). The accumulator is not donated:
        the state's buffers already take every output, so XLA could not reuse it (jax warns at every
        lowering) and the peak memory is the same; `update` drops it right after the apply.
    updater.init_accum(params) -> zeros of the trainable subtree, in the parameters' shardings
    updater.trainable(params) -> the trainable subtree (of arrays or of abstract shapes)

Why per micro-batch programs and not one scanned program: micro-batches may differ in shape (image
buckets, response widths). Why gradients only for the trainable subtree: a frozen vision tower then
has no gradient, accumulator or optimizer buffers. Why the accumulator is allocated per update (and
not kept between updates): it would otherwise hold a parameter-sized buffer through the rollouts.
A micro-batch's weight makes the weighted sum of micro-batch losses the mini-batch loss (e.g. its
share of the mini-batch's loss tokens for a token mean). A non-finite loss or gradient global norm
(any NaN or inf, or an overflowing norm) skips the update: parameters and optimizer state are
untouched and `TrainState.skipped` counts it.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax import sharding
from ares_jax.train.state import TrainState, merge_params, split_params

# (params, batch, settings, dropout_key) -> (loss, metrics)
LossFn = Callable[[Any, Any, Hashable, "jax.Array | None"], tuple[jax.Array, dict]]


class MicroBatch(NamedTuple):
  batch: Any  # a pytree of host or device arrays: one micro-batch
  settings: Hashable  # static loss settings (a frozen dataclass)
  weight: float  # its share of the mini-batch loss


def _names(path) -> tuple[str, ...]:
  """A pytree path as plain names (dict keys, dataclass fields, sequence indices)."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class Updater:
  """The micro-step and apply programs of one loss and optimizer (see the module docstring)."""

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, params: Any, frozen: Sequence[str] = (),
               dropout: bool = False):
    self.loss_fn = loss_fn
    self.tx = tx
    self.frozen = tuple(frozen)
    self.dropout = dropout  # give each micro-batch a dropout key (LoRA dropout), drawn from state.rng
    self.mesh = sharding.mesh_of(params)
    trainable = self.trainable(params)  # checks the frozen names
    self.shardings = None if self.mesh is None else jax.tree.map(self._sharding_of, trainable)
    self.micro_step = jax.jit(self._micro_step, donate_argnums=(1,), static_argnums=(4,))
    self.apply = jax.jit(self._apply, donate_argnums=(0,))

  def _sharding_of(self, leaf) -> NamedSharding:
    s = getattr(leaf, "sharding", None)
    return s if isinstance(s, NamedSharding) and s.mesh == self.mesh else NamedSharding(self.mesh, PartitionSpec())

  def trainable(self, params: Any) -> Any:
    return split_params(params, self.frozen)[0]

  def init_state(self, params: Any, rng: jax.Array) -> TrainState:
    """A fresh TrainState, optimizer state for the trainable part only. Concrete leaves are committed
    where the parameters live: an uncommitted input keys a compiled program of its own, so the first
    update's (committed) outputs would otherwise compile both programs a second time."""
    state = TrainState.create(params, self.tx, rng, self.frozen)
    first = jax.tree.leaves(params)[0]
    if isinstance(first, jax.core.Tracer) or not isinstance(first, jax.Array):
      return state  # abstract: under eval_shape, or shapes for a memory plan
    if isinstance(first.sharding, NamedSharding):
      return sharding.replicate_rest(state, first.sharding.mesh)
    return jax.device_put(state, first.sharding)

  def abstract_state(self, params: Any, mesh: jax.sharding.Mesh) -> TrainState:
    """The train state as `init_state` + `sharding.replicate_rest` make it, as `jax.ShapeDtypeStruct`s with
    their shardings and no memory: optimizer moments sharded like the parameter they belong to (as
    `tx.init` on sharded arrays makes them), counters and keys replicated. What a checkpoint restores onto
    and what memory plans compile against. `params` may be concrete or abstract."""
    shapes = jax.eval_shape(self.init_state, params, jax.random.key(0))
    by_path = {_names(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    rep = NamedSharding(mesh, PartitionSpec())

    def place(path, x):
      names = _names(path)
      for i in range(len(names)):
        s = by_path.get(names[i:])
        if s is not None and len(getattr(s, "spec", ())) <= x.ndim:
          return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
    return jax.tree_util.tree_map_with_path(place, shapes)

  def init_accum(self, params: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), self.trainable(params))

  def _constrain(self, tree: Any) -> Any:
    """Keeps gradient-shaped trees in the parameters' shardings (unconstrained, XLA replicates them)."""
    return tree if self.shardings is None else jax.lax.with_sharding_constraint(tree, self.shardings)

  def _micro_step(self, params, accum, batch, weight, settings, dropout_key=None):
    trainable, frozen = split_params(params, self.frozen)
    loss_of = lambda t: self.loss_fn(merge_params(t, frozen), batch, settings, dropout_key)
    if self.mesh is None:
      (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    else:  # the model's activation constraints name logical axes of this mesh
      with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    grads = self._constrain(grads)
    weight = jnp.asarray(weight, jnp.float32)
    accum = self._constrain(jax.tree.map(lambda a, g: (a + weight * g).astype(a.dtype), accum, grads))
    return accum, weight * loss, {k: weight * v for k, v in metrics.items()}

  def _apply(self, state: TrainState, accum, loss):
    trainable, frozen = split_params(state.params, self.frozen)
    grad_norm = optax.tree.norm(accum)  # the same reduction as the clip's: XLA computes it once
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def step(carry):
      params, opt_state = carry
      updates, opt_state = self.tx.update(accum, opt_state, params)
      return self._constrain(optax.apply_updates(params, updates)), opt_state

    # A cond, not `where(ok, new, old)`: with donated buffers updated in place, `where` needs the old
    # values after they are overwritten, and XLA copies every parameter and moment first (measured on
    # CPU: 67 copies, 1.7x the apply's time); the cond's skip branch just passes the buffers through.
    params, opt_state = jax.lax.cond(ok, step, lambda carry: carry, (trainable, state.opt_state))
    return (state.replace(params=merge_params(params, frozen), opt_state=opt_state,
                          skipped=state.skipped + (~ok).astype(jnp.int32)),
            ok, jnp.where(ok, grad_norm, 0.0))

  def update(self, state: TrainState, micro_batches: Sequence[MicroBatch]) -> tuple[TrainState, dict[str, float]]:
    """Accumulates the micro-batches' weighted gradients, then applies them. Returns (new state, metrics
    dict of floats: the loss function's metrics weighted like the loss, loss, grad_norm, update_skipped)."""
    if not micro_batches:
      raise ValueError("Updater.update: no micro-batch")
    accum = self.init_accum(state.params)
    loss, metrics = None, None
    keys = [None] * len(micro_batches)
    if self.dropout:  # state.rng moves on every update, so a resumed run draws the same masks
      rng, *keys = jax.random.split(state.rng, len(micro_batches) + 1)
      state = state.replace(rng=rng)
    for (batch, settings, weight), key in zip(micro_batches, keys):  # dispatched asynchronously: no host sync
      accum, part, m = self.micro_step(state.params, accum, batch, np.float32(weight), settings, key)
      loss = part if loss is None else loss + part
      metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
    state, ok, grad_norm = self.apply(state, accum, loss)
    del accum  # freed as soon as the apply has run
    host = sharding.to_host({"metrics": metrics, "loss": loss, "grad_norm": grad_norm, "ok": ok})
    out = {k: float(v) for k, v in host["metrics"].items()}
    out.update(loss=float(host["loss"]), grad_norm=float(host["grad_norm"]), update_skipped=float(not host["ok"]))
    return state, out
