"""Decode throughput of ares_jax's sampler against transformers' greedy `generate`, same weights.

CPU preset (the issue's target): a randomly initialised ~120M Qwen2-style text model (hidden 768,
12 layers, 12 heads, 2 KV heads, MLP 2048, vocab 32000), batch 8, prompt 32, 64 new tokens, fp32.
GPU preset: a ~1.5B config in bf16 at batch 64, reported against the memory-bandwidth bound
(bytes read per decode step / HBM bandwidth). Also measures the cost of the entropy, window-entropy
and HWE bookkeeping by running the same decode with it switched off.

  python benchmarks/sampler_vs_transformers.py               # CPU preset
  python benchmarks/sampler_vs_transformers.py --preset=gpu  # on a GPU host
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

PRESETS = {
    "cpu": dict(hidden=768, layers=12, heads=12, kv=2, mlp=2048, vocab=32000, batch=8, prompt=32, new=64,
                dtype="float32", threads=2),
    "gpu": dict(hidden=1536, layers=28, heads=12, kv=2, mlp=8960, vocab=151936, batch=64, prompt=128, new=256,
                dtype="bfloat16", threads=0),
}


def hf_model(p):
  import torch
  from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
  cfg = Qwen2_5_VLConfig(
      text_config=dict(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["mlp"],
                       num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                        "mrope_section": [16, 24, 24]},
                       bos_token_id=0, eos_token_id=1, pad_token_id=2),
      vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=p["hidden"],
                         fullatt_block_indexes=[0]),
      image_token_id=p["vocab"] - 4, video_token_id=p["vocab"] - 3, vision_start_token_id=p["vocab"] - 2,
      vision_end_token_id=p["vocab"] - 1)
  head_dim = p["hidden"] // p["heads"]
  half = head_dim // 2
  cfg.text_config.rope_parameters["mrope_section"] = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
  torch.manual_seed(0)
  model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
  return model.to(dtype=getattr(torch, p["dtype"]))


def time_it(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times)


def matmul_floor_s(p, repeats: int = 10) -> float:
  """Seconds per decode step spent in its matrix products alone: one XLA program running every product
  of a step (same shapes and dtype, distinct weight buffers, so weights stream from memory as in a real
  step) and nothing else. A floor that no XLA decoder on this machine beats, whatever else it does."""
  import jax
  import jax.numpy as jnp
  b, h, head_dim = p["batch"], p["hidden"], p["hidden"] // p["heads"]
  per_layer = [(h, h), (h, p["kv"] * head_dim), (h, p["kv"] * head_dim), (h, h), (h, p["mlp"]), (h, p["mlp"]),
               (p["mlp"], h)]
  shapes = per_layer * p["layers"] + [(h, p["vocab"])]
  weights = [jnp.full(s, 1e-3, p["dtype"]) for s in shapes]
  acts = {k: jnp.ones((b, k), p["dtype"]) for k in {s[0] for s in shapes}}
  step = jax.jit(lambda acts, ws: sum(jnp.sum(acts[w.shape[0]] @ w, dtype=jnp.float32) for w in ws))
  step(acts, weights).block_until_ready()
  return time_it(lambda: step(acts, weights).block_until_ready(), repeats)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_hf", action="store_true", help="GPU hosts: skip the (slow) transformers baseline")
  ap.add_argument("--hbm_gbps", type=float, default=3350.0, help="HBM bandwidth for the roofline (H100 SXM)")
  args = ap.parse_args()
  p = PRESETS[args.preset]
  import jax
  import jax.numpy as jnp
  import torch
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from ares_jax import models, sampling

  if p["threads"]:
    torch.set_num_threads(p["threads"])
  model = hf_model(p)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  rng = np.random.default_rng(0)
  ids = rng.integers(3, p["vocab"] - 8, size=(p["batch"], p["prompt"]))
  mask = np.ones_like(ids)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    config, params = models.load_hf(d, dtype=jnp.dtype(p["dtype"]))
  model = model.to(device)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  # A decode step reads every weight except the input embedding table (one row per token).
  embed = params["embed_tokens"]["embedding"].size if not config.tie_word_embeddings else 0

  hf_rate = None
  if not args.skip_hf:
    tids, tmask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def gen():
      model.generate(input_ids=tids, attention_mask=tmask, max_new_tokens=p["new"], min_new_tokens=p["new"],
                     do_sample=False, pad_token_id=2)
      sync()

    with torch.no_grad():
      gen()
      hf_t = time_it(gen, args.repeats)
    hf_rate = p["batch"] * p["new"] / hf_t
    rows.append(("transformers generate (greedy)", hf_t, hf_rate))

  batch = {"input_ids": ids, "attention_mask": mask}

  def timed(new_tokens, track):
    sc = sampling.SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, track_entropy=track, prompt_bucket=32)
    run = lambda: jax.block_until_ready(sampling.generate(config, params, batch, sc, jax.random.key(0)).tokens)
    t0 = time.perf_counter()
    run()
    print(f"new={new_tokens} entropy={track}: first call (incl. compile) {time.perf_counter() - t0:.1f}s",
          file=sys.stderr)
    return time_it(run, args.repeats)

  for track in (True, False):
    t = timed(p["new"], track)
    label = "ares_jax sampler" + ("" if track else " (entropy bookkeeping off)")
    rows.append((label, t, p["batch"] * p["new"] / t))
  # Prefill alone (one new token), so the decode loop's own rate can be read off.
  prefill_t = timed(1, True)

  print(f"\nmodel: {n_params / 1e6:.0f}M params, {p['dtype']}, batch {p['batch']}, prompt {p['prompt']}, "
        f"{p['new']} new tokens, devices {jax.devices()[0].platform} x{jax.device_count()}")
  print(f"{'run':48s} {'seconds':>9s} {'tokens/s':>10s} {'vs transformers':>16s}")
  for label, t, rate in rows:
    ratio = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
    print(f"{label:48s} {t:9.3f} {rate:10.1f} {ratio:>16s}")
  on, off = rows[-2][1], rows[-1][1]
  decode_rate = p["batch"] * (p["new"] - 1) / (on - prefill_t)
  print(f"prefill (1 new token): {prefill_t:.3f}s; decode loop alone: {decode_rate:.1f} tokens/s, "
        f"{(on - prefill_t) / (p['new'] - 1) * 1e3:.2f} ms/step")
  print(f"entropy + window entropy + HWE bookkeeping: {100 * (on - off) / (on - prefill_t):+.1f}% of decode time")
  floor = matmul_floor_s(p)
  print(f"matrix products alone: {floor * 1e3:.2f} ms/step -> at most {p['batch'] / floor:.0f} tokens/s here; "
        f"decode loop at {floor / ((on - prefill_t) / (p['new'] - 1)):.0%} of that floor" +
        (f"; 2x transformers needs {hf_t / p['new'] / 2 * 1e3:.2f} ms/step" if hf_rate else ""))
  if jax.devices()[0].platform == "gpu":
    itemsize = jnp.dtype(p["dtype"]).itemsize
    head_dim = p["hidden"] // p["heads"]
    avg_ctx = p["prompt"] + p["new"] / 2
    kv_bytes = 2 * p["layers"] * p["batch"] * avg_ctx * p["kv"] * head_dim * itemsize
    step_bytes = (n_params - embed) * itemsize + kv_bytes
    bound = args.hbm_gbps * 1e9 / step_bytes * p["batch"]
    print(f"bandwidth bound: {step_bytes / 1e9:.2f} GB read per step -> {bound:.0f} tokens/s at "
          f"{args.hbm_gbps:.0f} GB/s; decode loop achieved {decode_rate / bound:.0%} of it")


if __name__ == "__main__":
  main()
