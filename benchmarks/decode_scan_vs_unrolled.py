"""One cached decode step: the layers as one scan (weights and cache sliced per layer with a dynamic index)
against `models.decode_step`, the same layers unrolled over per-layer buffers (what the sampler runs).

On a memory-bound CPU decode the per-layer slices of stacked weights can cost a copy per step;
this measures that cost on the sampler benchmark's configs: ~120M fp32 (batch 8, 96 cached positions) on CPU,
~1.5B bf16 (batch 64, 384 cached positions) on a GPU.

  python benchmarks/decode_scan_vs_unrolled.py [--preset=gpu]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ares_jax import models  # noqa: E402
from ares_jax.models.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from ares_jax.models.layers import cache_reader  # noqa: E402
from ares_jax.models.qwen25vl import Qwen25VL  # noqa: E402
from ares_jax.models.text import DecoderLayer, mrope_cos_sin  # noqa: E402
from flax import linen as nn  # noqa: E402


PRESETS = {
    "cpu": dict(hidden=768, layers=12, mlp=2048, vocab=32000, mrope=(8, 12, 12), batch=8, context=96,
                dtype="float32"),
    "gpu": dict(hidden=1536, layers=28, mlp=8960, vocab=151936, mrope=(16, 24, 24), batch=64, context=384,
                dtype="bfloat16"),
}


def main(preset: str, repeats: int = 30):
  p = PRESETS[preset]
  batch, context, dtype = p["batch"], p["context"], jnp.dtype(p["dtype"])
  v = p["vocab"]
  cfg = ModelConfig(
      text=TextConfig(vocab_size=v, hidden_size=p["hidden"], intermediate_size=p["mlp"], num_layers=p["layers"],
                      num_heads=12, num_kv_heads=2, mrope_section=p["mrope"]),
      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=p["hidden"],
                          fullatt_block_indexes=(0,)),
      image_token_id=v - 10, video_token_id=v - 9, vision_start_token_id=v - 8, vision_end_token_id=v - 7,
      dtype=p["dtype"], param_dtype=p["dtype"])
  tc = cfg.text
  params = jax.tree.map(lambda x: x.astype(dtype), models.init_params(cfg, jax.random.key(0)))
  ck = jax.random.normal(jax.random.key(1), (tc.num_layers, batch, context, tc.num_kv_heads, tc.head_dim), dtype)
  cv = jax.random.normal(jax.random.key(2), ck.shape, dtype)
  mask = jnp.ones((batch, context), bool)
  tok = jnp.zeros((batch,), jnp.int32)
  pos = jnp.full((batch,), context // 2, jnp.int32)

  class ScannedDecode(nn.Module):  # the layers as one nn.scan, cache slices scanned with them
    @nn.compact
    def __call__(self, x, cos, sin, mask, cache_k, cache_v):
      stack = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0), length=tc.num_layers)
      return stack(cfg, name="layers")(x, cos, sin, mask, cache_k, cache_v)

  def scanned_fn(p, t, ck, cv):
    m = Qwen25VL(cfg)
    x = m.apply({"params": p}, t[:, None], method=lambda mod, tt: mod.embed_tokens(tt))
    cos, sin = mrope_cos_sin(tc, jnp.broadcast_to(pos[None, :, None], (3, batch, 1)))
    x, _ = ScannedDecode().apply({"params": p["decoder"]}, x, cos, sin, mask[:, None, :], ck, cv)
    return m.apply({"params": p}, x, method=Qwen25VL.logits)[:, 0]

  def unrolled_fn(p, layers, t, ck, cv):
    readers = [cache_reader(k, v, mask[:, None, :]) for k, v in zip(ck, cv)]
    return models.decode_step(cfg, p, layers, t, pos, readers)[0]

  scanned, unrolled = jax.jit(scanned_fn), jax.jit(unrolled_fn)
  layers = models.unstack_layers(params)
  per_layer = (tuple(ck), tuple(cv))
  a = np.asarray(scanned(params, tok, ck, cv), np.float32)
  b = np.asarray(unrolled(params, layers, tok, *per_layer), np.float32)
  tol = 1e-4 if dtype == jnp.float32 else 5e-2 * float(np.abs(a).max())
  assert np.allclose(a, b, atol=tol), "the two decoders must agree"
  rows = []
  for name, fn, args in (("scanned (stacked weights)", scanned, (params, tok, ck, cv)),
                         ("unrolled (models.decode_step)", unrolled, (params, layers, tok, *per_layer))):
    fn(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
      fn(*args).block_until_ready()
    rows.append((name, (time.perf_counter() - t0) / repeats * 1e3))
  base = rows[0][1]
  print(f"preset {preset}: {jax.devices()[0].platform}, batch {batch}, {context} cached positions, {p['dtype']}")
  print(f"{'decoder':32s} {'ms/step':>8s} {'vs scanned':>11s}")
  for name, ms in rows:
    print(f"{name:32s} {ms:8.1f} {base / ms:10.2f}x")


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  main(ap.parse_args().preset)
