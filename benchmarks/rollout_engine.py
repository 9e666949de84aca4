"""The two rollout engines of `sampling.generate` in one run, same weights, prompts, seed and tau_high: "dense"
(every trajectory slot owns a cache row of prompt + max_new_tokens, the prompt copied into each of a group's
n + branches slots, every decode step reads the whole width, a compiled chunk runs until its longest
trajectory ends) against "paged" (each prompt's KV once per group, response pages with copy-on-write forks,
attention up to the longest live response, ended groups refilled from a queue). The two must sample the same
tokens, lengths and forks, which the benchmark asserts.

Workload, as in an ARES step: n = 8 samples + 4 HWE branch slots per prompt, tau_high the mean per-trajectory
0.95-quantile of token entropy of a warm-up rollout (as the AEPO stage sets it), and a length mix where a
third of the prompts end at ~10% of the budget, a third at ~40% and a third run to it. The lengths are made
deterministic: no EOS ids (nothing stops a trajectory early) and per-prompt `budgets` of 10% / 40% / 100% of
`--budget`, cycling over the prompts (51 / 205 / 512 on the CPU preset). A branch has its prompt's budget.

  python benchmarks/rollout_engine.py               # CPU: ~122M Qwen2-style fp32, 8 prompts x 1024, budget 512
  python benchmarks/rollout_engine.py --preset=gpu  # ~1.8B bf16, 64 prompts x 1024, budget 1024
  python benchmarks/rollout_engine.py --prompts_in_flight=0,4 --chunk_prompts=0,1  # two paged settings

The four paged options take comma lists, one paged run per position (a single value applies to every run):
`--prompts_in_flight=0,4 --chunk_prompts=0,1` runs all prompts in flight, then 4 with refills one at a time;
`--prompts_in_flight=0,0 --decode_attention=per_slot,per_group` both ways of reading pages.
The GPU preset runs dense in chunks of 16 prompts (`--dense_chunk_prompts`): all 64 at once would hold 45 GB
of cache.

The table's columns:
  - warm-up s: a first `generate` call with the same shapes and budgets cut to 1/32, which compiles the
    engine's programs (for dense it also gives tau_high; tau_high is an argument, not a constant).
  - wall s: the timed `generate` call, whole: prompt preparation, prefill, decode and read-back; in brackets
    the process's CPU seconds (all threads), which other jobs on a shared machine stretch less.
  - prefill s: dense, the model's prefill of the same prompts timed on its own (the engine fuses it into its
    rollout program); paged, the engine's own prefill-and-admit calls (`refill.admit`) in the timed call.
  - decode iterations: steps of the decode loops. Dense: rebuilt exactly from the returned fork tree (a root
    runs `length` steps from step 0; a branch starts the step after its parent's window [fork_pos,
    fork_pos + w) completed and runs `length - fork_pos` steps; a chunk loops until its last slot ends).
    Paged: the engine's step counter, read after each decode call (`refill.decode`).
  - ms / iteration: (wall - prefill) / decode iterations, the host's share in it; CPU ms alike.
  - generated tokens: over used slots, the tokens each sampled itself: `length` for a root, `length -
    fork_pos` for a branch (its prefix is its parent's). tokens/s: over the wall time (per CPU second).
  - vs dense: paged tokens/s / dense tokens/s (per CPU second).
  - KV MB / iteration: the cache one decode step reads, from the layouts. KV bytes per token = 2 (k, v) x
    layers x kv_heads x head_dim x itemsize; T the prompt width, N = max_new_tokens, G = n + branches, P the
    prompts decoding together (dense: its chunk; paged: the groups in flight). Dense: P x G x (T + N) at
    every step (masked, but read). Paged, at its widest (the longest live response at N): P x (T - 1) of
    shared prompt plus P x G x ceil(N / B) x B response keys, B = max(1, 256 // page_size) x page_size (the
    attention reads whole blocks of B tokens, for every slot, up to the longest live response; per_group
    reads a group's pages once for all of its slots, up to the most pages a group has taken, which is at
    most as much).
  - weights read per iteration (printed above the table): every weight but the input embedding table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ares_jax import aepo, models, sampling  # noqa: E402
from ares_jax.models import lora  # noqa: E402
from ares_jax.models.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from ares_jax.models.qwen25vl import Qwen25VL  # noqa: E402
from ares_jax.sampling import chunks as chunks_lib  # noqa: E402
from ares_jax.sampling import paged, refill  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=768, layers=12, heads=12, kv=2, mlp=2048, vocab=32000, mrope=(8, 12, 12), dtype="float32",
                prompts=8, prompt_len=1024, budget=512, dense_chunk_prompts=0),
    # dense in chunks of 16 prompts (192 slots x 2048 positions: 11 GB of cache)
    "gpu": dict(hidden=1536, layers=28, heads=12, kv=2, mlp=8960, vocab=151936, mrope=(16, 24, 24),
                dtype="bfloat16", prompts=64, prompt_len=1024, budget=1024, dense_chunk_prompts=16),
    # the smoke test's size (tests/test_benchmarks.py): the code paths of the two above, in seconds
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, mlp=128, vocab=512, mrope=(2, 3, 3), dtype="float32",
                 prompts=3, prompt_len=16, budget=12, dense_chunk_prompts=0),
}
N_ROOTS, BRANCHES, WINDOW = 8, 4, 4
FRACTIONS = (0.1, 0.4, 1.0)  # budget fractions cycled over the prompts: the short / medium / long mix


def model_config(p: dict) -> ModelConfig:
  v = p["vocab"]
  return ModelConfig(
      text=TextConfig(vocab_size=v, hidden_size=p["hidden"], intermediate_size=p["mlp"], num_layers=p["layers"],
                      num_heads=p["heads"], num_kv_heads=p["kv"], mrope_section=p["mrope"]),
      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=p["hidden"],
                          fullatt_block_indexes=(0,)),
      image_token_id=v - 10, video_token_id=v - 9, vision_start_token_id=v - 8, vision_end_token_id=v - 7,
      dtype=p["dtype"], param_dtype=p["dtype"])


def prompt_budgets(n_prompts: int, budget: int) -> np.ndarray:
  return np.asarray([max(1, round(budget * FRACTIONS[i % 3])) for i in range(n_prompts)], np.int32)


def generated_tokens(r: sampling.Rollouts) -> int:
  """Tokens the slots sampled themselves: a branch's prefix up to its fork position is its parent's."""
  return int((r.length - np.maximum(r.fork_pos, 0))[r.used].sum())


def dense_iterations(r: sampling.Rollouts, group: int, chunk: int, window: int) -> int:
  """Decode steps the dense engine ran, rebuilt from the fork tree (the module docstring says how). Branch
  slots are filled in order, so a parent's slot comes before its children's."""
  birth, start, end = (np.zeros(len(r.length), np.int64) for _ in range(3))
  for s in np.flatnonzero(r.used):
    p = int(r.parent[s])
    if p >= 0:
      t = int(r.fork_pos[s])
      birth[s], start[s] = birth[p] + t + window - start[p], t
    end[s] = birth[s] + r.length[s] - start[s]
  width = chunk * group
  return int(sum(end[i:i + width].max() for i in range(0, len(end), width)))


class Stopwatch:
  """Wall and process CPU seconds (all threads) of a block. On a shared machine the CPU time is the steadier
  measure: other jobs stretch the wall time, much less the work."""

  def __enter__(self):
    self.t0, self.c0 = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


@contextlib.contextmanager
def paged_probe():
  """Times the paged engine's prefill-and-admit calls and reads its step counter after each decode call:
  `generate` returns neither. Each wrapped call is waited for; the engine waits on every decode itself (it
  reads the busy groups back), so this only takes away a prefill's overlap with the next dispatch."""
  # decode_calls: (iterations, wall s) of each decode call
  probe = {"prefill_s": 0.0, "prefill_cpu_s": 0.0, "iterations": 0, "decode_calls": []}
  admit, decode = refill.admit, refill.decode

  def timed_admit(*args):
    with Stopwatch() as t:
      out = jax.block_until_ready(admit(*args))
    probe["prefill_s"] += t.wall
    probe["prefill_cpu_s"] += t.cpu
    return out

  def counted_decode(*args):
    with Stopwatch() as t:
      state, busy = jax.block_until_ready(decode(*args))
      steps = int(state.step)
    probe["decode_calls"].append((steps - probe["iterations"], round(t.wall, 3)))
    probe["iterations"] = steps
    return state, busy

  refill.admit, refill.decode = timed_admit, counted_decode
  try:
    yield probe
  finally:
    refill.admit, refill.decode = admit, decode


