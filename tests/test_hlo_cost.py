"""Loop-aware program costs (`hlo_cost`): XLA's cost analysis counts a while body once, so a scanned
decoder reports one layer. The references: XLA's own figures for the same loop unrolled, and XLA's own
figures for the loop as it counts it (the parser's byte and flop model must agree with XLA's there)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax import compiled_memory as cm
from ares_jax import hlo_cost, models, sharding
from ares_jax.models import qwen25vl
from ares_jax.train import row_fill

L, M, K = 6, 64, 128


def _scan(unroll):
  def f(w, x):
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w, unroll=unroll)[0].sum()
  return f


def _compiled(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled.cost_analysis(), hlo_cost.loop_cost(compiled.as_text())


W, X = jax.ShapeDtypeStruct((L, K, K), jnp.float32), jax.ShapeDtypeStruct((M, K), jnp.float32)


@pytest.mark.parametrize("grad", [False, True])
def test_a_scan_counts_every_layer_as_the_unrolled_loop_does(grad):
  """XLA's figure for a scan of L matmuls is one matmul's; with the loop's missing bodies added it is the
  unrolled program's (the backward's unrolled form drops one cotangent product XLA can see is unused)."""
  wrap = jax.grad if grad else (lambda f: f)
  xla, loops = _compiled(wrap(_scan(1)), W, X)
  unrolled, flat = _compiled(wrap(_scan(True)), W, X)
  one = 2 * M * K * K
  assert flat.loops == () and flat.missing == (0.0, 0.0, 0.0)
  assert [n for _, n in loops.loops] == ([L, L] if grad else [L])
  assert xla["flops"] < (3.2 if grad else 1.2) * one  # the defect: one layer
  corrected = xla["flops"] + loops.missing[0]
  assert corrected == pytest.approx((3 * L if grad else L) * one, rel=0.01)
  assert corrected == pytest.approx(unrolled["flops"], rel=0.01 if not grad else 0.06)
  # the parser's model of what XLA counts agrees with XLA on the program as XLA counts it
  assert loops.xla[0] == pytest.approx(xla["flops"], rel=0.02)
  assert loops.xla[1] == pytest.approx(xla["bytes accessed"], rel=0.02)
  assert unrolled["bytes accessed"] == pytest.approx(flat.run[1], rel=0.05)
  # each body past its first run: its weights slice, its activations, its product
  assert loops.run[1] - loops.xla[1] >= (L - 1) * 4 * (K * K + 2 * M * K)


def test_nested_loops_multiply_and_an_unknown_trip_count_stays_once():
  def nested(w, x):
    return jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.scan(lambda c, wi: (c @ wi, None), c, w)[0], x).sum()

  xla, loops = _compiled(nested, W, X)
  assert sorted(n for _, n in loops.loops) == [3, L]
  assert xla["flops"] + loops.missing[0] == pytest.approx(3 * L * 2 * M * K * K, rel=0.01)

  def until_small(w, x):  # stops on the data: XLA cannot know how often
    return jax.lax.while_loop(lambda c: c.sum() > 1.0, lambda c: c @ w[0] * 0.5, x).sum()

  xla, loops = _compiled(until_small, W, X)
  assert [n for _, n in loops.loops] == [None] and loops.missing == (0.0, 0.0, 0.0)
  assert xla["flops"] == pytest.approx(2 * M * K * K, rel=0.05)


@pytest.mark.parametrize("window", [
    dict(window_strides=(1, 1), padding=((0, 0), (0, 0))),
    dict(window_strides=(2, 1), padding=((1, 2), (0, 1))),
    dict(window_strides=(1, 1), padding=((1, 1), (2, 2)), lhs_dilation=(2, 3)),  # TPU's batched products
    dict(window_strides=(1, 2), padding=((0, 0), (3, 3)), rhs_dilation=(2, 3)),
    dict(window_strides=(1, 1), padding=((0, 0), (0, 0)), feature_group_count=4)])
def test_convolution_flops_are_xlas(window):
  """TPU writes matrix products as convolutions, batched ones with dilated windows; the count of valid
  (output, kernel) taps per spatial dimension must be XLA's, here against CPU XLA's own figure."""
  groups = window.get("feature_group_count", 1)
  x, w = jnp.ones((2, 8, 13, 11)), jnp.ones((16, 8 // groups, 3, 4))
  xla, loops = _compiled(lambda x, w: jax.lax.conv_general_dilated(x, w, **window), x, w)
  assert "convolution(" in jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, **window)).lower(
      x, w).compile().as_text()
  assert loops.xla[0] == xla["flops"]


def test_a_conditional_in_a_loop_counts_its_cheapest_branch():
  """Which branch runs is the data's choice (blockwise attention skipping a masked tile): the bodies past
  the first count the cheaper branch, so the figure is a low bound."""
  def f(w, x):
    def body(c, wi):
      return jax.lax.cond(c.sum() > 0, lambda: jnp.tanh(c @ wi), lambda: c * 2.0), None
    return jax.lax.scan(body, x, w)[0].sum()

  xla, loops = _compiled(f, W, X)
  assert loops.missing[0] == 0.0 and xla["flops"] >= 2 * M * K * K


@pytest.mark.parametrize("loop", ["scan", "fori_from_3_step_2", "count_down"])
def test_trip_counts_are_read_from_the_loop_when_xla_does_not_write_them(loop):
  """TPU's optimized HLO has no `known_trip_count`: the count comes from the condition (an element against a
  bound), the element's start and the body's step. Checked against the count XLA writes on CPU, removed."""
  def fn(w, x):
    if loop == "scan":
      return _scan(1)(w, x)
    if loop == "fori_from_3_step_2":  # 3, 5, 7, 9: four runs
      return jax.lax.while_loop(lambda s: s[0] < 10, lambda s: (s[0] + 2, jnp.tanh(s[1] @ w[0])), (3, x))[1].sum()
    return jax.lax.while_loop(lambda s: s[0] > 0, lambda s: (s[0] - 1, jnp.tanh(s[1] @ w[0])), (5, x))[1].sum()

  text = jax.jit(fn).lower(W, X).compile().as_text()
  written = hlo_cost.loop_cost(text)
  plain = re.sub(r'"known_trip_count":\{"n":"[0-9]+"\},?', "", text)
  assert "known_trip_count" in text and "known_trip_count" not in plain
  assert [n for _, n in written.loops] == [{"scan": L, "fori_from_3_step_2": 4, "count_down": 5}[loop]]
  stripped = hlo_cost.loop_cost(plain)
  assert stripped.loops == written.loops and stripped.run == written.run


@pytest.mark.slow
def test_a_scan_compiled_for_a_tpu_counts_every_layer():
  """Compiled for v5p (no accelerator: `topologies`): XLA reports one layer's flops; the counted figure is L."""
  pytest.importorskip("libtpu")
  devices, _ = cm.topology_devices("v5p:2x2x1")
  mesh = sharding.make_mesh(devices=devices[:1])
  rep = NamedSharding(mesh, PartitionSpec())
  w = jax.ShapeDtypeStruct((L, K, K), jnp.float32, sharding=rep)
  x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=rep)
  c = cm.compile_program(jax.jit(_scan(1)), w, x, mesh=mesh)
  assert c.flops == pytest.approx(L * 2 * M * K * K, rel=0.02)


