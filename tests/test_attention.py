"""models/attention.py: every implementation against a numpy reference, in values and gradients."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ares_jax import settings as settings_lib
from ares_jax import configs, models, sharding
from ares_jax.models import attention as A
from ares_jax.models import blockwise_attention as BW
from ares_jax.models import splash_attention as SP
from ares_jax.models import text as text_lib

B, T, H, K, D = 3, 45, 4, 2, 8  # GQA: 2 query heads per kv head; T divides no block size used below


def _inputs(dtype=jnp.float32, t=T, seed=0):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((B, t, H, D)), dtype)
  k = jnp.asarray(rng.standard_normal((B, t, K, D)), dtype)
  v = jnp.asarray(rng.standard_normal((B, t, K, D)), dtype)
  seg = np.ones((B, t), np.int32)
  seg[0, :7] = 0  # left padding
  seg[1, t - 9:] = -1  # right padding
  seg[2, 5:17] = 2  # a packed second sequence, and a third piece of segment 1 after it
  seg[2, 30:] = 3
  return q, k, v, jnp.asarray(seg)


def _numpy_mask(seg, causal, prefix=None):
  """[B, T, S]: equal segments, or the query's prefix segment; s <= t when causal."""
  seg = np.asarray(seg)
  mask = seg[:, :, None] == seg[:, None, :]
  if prefix is not None:
    mask |= np.asarray(prefix)[:, :, None] == seg[:, None, :]
  if causal:
    mask &= np.tril(np.ones((seg.shape[1],) * 2, bool))
  return mask


def _numpy_reference(q, k, v, seg, causal, prefix=None):
  mask = _numpy_mask(seg, causal, prefix)
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # transformers' repeat_kv
  s = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(D)
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


def _grads(fn, q, k, v, seed=1):
  """Gradients of a random projection of fn's output (jitted: eager scans and conds are slow)."""
  w = jnp.asarray(np.random.default_rng(seed).standard_normal(q.shape), jnp.float32)
  return jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum(), argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
def test_xla_matches_numpy(causal):
  q, k, v, seg = _inputs()
  out = A.xla_attention(q, k, v, seg, seg, causal=causal)
  np.testing.assert_allclose(out, _numpy_reference(q, k, v, seg, causal), atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks", [(16, 8), (8, 16), (64, 64)])
def test_blockwise_matches_xla_values_and_gradients(causal, blocks):
  q, k, v, seg = _inputs()
  ref = lambda q, k, v: A.xla_attention(q, k, v, seg, seg, causal=causal)
  got = lambda q, k, v: BW.blockwise_attention(q, k, v, seg, seg, causal=causal, block_q=blocks[0],
                                               block_k=blocks[1])
  np.testing.assert_allclose(jax.jit(got)(q, k, v), ref(q, k, v), atol=1e-5)
  for g_got, g_ref in zip(_grads(got, q, k, v), _grads(ref, q, k, v)):
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5)


def _shared_prefix_rows(t=T):
  """Three rows of [prompt A (1) | response (2) | response (3) | prompt B (4) | response (5) | padding];
  responses 2, 3 have prefix 1 and 5 has prefix 4, others -2 (none). Row 1 also has left padding, row 2
  no right padding. Returns (segments, prefixes) [3, t] int32."""
  layouts = [[(1, 8), (2, 6), (3, 7), (4, 9), (5, 8), (-1, 7)],
             [(0, 4), (1, 10), (2, 5), (3, 9), (4, 6), (5, 8), (-1, 3)],
             [(1, 3), (2, 12), (3, 2), (4, 5), (5, 23)]]
  prefix_of = {2: 1, 3: 1, 5: 4}
  seg = np.array([np.repeat(*zip(*rows)) for rows in layouts], np.int32)
  assert seg.shape == (3, t)
  pre = np.vectorize(lambda s: prefix_of.get(s, -2))(seg).astype(np.int32)
  return jnp.asarray(seg), jnp.asarray(pre)