def prefill_seconds(config: ModelConfig, params, batch: dict, sc: sampling.SamplingConfig) -> Stopwatch:
  """The dense engine's prefill on its own: the model's prefill of each of its chunks (compiled first)."""
  fn = jax.jit(lambda p, x: Qwen25VL(config).apply(lora.variables(config, p), x, method=Qwen25VL.prefill))
  chunks = chunks_lib.make_chunks(config, batch, sc)
  jax.block_until_ready(fn(params, chunks[0].inputs))
  with Stopwatch() as t:
    for c in chunks:
      jax.block_until_ready(fn(params, c.inputs))
  return t


def kv_mb_per_iteration(config: ModelConfig, sc: sampling.SamplingConfig, prompts: int, t_prompt: int) -> float:
  """The KV one decode iteration reads with `prompts` decoding together (the module docstring's formulas)."""
  tc = config.text
  per_token = 2 * tc.num_layers * tc.num_kv_heads * tc.head_dim * jnp.dtype(sc.cache_dtype or config.dtype).itemsize
  group, n_max = N_ROOTS + BRANCHES, sc.max_new_tokens
  if sc.kv_cache == "dense":
    return prompts * group * (t_prompt + n_max) * per_token / 1e6
  span = paged.block_pages_for(sc.page_size) * sc.page_size
  return prompts * ((t_prompt - 1) + group * -(-n_max // span) * span) * per_token / 1e6


def warm_up(config, params, batch, sc, key, tau, budgets) -> tuple[sampling.Rollouts, float]:
  """A first `generate` (host arrays: it waits for the device) and its seconds, compilation included."""
  with Stopwatch() as t:
    r = sampling.generate(config, params, batch, sc, key, tau, budgets=budgets)
  return r, t.wall


def run_engine(config, params, batch, sc, key, tau, budgets, *, warmup_s, t_prompt) -> tuple[sampling.Rollouts, dict]:
  """The timed `generate` of `sc`'s engine, after `warm_up`. Returns its rollouts and its table row."""
  n_prompts = len(budgets)
  chunk = min(sc.chunk_prompts or n_prompts, n_prompts)
  row = dict(engine=sc.kv_cache, page_size=sc.page_size, prompts_in_flight=sc.prompts_in_flight,
             decode_attention=sc.for_platform(jax.devices()[0].platform).decode_attention,
             chunk_prompts=sc.chunk_prompts, warmup_s=warmup_s)
  if sc.kv_cache == "paged":
    with paged_probe() as probe, Stopwatch() as t:
      r = sampling.generate(config, params, batch, sc, key, tau, budgets=budgets)
    row.update(prefill_s=probe["prefill_s"], prefill_cpu_s=probe["prefill_cpu_s"], iterations=probe["iterations"],
               decode_calls=probe["decode_calls"], groups_in_flight=refill.layout(sc, n_prompts)[0])
  else:
    with Stopwatch() as t:
      r = sampling.generate(config, params, batch, sc, key, tau, budgets=budgets)
    prefill = prefill_seconds(config, params, batch, sc)
    row.update(prefill_s=prefill.wall, prefill_cpu_s=prefill.cpu, groups_in_flight=chunk,
               iterations=dense_iterations(r, N_ROOTS + BRANCHES, chunk, sc.window))
  tokens, iterations = generated_tokens(r), max(row["iterations"], 1)
  row.update(wall_s=t.wall, cpu_s=t.cpu, ms_per_iteration=(t.wall - row["prefill_s"]) / iterations * 1e3,
             cpu_ms_per_iteration=(t.cpu - row["prefill_cpu_s"]) / iterations * 1e3, tokens=tokens,
             tokens_per_s=tokens / t.wall, tokens_per_cpu_s=tokens / t.cpu, forks=int((r.parent >= 0).sum()),
             kv_mb_per_iteration=kv_mb_per_iteration(config, sc, row["groups_in_flight"], t_prompt))
  print(f"{sc.kv_cache} (page {sc.page_size}, in flight {row['groups_in_flight']}, chunk {chunk}): warm-up "
        f"{warmup_s:.1f}s, timed {t.wall:.1f}s ({t.cpu:.1f} CPU s)" +
        (f"; decode calls (iterations, s) {row['decode_calls']}" if sc.kv_cache == "paged" else ""), file=sys.stderr)
  return r, row


def ints(text: str) -> list[int]:
  return [int(x) for x in str(text).split(",")]


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--prompts", type=int, help="prompts per generate call (preset: 8 on CPU, 64 on GPU)")
  ap.add_argument("--prompt_len", type=int, help="prompt tokens (preset: 1024)")
  ap.add_argument("--budget", type=int, help="max_new_tokens, the long prompts' budget (preset: 512 / 1024)")
  ap.add_argument("--page_size", default="64", help="paged: tokens per page (comma list: one per paged run)")
  ap.add_argument("--prompts_in_flight", default="0", help="paged: groups decoding together (0: all); a list")
  ap.add_argument("--chunk_prompts", default="0", help="paged: prompts prefilled per admit (0: all); a list")
  ap.add_argument("--decode_attention", default="auto", help="paged: auto, per_group or per_slot; a list")
  ap.add_argument("--dense_chunk_prompts", type=int, help="dense: prompts per compiled rollout (0: all)")
  ap.add_argument("--quantile", type=float, default=0.95, help="tau_high's per-trajectory entropy quantile")
  ap.add_argument("--json", help="write the results here")
  args = ap.parse_args(argv)
  p = dict(PRESETS[args.preset])
  p.update({k: getattr(args, k) for k in ("prompts", "prompt_len", "budget", "dense_chunk_prompts")
            if getattr(args, k) is not None})
  config = model_config(p)
  dtype = jnp.dtype(p["dtype"])
  params = jax.tree.map(lambda x: x.astype(dtype), models.init_params(config, jax.random.key(0)))
  n_params = sum(x.size for x in jax.tree.leaves(params))
  weight_mb = (n_params - params["embed_tokens"]["embedding"].size) * dtype.itemsize / 1e6
  ids = np.random.default_rng(0).integers(0, p["vocab"] - 16, (p["prompts"], p["prompt_len"])).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  budgets = prompt_budgets(p["prompts"], p["budget"])
  warm_budgets = np.maximum(budgets // 32, 1)  # same shapes and ending order, a fraction of the decode
  key = jax.random.key(1)
  base = sampling.SamplingConfig(max_new_tokens=p["budget"], temperature=1.0, n=N_ROOTS, max_branches=BRANCHES,
                                 window=WINDOW, eos_ids=(), prompt_bucket=64)
  t_prompt = -(-p["prompt_len"] // base.prompt_bucket) * base.prompt_bucket
  dense_sc = dataclasses.replace(base, kv_cache="dense", chunk_prompts=p["dense_chunk_prompts"])

  # tau_high as the AEPO stage sets it, from a warm-up rollout (tau_high inf: the branch slots, no forks);
  # tau_high is an argument of the compiled programs, so this is the dense engine's warm-up too
  warm, warmup_s = warm_up(config, params, batch, dense_sc, key, float("inf"), warm_budgets)
  tau = float(aepo.entropy_threshold(warm.entropy, warm.mask, args.quantile))
  ref, row = run_engine(config, params, batch, dense_sc, key, tau, budgets, warmup_s=warmup_s, t_prompt=t_prompt)
  results = [row]
  settings = [ints(args.page_size), ints(args.prompts_in_flight), ints(args.chunk_prompts),
              args.decode_attention.split(",")]
  runs = max(map(len, settings))
  if any(len(x) not in (1, runs) for x in settings):
    raise SystemExit("--page_size, --prompts_in_flight, --chunk_prompts and --decode_attention: lists of one "
                     "length (or one value)")
  for ps, pif, cp, att in zip(*(x * runs if len(x) == 1 else x for x in settings)):
    sc = dataclasses.replace(base, kv_cache="paged", page_size=ps, prompts_in_flight=pif, chunk_prompts=cp,
                             decode_attention=att)
    _, warmup_s = warm_up(config, params, batch, sc, key, tau, warm_budgets)
    r, row = run_engine(config, params, batch, sc, key, tau, budgets, warmup_s=warmup_s, t_prompt=t_prompt)
    for f in ("tokens", "length", "parent", "fork_pos"):
      np.testing.assert_array_equal(getattr(r, f), getattr(ref, f), err_msg=f"paged {f} differ from dense")
    row["max_logprob_diff"] = float(np.abs(r.logprobs - ref.logprobs)[ref.mask].max(initial=0.0))
    results.append(row)
  for row in results:
    row["speedup"] = row["tokens_per_s"] / results[0]["tokens_per_s"]
    row["cpu_speedup"] = row["tokens_per_cpu_s"] / results[0]["tokens_per_cpu_s"]

  forked = ref.parent >= 0
  fork_at = np.percentile(ref.fork_pos[forked], [0, 50, 100]).astype(int).tolist() if forked.any() else "-"
  print(f"\npreset {args.preset}: {jax.devices()[0].platform}, {n_params / 1e6:.0f}M parameters ({p['layers']} layers "
        f"x {p['hidden']}, {p['heads']} heads, {p['kv']} KV heads, MLP {p['mlp']}, vocab {p['vocab']}, untied head), "
        f"{p['dtype']}; {p['prompts']} prompts x {p['prompt_len']} tokens, n = {N_ROOTS} + {BRANCHES} branch slots, "
        f"budgets {'/'.join(str(b) for b in sorted(set(budgets.tolist())))} cycled, no EOS")
  print(f"tau_high {tau:.4f} (quantile {args.quantile}): {int(forked.sum())} forks of {p['prompts'] * BRANCHES} "
        f"branch slots, at response positions {fork_at} (min, median, max); weights read per decode iteration "
        f"{weight_mb:.0f} MB")
  print("| engine | page / in flight / chunk / attention | warm-up s | wall s (CPU s) | prefill s | decode iterations "
        "| ms / iteration (CPU ms) | generated tokens | tokens/s (per CPU s) | KV MB / iteration | vs dense (CPU) |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for row in results:
    chunk = row["chunk_prompts"] or p["prompts"]
    setting = (f"- / {row['groups_in_flight']} / {chunk} / -" if row["engine"] == "dense" else
               f"{row['page_size']} / {row['groups_in_flight']} / {chunk} / {row['decode_attention']}")
    print(f"| {row['engine']} | {setting} | {row['warmup_s']:.1f} | {row['wall_s']:.1f} ({row['cpu_s']:.1f}) | "
          f"{row['prefill_s']:.1f} | {row['iterations']} | {row['ms_per_iteration']:.1f} "
          f"({row['cpu_ms_per_iteration']:.1f}) | {row['tokens']} | {row['tokens_per_s']:.1f} "
          f"({row['tokens_per_cpu_s']:.1f}) | {row['kv_mb_per_iteration']:.0f} | {row['speedup']:.2f}x "
          f"({row['cpu_speedup']:.2f}x) |")
  print(f"paged and dense sampled the same tokens, lengths and forks; max |log-prob difference| "
        f"{max(row['max_logprob_diff'] for row in results[1:]):.1e}")
  out = dict(preset=args.preset, model=p, parameters=int(n_params), weight_mb_per_iteration=weight_mb, tau_high=tau,
             budgets=budgets.tolist(), platform=jax.devices()[0].platform, results=results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == "__main__":
  main()