def test_compile_program_counts_a_sharded_scan_and_its_collectives_per_layer():
  """8 simulated devices, the contracted dimension sharded: each layer's product is an eighth of the work
  plus an all-reduce of its [M, K] result, L times."""
  mesh = sharding.make_mesh(fsdp=8, devices=jax.devices()[:8])
  cols = NamedSharding(mesh, PartitionSpec(None, "fsdp"))
  w = jax.ShapeDtypeStruct((L, K, K), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec(None, "fsdp", None)))
  x = jax.ShapeDtypeStruct((M, K), jnp.float32, sharding=cols)

  def layers(w, x):
    def one(c, wi):
      return jax.lax.with_sharding_constraint(c @ wi, cols), None
    return jax.lax.scan(one, x, w)[0]

  c = cm.compile_program(jax.jit(layers), w, x, mesh=mesh)
  assert c.flops == pytest.approx(L * 2 * M * K * K / 8, rel=0.05)
  assert c.collective_bytes >= L * 4 * M * K / 8


def _decoder_costs(num_layers: int, tokens: int = 256):
  text = models.TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=num_layers,
                           num_heads=4, num_kv_heads=2, mrope_section=(4, 6, 6))
  config = models.ModelConfig(text=text, vision=models.VisionConfig(depth=1, hidden_size=32, intermediate_size=64,
                                                                    num_heads=2, out_hidden_size=128),
                              attention="xla")
  params = qwen25vl.abstract_params(config)
  ids = jax.ShapeDtypeStruct((2, tokens), jnp.int32)
  positions = jax.ShapeDtypeStruct((3, 2, tokens), jnp.int32)

  def logits(p, ids, positions):
    inputs = qwen25vl.ModelInputs(ids, positions, jnp.ones_like(ids), None)
    return qwen25vl._apply(config, p, inputs)  # pylint: disable=protected-access

  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return text, cm.compile_program(jax.jit(logits), params, ids, positions, mesh=mesh), cm.cost(
      jax.jit(logits).lower(params, ids, positions).compile())[0]


def test_a_scanned_decoder_costs_its_layers():
  """The model's decoder is one `nn.scan`: XLA's own figure barely moves from 1 to 3 layers; the counted
  figure grows by a layer's matrix products (2 x its weights per token) and its attention per layer."""
  costs = {n: _decoder_costs(n) for n in (1, 2, 3)}
  text = costs[1][0]
  raw = {n: c[2] for n, c in costs.items()}
  counted = {n: c[1].flops for n, c in costs.items()}
  assert raw[3] < 1.1 * raw[1]
  layer = counted[2] - counted[1]
  assert counted[3] - counted[2] == pytest.approx(layer, rel=1e-3)
  tokens, t = 2 * 256, 256
  per_layer = (row_fill.linear_flops_per_token(text) - 2.0 * text.hidden_size * text.vocab_size) / text.num_layers
  attention = 2 * 4.0 * text.hidden_size * t * t  # two rows, every query against every key
  assert tokens * per_layer <= layer <= 1.05 * (tokens * per_layer + attention)
  assert np.isclose(counted[1], raw[1], rtol=0.02)  # one layer: nothing was missing