def test_prefix_mask_matches_numpy_and_reads_the_prompt_only():
  seg, pre = _shared_prefix_rows()
  mask = np.asarray(A.segment_mask(seg, seg, True, pre))
  np.testing.assert_array_equal(mask, _numpy_mask(seg, True, pre))
  np.testing.assert_array_equal(np.asarray(A.segment_mask(seg, seg, True)), _numpy_mask(seg, True))
  row = mask[0]  # row 0: prompt A 0..7, responses 8..13 and 14..20, prompt B 21..29, response 30..37
  assert row[15, :8].all() and not row[15, 8:14].any() and row[15, 14:16].all() and not row[15, 16:].any()
  assert row[30, 21:31].all() and not row[30, :21].any()
  assert not row[5, 6:].any() and row[5, :6].all()  # prompts stay causal and alone


def _dense_reference(seg, pre, causal=True):
  """A plain jnp masked softmax under the numpy mask (independent of segment_mask), for gradients."""
  mask = jnp.asarray(_numpy_mask(seg, causal, pre))
  return lambda q, k, v: A.masked_attention(q, k, v, mask)


@pytest.mark.parametrize("impl,blocks", [("xla", None), ("blockwise", (8, 8)), ("blockwise", (16, 8)),
                                         ("blockwise", (8, 16)), ("blockwise", (64, 64))])
def test_shared_prefix_values_and_gradients(impl, blocks):
  """Blocks of 8 leave tiles that no query sees (skipped), fully and partly masked ones."""
  q, k, v, _ = _inputs()
  seg, pre = _shared_prefix_rows()
  if impl == "xla":
    got = lambda q, k, v: A.dot_product_attention(q, k, v, q_segment=seg, kv_segment=seg, causal=True,
                                                  implementation="xla", q_prefix=pre)
  else:
    got = lambda q, k, v: BW.blockwise_attention(q, k, v, seg, seg, causal=True, block_q=blocks[0],
                                                 block_k=blocks[1], q_prefix=pre)
  np.testing.assert_allclose(jax.jit(got)(q, k, v), _numpy_reference(q, k, v, seg, True, pre), atol=1e-5)
  ref = _dense_reference(seg, pre)
  for g_got, g_ref in zip(_grads(got, q, k, v), _grads(ref, q, k, v)):
    np.testing.assert_allclose(g_got, g_ref, atol=1e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_shared_prefix_falls_back_to_blockwise(impl, monkeypatch, caplog):
  """splash and cudnn have no prefix support (attention.py's docstring): past SHORT_KV they run blockwise,
  logged once; below it xla, which has it. The platform is faked so that splash passes its TPU check."""
  monkeypatch.setattr(A, "current_platform", lambda: "tpu" if impl == "splash" else "gpu")
  monkeypatch.setattr(A, "_logged", set())
  q, k, v, _ = _inputs(t=3 * T)
  seg, pre = _shared_prefix_rows()
  shift = lambda a, j: jnp.where(a > 0, a + 10 * j, a)  # three packs of prompts and responses per row
  seg, pre = (jnp.concatenate([shift(a, j) for j in range(3)], axis=1) for a in (seg, pre))
  fn = lambda q, k, v: A.dot_product_attention(q, k, v, q_segment=seg, kv_segment=seg, causal=True,
                                               implementation=impl, q_prefix=pre)
  with caplog.at_level("WARNING", logger=A.__name__):
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), _numpy_reference(q, k, v, seg, True, pre), atol=1e-5)
  assert f"attention={impl}: shared prefixes" in caplog.text


def test_blockwise_bfloat16_stays_close():
  q, k, v, seg = _inputs(jnp.bfloat16)
  out = BW.blockwise_attention(q, k, v, seg, seg, causal=True, block_q=16, block_k=16)
  assert out.dtype == jnp.bfloat16
  ref = _numpy_reference(q, k, v, seg, True)
  assert np.abs(np.asarray(out, np.float32) - ref).max() < 3e-2


