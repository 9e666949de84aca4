"""The compiled update path (train/update.py): accumulation, frozen subtrees, shardings, the non-finite
skip, ahead-of-time lowering; and the reference copy of the AEPO stage (train/aepo_step.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ares_jax import sharding
from ares_jax.aepo.step import reference_copy, reference_template
from ares_jax.train.update import MicroBatch, Updater

D, H, O = 16, 32, 4


@dataclasses.dataclass(frozen=True)
class Toy:
  """Static settings of the toy loss (a frozen dataclass, as the real losses use)."""

  scale: float = 1.0


def toy_loss(params, arrays, settings: Toy, dropout_key=None):
  """Token-mean squared error of a 2-layer net whose input is scaled by the 'visual' subtree."""
  x = arrays["x"] * params["visual"]["s"]
  h = jnp.tanh(x @ params["dense"]["w"] + params["dense"]["b"])
  err = ((h @ params["head"]["w"] - arrays["y"]) ** 2).sum(-1) * settings.scale
  mask = arrays["mask"]
  loss = (err * mask).sum() / jnp.maximum(mask.sum(), 1.0)
  return loss, {"err_max": err.max()}


def toy_params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"dense": {"w": jax.random.normal(k[0], (D, H)) * 0.3, "b": jnp.zeros((H,))},
          "head": {"w": jax.random.normal(k[1], (H, O)) * 0.3},
          "visual": {"s": 1.0 + 0.1 * jax.random.normal(k[2], (D,))}}


def toy_batch(n=12, seed=0):
  rng = np.random.default_rng(seed)
  mask = (rng.random(n) < 0.8).astype(np.float32)
  mask[0] = 1.0
  return {"x": rng.normal(size=(n, D)).astype(np.float32), "y": rng.normal(size=(n, O)).astype(np.float32),
          "mask": mask}


def split(batch, parts):
  """Micro-batches weighted by their share of the batch's loss tokens (the token mean's split)."""
  total = batch["mask"].sum()
  rows = np.array_split(np.arange(len(batch["mask"])), parts)
  return [MicroBatch({k: v[r] for k, v in batch.items()}, Toy(), float(batch["mask"][r].sum() / total))
          for r in rows]


def sharded_toy_params(mesh):
  specs = {"dense": {"w": P("fsdp", "tensor"), "b": P("tensor")}, "head": {"w": P("tensor", None)},
           "visual": {"s": P("fsdp")}}
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), toy_params(), specs)


def copy(tree):
  return jax.tree.map(jnp.copy, tree)


def tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-2))


def test_three_micro_batches_accumulate_to_the_gradient_of_one_big_batch():
  params, batch = toy_params(), toy_batch()
  updater = Updater(toy_loss, tx(), params)
  accum = updater.init_accum(params)
  for arrays, settings, weight in split(batch, 3):
    accum, _, _ = updater.micro_step(params, accum, arrays, np.float32(weight), settings)
  (_, _), big = jax.value_and_grad(toy_loss, has_aux=True)(params, batch, Toy())
  jax.tree.map(lambda a, g: np.testing.assert_allclose(a, g, rtol=1e-5, atol=1e-7), accum, big)
  assert updater.micro_step._cache_size() == 1  # the weight is traced: one program for every weight

  three = updater.update(updater.init_state(copy(params), jax.random.key(0)), split(batch, 3))
  one = updater.update(updater.init_state(copy(params), jax.random.key(0)), split(batch, 1))
  assert three[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-6)
  assert three[1]["grad_norm"] == pytest.approx(one[1]["grad_norm"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), three[0].params, one[0].params)
  assert not np.allclose(three[0].params["dense"]["w"], params["dense"]["w"])


def test_frozen_subtree_has_no_gradient_accumulator_or_optimizer_state_and_stays_put():
  params, batch = toy_params(), toy_batch()
  updater = Updater(toy_loss, tx(), params, frozen=("visual",))
  assert set(updater.trainable(params)) == {"dense", "head"}
  accum, _, _ = updater.micro_step(params, updater.init_accum(params), batch, np.float32(1.0), Toy())
  assert set(accum) == {"dense", "head"}
  state = updater.init_state(copy(params), jax.random.key(0))
  n_moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
  assert n_moments == 2 * sum(x.size for x in jax.tree.leaves(updater.trainable(params)))
  state, m = updater.update(state, split(batch, 2))
  assert m["update_skipped"] == 0
  np.testing.assert_array_equal(state.params["visual"]["s"], params["visual"]["s"])
  assert not np.allclose(state.params["head"]["w"], params["head"]["w"])
  with pytest.raises(ValueError, match="vision"):
    Updater(toy_loss, tx(), params, frozen=("vision",))


def test_non_finite_micro_batch_skips_the_update_and_the_next_one_runs():
  params, batch = toy_params(), toy_batch()
  updater = Updater(toy_loss, tx(), params)
  state = updater.init_state(copy(params), jax.random.key(0))
  opt_before = jax.tree.map(np.asarray, state.opt_state)
  micro = split(batch, 3)
  micro[1].batch["x"][0, 0] = np.inf
  state, m = updater.update(state, micro)
  assert m["update_skipped"] == 1 and m["grad_norm"] == 0.0 and int(state.skipped) == 1
  jax.tree.map(np.testing.assert_array_equal, state.params, params)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, opt_before)
  state, m = updater.update(state, split(toy_batch(seed=1), 3))
  assert m["update_skipped"] == 0 and int(state.skipped) == 1
  assert not np.allclose(state.params["dense"]["w"], params["dense"]["w"])
  assert updater.micro_step._cache_size() == updater.apply._cache_size() == 1  # no recompiles between updates


def test_gradients_accumulator_and_updated_state_keep_the_parameter_shardings():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  params = sharded_toy_params(mesh)
  single = toy_params()
  updater = Updater(toy_loss, tx(), params, frozen=("visual",))
  same = lambda a, b: a.sharding.is_equivalent_to(b.sharding, a.ndim) or pytest.fail(f"{a.sharding} vs {b.sharding}")
  accum = updater.init_accum(params)
  jax.tree.map(same, accum, updater.trainable(params))
  batch = toy_batch()
  accum, _, _ = updater.micro_step(params, accum, batch, np.float32(1.0), Toy())
  jax.tree.map(same, accum, updater.trainable(params))
  # the program itself, not a copy afterwards, returns gradients in the parameters' shardings
  compiled = updater.micro_step.lower(params, updater.init_accum(params), batch, np.float32(1.0), Toy()).compile()
  for out, p in zip(jax.tree.leaves(compiled.output_shardings[0]), jax.tree.leaves(updater.trainable(params))):
    assert out.is_equivalent_to(p.sharding, p.ndim), (out, p.sharding)

  state = sharding.replicate_rest(updater.init_state(copy(params), jax.random.key(0)), mesh)
  moments_before = [x.sharding for x in jax.tree.leaves(state.opt_state) if x.ndim]
  state, m = updater.update(state, split(batch, 3))
  jax.tree.map(same, state.params, params)
  for s, x in zip(moments_before, [x for x in jax.tree.leaves(state.opt_state) if x.ndim]):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  # the same update on one device gives the same parameters
  ref = Updater(toy_loss, tx(), single, frozen=("visual",))
  ref_state, ref_m = ref.update(ref.init_state(copy(single), jax.random.key(0)), split(batch, 3))
  assert m["loss"] == pytest.approx(ref_m["loss"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), state.params, ref_state.params)


def test_micro_step_and_apply_lower_from_abstract_sharded_shapes():
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  concrete = sharded_toy_params(mesh)
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), concrete)
  updater = Updater(toy_loss, tx(), params, frozen=("visual",))
  accum = updater.trainable(params)
  arrays = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
                        toy_batch())
  weight = jax.ShapeDtypeStruct((), jnp.float32)
  compiled = updater.micro_step.lower(params, accum, arrays, weight, Toy()).compile()
  for out, p in zip(jax.tree.leaves(compiled.output_shardings[0]), jax.tree.leaves(accum)):
    assert out.is_equivalent_to(p.sharding, len(p.shape))
  assert compiled.memory_analysis() is not None
  state = jax.eval_shape(lambda p_: updater.init_state(p_, jax.random.key(0)), params)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())), state)
  state = state.replace(params=params)
  loss = jax.ShapeDtypeStruct((), jnp.float32)
  new_state, ok, grad_norm = updater.apply.lower(state, accum, loss).compile().output_shardings
  for out, p in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params)):
    assert out.is_equivalent_to(p.sharding, len(p.shape))


def test_reference_copy_is_bfloat16_in_the_same_shardings_and_its_own_buffers():
  mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2)
  params = sharded_toy_params(mesh)
  ref = reference_copy(params, "bfloat16")
  template = reference_template(params, "bfloat16")
  for r, p, t in zip(jax.tree.leaves(ref), jax.tree.leaves(params), jax.tree.leaves(template)):
    assert r.dtype == t.dtype == jnp.bfloat16 and r.sharding == p.sharding == t.sharding
  same_dtype = reference_copy(params, "float32")
  for r, p in zip(jax.tree.leaves(same_dtype), jax.tree.leaves(params)):
    assert r.dtype == p.dtype and r.sharding == p.sharding
    buffer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    assert buffer(r) != buffer(p)  # updates donate the policy's buffers
