"""Sampling from a LoRA policy: adapters merged into the per-layer decode weights (once per `generate`
call, in the copy decoding makes anyway) against applied unmerged (two small matmuls per adapted
projection at every decode step). Same policy, prompts and key in one run; prints a table of the
rollout time, the decode-weight preparation time and whether the two sample the same tokens.

  python benchmarks/lora_decode.py [--preset=gpu] [--rank=64]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ares_jax import models, sampling  # noqa: E402
from ares_jax.models import lora  # noqa: E402
from ares_jax.models.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from ares_jax.sampling.sampler import decode_weights  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=512, layers=8, mlp=1408, vocab=32000, heads=8, mrope=(8, 12, 12), prompts=4, n=4,
                prompt=64, new=64, dtype="float32"),
    "gpu": dict(hidden=1536, layers=28, mlp=8960, vocab=151936, heads=12, mrope=(16, 24, 24), prompts=16, n=8,
                prompt=256, new=512, dtype="bfloat16"),
}


def main(preset: str, rank: int, repeats: int = 3):
  p = PRESETS[preset]
  v = p["vocab"]
  cfg = ModelConfig(
      text=TextConfig(vocab_size=v, hidden_size=p["hidden"], intermediate_size=p["mlp"], num_layers=p["layers"],
                      num_heads=p["heads"], num_kv_heads=2, mrope_section=p["mrope"]),
      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=p["hidden"],
                          fullatt_block_indexes=(0,)),
      image_token_id=v - 10, video_token_id=v - 9, vision_start_token_id=v - 8, vision_end_token_id=v - 7,
      dtype=p["dtype"], param_dtype="float32", lora=lora.LoraConfig(rank=rank, alpha=2.0 * rank))
  params = models.init_params(cfg, jax.random.key(0))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  adapters = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(next(keys), a.shape), lora.adapters(params))
  params = lora.with_adapters(lora.frozen_base(cfg, params), adapters)  # as a run holds them
  ids = np.random.default_rng(0).integers(0, v - 16, (p["prompts"], p["prompt"])).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  base_sc = sampling.SamplingConfig(max_new_tokens=p["new"], n=p["n"], max_branches=0, temperature=1.0, eos_ids=())

  variants = {"merged": True, "unmerged": False}
  configs = {name: dataclasses.replace(base_sc, lora_merged=m) for name, m in variants.items()}
  outs = {name: sampling.generate(cfg, params, batch, sc, jax.random.key(2)) for name, sc in configs.items()}
  for m in variants.values():  # compiled before timing
    jax.block_until_ready(decode_weights(cfg, params, m))
  total = {name: 0.0 for name in variants}
  prep = {name: 0.0 for name in variants}
  for _ in range(repeats):  # interleaved, so both see the same machine load
    for name, m in variants.items():
      t0 = time.perf_counter()
      jax.block_until_ready(decode_weights(cfg, params, m))
      prep[name] += (time.perf_counter() - t0) / repeats
      t0 = time.perf_counter()
      sampling.generate(cfg, params, batch, configs[name], jax.random.key(2))  # host arrays: waits for it
      total[name] += (time.perf_counter() - t0) / repeats
  rows = [(name, total[name], prep[name], int(outs[name].length.sum()) / total[name]) for name in variants]
  a, b = outs["merged"], outs["unmerged"]
  same = float(np.mean(a.tokens == b.tokens))
  both = (np.arange(a.tokens.shape[1])[None] < np.minimum(a.length, b.length)[:, None]) & (a.tokens == b.tokens)
  lp = float(np.abs(a.logprobs - b.logprobs)[both].max())
  print(f"preset {preset}: {jax.devices()[0].platform}, {p['layers']} layers x {p['hidden']}, {p['dtype']}, "
        f"LoRA rank {rank} on {', '.join(cfg.lora.targets)}; {p['prompts']} prompts x {p['n']} samples, "
        f"{p['prompt']} + {p['new']} tokens")
  print("| decode | rollout s | decode-weight prep ms | tokens/s | vs unmerged |")
  print("|---|---|---|---|---|")
  ref = rows[1][1]
  for name, seconds, prep_s, tps in rows:
    print(f"| {name} | {seconds:.3f} | {prep_s * 1e3:.1f} | {tps:.0f} | {ref / seconds:.2f}x |")
  print(f"same tokens: {same:.4f} of slots x positions; max |log-prob diff| on equal tokens {lp:.1e}")


if __name__ == "__main__":
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--rank", type=int, default=64)
  args = ap.parse_args()
  main(args.preset, args.rank)