def test_blockwise_under_jit_remat_and_grad():
  """The training configuration: jit(value_and_grad(remat(...)))."""
  q, k, v, seg = _inputs()
  fn = jax.checkpoint(lambda q, k, v: BW.blockwise_attention(q, k, v, seg, seg, causal=True, block_q=8, block_k=8))
  got = _grads(fn, q, k, v)
  want = _grads(lambda q, k, v: A.xla_attention(q, k, v, seg, seg, causal=True), q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def _temp_bytes(fn, t):
  args = [jax.ShapeDtypeStruct(s, d) for s, d in [((1, t, H, 64), jnp.float32), ((1, t, K, 64), jnp.float32),
                                                   ((1, t, K, 64), jnp.float32), ((1, t), jnp.int32)]]
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("grad", [False, True])
def test_blockwise_temporaries_grow_linearly_not_quadratically(grad):
  def run(impl):
    f = lambda q, k, v, s: A.dot_product_attention(q, k, v, q_segment=s, kv_segment=s, causal=True,
                                                   implementation=impl)
    if grad:
      return lambda q, k, v, s: jax.grad(lambda q, k, v: f(q, k, v, s).sum(), argnums=(0, 1, 2))(q, k, v)
    return f
  small, large = _temp_bytes(run("blockwise"), 2048), _temp_bytes(run("blockwise"), 4096)
  xla_small, xla_large = _temp_bytes(run("xla"), 2048), _temp_bytes(run("xla"), 4096)
  print(f"grad={grad}: blockwise {small >> 20} -> {large >> 20} MiB, xla {xla_small >> 20} -> {xla_large >> 20} MiB")
  assert xla_large > 3.5 * xla_small  # the measure sees quadratic growth where there is some
  assert large < 2.5 * small
  assert large < xla_large / 8


def _layers(attend):
  """Two layers of `attend` in a scan, differentiated, as the decoder runs it: the segments are constants
  of the loop, q, k and v its carry's."""
  def grads(q, k, v, seg):
    def loss(q, k, v):
      def layer(c, _):
        scale = 1.0 + 0.1 * c.mean()
        return attend(c, k * scale, v * scale, seg), None
      return jax.lax.scan(layer, q, None, length=2)[0].sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  return grads


def test_blockwise_in_a_layer_scan_keeps_tiles_out_of_its_residuals():
  """Differentiated inside a scan, JAX moves what depends on the loop's constants only (each tile's mask and
  fill values) out of the loop, as residuals stacked over every (query, key) tile pair: memory quadratic in
  the sequence (38 GiB a device at 7B) unless `_forward` ties them to q. Gradients as xla's in the scan."""
  blockwise = lambda q, k, v, s: A.dot_product_attention(q, k, v, q_segment=s, kv_segment=s, causal=True,
                                                         implementation="blockwise")
  small, large = _temp_bytes(_layers(blockwise), 2048), _temp_bytes(_layers(blockwise), 4096)
  assert large < 2.5 * small, (small >> 20, large >> 20)
  q, k, v, seg = _inputs()
  tiled = lambda q, k, v, s: BW.blockwise_attention(q, k, v, s, s, causal=True, block_q=8, block_k=8)
  got = _layers(tiled)(q, k, v, seg)
  want = _layers(lambda q, k, v, s: A.xla_attention(q, k, v, s, s, causal=True))(q, k, v, seg)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=2e-5)


def test_splash_glue_matches_xla_in_the_pallas_interpreter():
  """Padding to tiles, the q scale, [B, H, T, D] layout, segment ids and the MQA form, run by the
  Pallas interpreter on CPU; under a mesh the kernel runs in shard_map, both GQA layouts."""
  q, k, v, seg = _inputs(t=150)
  ref = lambda q, k, v: A.xla_attention(q, k, v, seg, seg, causal=True)
  want_out, want_grads = ref(q, k, v), _grads(ref, q, k, v)
  for mesh in (None, sharding.make_mesh(data=1, fsdp=1, tensor=2), sharding.make_mesh(data=1, fsdp=1, tensor=4)):
    # tensor=2 splits both the 4 query and the 2 kv heads (MQA form); tensor=4 repeats k/v first
    with sharding.mesh_context(mesh):
      got = jax.jit(lambda q, k, v: SP.splash_attention(q, k, v, seg, seg, causal=True, interpret=True))
      np.testing.assert_allclose(got(q, k, v), want_out, atol=1e-5)
      for a, b in zip(_grads(got, q, k, v), want_grads):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_splash_full_mask_in_the_pallas_interpreter():
  q, k, v, seg = _inputs(t=130)
  got = SP.splash_attention(q, k, v, seg, seg, causal=False, interpret=True)
  np.testing.assert_allclose(got, A.xla_attention(q, k, v, seg, seg, causal=False), atol=1e-5)


