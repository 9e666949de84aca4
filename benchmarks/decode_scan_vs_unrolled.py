"""One cached decode step: the scanned decoder (stacked weights, sliced per layer inside the loop)
against the same layers unrolled over per-layer weight arrays passed in whole.

On a memory-bound CPU decode the per-layer slices of stacked weights can cost a copy per step;
this measures that cost on the sampler benchmark's ~120M config (batch 8, 96 cached positions).

  python benchmarks/decode_scan_vs_unrolled.py
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ares_jax import models  # noqa: E402
from ares_jax.models.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from ares_jax.models.qwen25vl import Qwen25VL  # noqa: E402
from ares_jax.models.text import DecoderLayer, mrope_cos_sin  # noqa: E402


def main(batch: int = 8, context: int = 96, repeats: int = 30):
  cfg = ModelConfig(
      text=TextConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_layers=12, num_heads=12,
                      num_kv_heads=2, mrope_section=(8, 12, 12)),
      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=768,
                          fullatt_block_indexes=(0,)),
      image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993)
  tc = cfg.text
  params = models.init_params(cfg, jax.random.key(0))
  ck = jnp.zeros((tc.num_layers, batch, context, tc.num_kv_heads, tc.head_dim))
  cv = jnp.zeros_like(ck)
  mask = jnp.ones((batch, context), bool)
  tok = jnp.zeros((batch,), jnp.int32)
  pos = jnp.full((batch,), context // 2, jnp.int32)

  scanned = jax.jit(lambda p, t: Qwen25VL(cfg).apply({"params": p}, t, pos, ck, cv, mask,
                                                     method=Qwen25VL.decode)[0])
  layer = DecoderLayer(cfg)
  per_layer = [jax.tree.map(lambda x, i=i: jnp.asarray(x[i]), params["decoder"]["layers"])
               for i in range(tc.num_layers)]

  def unrolled_fn(p, layers, t):
    m = Qwen25VL(cfg)
    x = m.apply({"params": p}, t[:, None], method=lambda mod, tt: mod.embed_tokens(tt))
    cos, sin = mrope_cos_sin(tc, jnp.broadcast_to(pos[None, :, None], (3, batch, 1)))
    for i, lp in enumerate(layers):
      x, _ = layer.apply({"params": lp}, x, cos, sin, mask[:, None, :], ck[i], cv[i])
    return m.apply({"params": p}, x, method=lambda mod, xx: mod.logits(xx))[:, 0]

  unrolled = jax.jit(unrolled_fn)
  a = np.asarray(scanned(params, tok))
  b = np.asarray(unrolled(params, per_layer, tok))
  assert np.allclose(a, b, atol=1e-4), "the two decoders must agree"
  rows = []
  for name, fn, args in (("scanned (stacked weights)", scanned, (params, tok)),
                         ("unrolled (per-layer weights)", unrolled, (params, per_layer, tok))):
    fn(*args).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
      fn(*args).block_until_ready()
    rows.append((name, (time.perf_counter() - t0) / repeats * 1e3))
  base = rows[0][1]
  print(f"{'decoder':32s} {'ms/step':>8s} {'vs scanned':>11s}")
  for name, ms in rows:
    print(f"{name:32s} {ms:8.1f} {base / ms:10.2f}x")


if __name__ == "__main__":
  main()