_TPU_COMPILE = textwrap.dedent("""
  import numpy as np, jax, jax.numpy as jnp
  from jax.experimental import topologies
  from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  except Exception as e:  # no libtpu: nothing to compile for
    print("NO_TPU_COMPILER", e); raise SystemExit(0)
  from ares_jax.models import attention as A
  mesh = Mesh(np.array(topo.devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  def f(q, k, v, seg):
    return A.dot_product_attention(q, k, v, q_segment=seg, kv_segment=seg, causal=True, implementation="auto")
  x = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=NamedSharding(mesh, P(("data", "fsdp"))))
  with jax.set_mesh(mesh):
    assert A.current_platform() == "tpu", A.current_platform()
    g = jax.grad(lambda q, k, v, s: f(q, k, v, s).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    lowered = jax.jit(g).lower(x(4, 1024, 8, 128), x(4, 1024, 2, 128), x(4, 1024, 2, 128), x(4, 1024, dt=jnp.int32))
    assert "tpu_custom_call" in lowered.as_text(), "the splash kernel is not in the program"
    print("TEMP", lowered.compile().memory_analysis().temp_size_in_bytes)
""")


@pytest.mark.slow
def test_splash_compiles_for_a_tpu_topology_or_refuses_cpu():
  """With libtpu installed, `auto` under a v5p mesh resolves to splash and compiles (a subprocess, so
  libtpu stays out of the test workers); the CPU devices here refuse splash with a clear error."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", XLA_FLAGS="")
  res = subprocess.run([sys.executable, "-c", _TPU_COMPILE], env=env, capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert res.returncode == 0, res.stderr[-3000:]
  assert "TEMP" in res.stdout or "NO_TPU_COMPILER" in res.stdout, res.stdout
  print(res.stdout)
  q, k, v, seg = _inputs(t=300)
  with pytest.raises(ValueError, match="splash is a TPU"):
    A.dot_product_attention(q, k, v, q_segment=seg, kv_segment=seg, causal=True, implementation="splash")


def test_cudnn_glue_is_exact_through_jax_xla_kernel():
  """The run decomposition (rotate each run to index 0, per-row lengths) with jax's XLA kernel in
  place of cuDNN: rows of [left pad | tokens | right pad] take it, interleaved segments fall back."""
  q, k, v, seg = _inputs()
  text = np.asarray(text_lib.segment_ids(jnp.asarray([[0] * 7 + [1] * (T - 7), [1] * (T - 9) + [0] * 9,
                                                         [0] * 3 + [1] * (T - 8) + [0] * 5])))
  assert text[2, 0] == 0 and text[2, -1] == -1 and text[2, 10] == 1
  for s in (jnp.asarray(text), seg):  # seg: segment 1 occurs in two runs of row 2 -> blockwise
    got = lambda q, k, v, s=s: A.cudnn_attention(q, k, v, s, s, causal=True, kernel="xla")
    ref = lambda q, k, v, s=s: A.xla_attention(q, k, v, s, s, causal=True)
    np.testing.assert_allclose(jax.jit(got)(q, k, v), ref(q, k, v), atol=1e-5)
    for a, b in zip(_grads(got, q, k, v), _grads(ref, q, k, v)):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_resolve_attention_by_platform_and_length():
  assert A.resolve_attention("auto", "tpu") == "splash"
  assert A.resolve_attention("auto", "gpu") == "cudnn" and A.resolve_attention("auto", "cuda") == "cudnn"
  assert A.resolve_attention("auto", "cpu") == "blockwise"
  assert A.resolve_attention("auto", "cpu", kv_length=A.CPU_SHORT_KV) == "xla"
  assert A.resolve_attention("auto", "tpu", kv_length=64) == "xla"
  assert A.resolve_attention("auto", "tpu", kv_length=4096) == "splash"
  assert A.resolve_attention("blockwise", "tpu", kv_length=8) == "blockwise"
  assert A.current_platform() == "cpu"
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    A.resolve_attention("flash", "cpu")


def test_config_field_is_validated_and_plumbed():
  m = configs.model_fields(vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                           num_kv_heads=2, tie_word_embeddings=False, vision=configs.qwen25vl_vision(),
                           mrope_section=(2, 3, 3))
  m.vision.hidden_size, m.vision.num_heads = 32, 2
  assert m.attention == "auto" and settings_lib.model(m).attention == "auto"
  m.attention = "blockwise"
  cfg = settings_lib.model(m)
  assert cfg.attention == "blockwise"
  with pytest.raises(ValueError, match="config.model.attention"):
    cfg.replace(attention="flash")
  m.attention = "nope"
  with pytest.raises(models.ConfigError, match="config.model.attention='nope'"):
    settings_lib.model(m)
