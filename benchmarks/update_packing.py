"""The three update-row layouts of `train.packing` in one run, same weights and batch: "none" (one padded row per
trajectory: the prompt region as wide as the micro-batch's longest prompt, every response `--budget` wide, the
prompt and its image once per trajectory), "packed" (prompt + response sequences end to end in rows of
`row_tokens`) and "shared_prompt" (each prompt once per group, its responses after it), at the sizes the
config's defaults give (rows of the longest prompt + response, micro-batches of `micro_rows` such rows; a
shared_prompt row `row_fill.sequences_per_row` of them). Each layout runs what
an AEPO step runs on its trajectories: old and reference log-probs (`aepo.step.old_and_ref_logprobs`) and one
optimizer update over all of them (`micro_batches` + `Updater.update`). The benchmark asserts that they all
give the same log-probs and loss.

A fourth row, "none_mixed", is the padded layout as updates ran before packing: mini-batches were cut from
trajectories in a shuffled order, so a micro-batch mixed prompts and padded each to the longest of them
(today's mini-batches hold whole groups, which the padded layout profits from too).

Workload, like an ARES step: `--prompts` prompts of 256-1,024 tokens (every third with an image of 64 merged
tokens), 8 responses each of 10-100% of `--budget` tokens, drawn from a fixed seed.

  python benchmarks/update_packing.py                # CPU: ~40M Qwen2-style fp32, 6 prompts x 8, budget 512
  python benchmarks/update_packing.py --preset=gpu   # ~1.5B bf16, 32 prompts x 8, budget 1024 (GPU, when lent)

Columns: computed = token positions the programs run (rows x row width, padding included); needed = what the
layout must compute at the least (every trajectory's prompt + response; shared_prompt: each prompt once +
the responses); score s = old + reference log-probs; update s = the optimizer update (gradient micro-steps +
apply); seconds = their sum, the best of `--repeats` timed passes after a pass that compiles; tokens/s = the
tokens that count (each prompt once + the responses) / seconds; vs none, vs none_mixed = that padded layout's
seconds / this layout's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ares_jax import models  # noqa: E402
from ares_jax.aepo import step as aepo_step  # noqa: E402
from ares_jax.data.batching import Prompt  # noqa: E402
from ares_jax.models.config import ModelConfig, TextConfig, VisionConfig  # noqa: E402
from ares_jax.train import optimizer as optim_lib  # noqa: E402
from ares_jax.train import row_fill  # noqa: E402
from ares_jax.train.packing import PackingSettings  # noqa: E402
from ares_jax.train.update import Updater  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=512, layers=6, heads=8, kv=2, mlp=1408, vocab=16384, mrope=(8, 12, 12), dtype="float32",
                prompts=6, budget=512, micro_rows=8),
    "gpu": dict(hidden=1536, layers=28, heads=12, kv=2, mlp=8960, vocab=151936, mrope=(16, 24, 24),
                dtype="bfloat16", prompts=32, budget=1024, micro_rows=8),
    # the smoke test's size (tests/test_benchmarks.py)
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, mlp=128, vocab=512, mrope=(2, 3, 3), dtype="float32",
                 prompts=3, budget=32, micro_rows=4),
}
N = 8  # responses per prompt
LAYOUTS = ("none", "none_mixed", "packed", "shared_prompt")


def model_config(p: dict) -> ModelConfig:
  v = p["vocab"]
  return ModelConfig(
      text=TextConfig(vocab_size=v, hidden_size=p["hidden"], intermediate_size=p["mlp"], num_layers=p["layers"],
                      num_heads=p["heads"], num_kv_heads=p["kv"], mrope_section=p["mrope"]),
      vision=VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=p["hidden"],
                          fullatt_block_indexes=(0,)),
      image_token_id=v - 10, video_token_id=v - 9, vision_start_token_id=v - 8, vision_end_token_id=v - 7,
      dtype=p["dtype"], param_dtype=p["dtype"])


def workload(mcfg: ModelConfig, prompts: int, budget: int, tiny: bool, seed: int = 0):
  """Prompts of 256-1,024 tokens (tiny: 8-24), every third with a 16 x 16-patch image; N responses each of
  10-100% of the budget."""
  rng = np.random.default_rng(seed)
  lo, hi = (8, 24) if tiny else (256, 1024)
  out, responses = [], []
  for g in range(prompts):
    length = int(rng.integers(lo, hi + 1))
    ids = rng.integers(5, mcfg.text.vocab_size - 20, length).astype(np.int32)
    if g % 3 == 1:
      side = 4 if tiny else 16
      merged = side * side // 4
      ids[1:merged + 3] = [mcfg.vision_start_token_id] + [mcfg.image_token_id] * merged + [mcfg.vision_end_token_id]
      pixels = rng.normal(size=(side * side, mcfg.vision.patch_dim)).astype(np.float32)
      out.append(Prompt(ids, pixels, np.array([[1, side, side]])))
    else:
      out.append(Prompt(ids))
    for _ in range(N):
      n = max(1, int(round(budget * rng.uniform(0.1, 1.0))))
      responses.append(rng.integers(5, mcfg.text.vocab_size - 20, n).astype(np.int32))
  return out, np.repeat(np.arange(prompts), N), responses


def run_layout(mcfg, params, prompts, group, responses, budget, layout, micro_rows, repeats):
  """Times `layout` on the batch; returns (its best pass's numbers, old log-probs [n, budget] in the batch's
  order)."""
  order = np.arange(len(responses))
  if layout == "none_mixed":  # the trajectories in a shuffled order, as mini-batches were cut before packing
    layout, order = "none", np.random.default_rng(1).permutation(len(responses))
    group, responses = group[order], [responses[i] for i in order]
  # sizes as `PackingSettings.from_config` resolves the config's zeros: a micro-batch holds `micro_rows` rows of
  # the longest prompt + response; a packed row one of them, a shared_prompt row `sequences_per_row` of them
  longest = -(-(max(len(p.ids) for p in prompts) + budget) // 128) * 128
  shared = min(micro_rows, row_fill.sequences_per_row(mcfg.text, longest))
  row = shared * longest if layout == "shared_prompt" else longest
  packing = PackingSettings(packing=layout, row_tokens=row, tokens_per_micro_batch=micro_rows * longest,
                            micro_batch_size=micro_rows)
  n = len(responses)
  mask = np.arange(budget)[None] < np.array([len(r) for r in responses])[:, None]
  adv = np.where(order % 2 == 0, 1.0, -1.0).astype(np.float32)  # by trajectory, whatever the order
  settings = aepo_step.LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=None,
                                    loss_agg="token_mean")
  updater = Updater(aepo_step.aepo_loss_fn(mcfg), optim_lib.make_optimizer(optim_lib.OptimSettings(lr=1e-6), 10),
                    params)

  def once():
    state = updater.init_state(jax.tree.map(jnp.copy, params), jax.random.key(0))  # the update donates it
    rows = aepo_step.UpdateRows(mcfg, prompts, group, responses, adv, mask, np.full(mask.shape, 1e-2, np.float32),
                                packing, budget, 0)
    t0 = time.perf_counter()
    old, ref = aepo_step.old_and_ref_logprobs(rows, params, params, 1.0)
    t1 = time.perf_counter()
    micro = aepo_step.micro_batches(rows, np.arange(n), old, ref, settings)
    _, m = updater.update(state, micro)
    t2 = time.perf_counter()
    computed = sum(r.tokens()[0] for r in rows.layout(range(n)))
    # what the layout must compute at the least: every sequence's prompt + response, or each prompt once
    copies = np.unique(group) if layout == "shared_prompt" else group
    needed = sum(len(r) for r in responses) + sum(len(prompts[g].ids) for g in copies)
    return dict(score_s=t1 - t0, update_s=t2 - t1, seconds=t2 - t0, computed=computed, needed=needed,
                micro_batches=len(micro), rows=sum(r.inputs.ids.shape[0] for r in rows.layout(range(n))), loss=m["loss"]), old

  first, old = once()  # compiles
  timed = [once()[0] for _ in range(repeats)]
  best = min(timed, key=lambda r: r["seconds"])
  best.update(row_tokens=row if layout != "none" else None, compile_pass_s=first["seconds"])
  unshuffled = np.empty_like(old)
  unshuffled[order] = old
  return best, unshuffled


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
  ap.add_argument("--prompts", type=int, help="prompts (groups of 8 responses)")
  ap.add_argument("--budget", type=int, help="max response tokens")
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--json", help="also write the results here")
  args = ap.parse_args(argv)
  p = dict(PRESETS[args.preset])
  prompts_n, budget = args.prompts or p["prompts"], args.budget or p["budget"]
  mcfg = model_config(p)
  params = jax.device_put(models.init_params(mcfg, jax.random.key(0)), jax.devices()[0])
  prompts, group, responses = workload(mcfg, prompts_n, budget, args.preset == "tiny")
  resp_tokens = sum(len(r) for r in responses)
  count = sum(len(p.ids) for p in prompts) + resp_tokens
  results, logps = [], {}
  for layout in LAYOUTS:
    r, logps[layout] = run_layout(mcfg, params, prompts, group, responses, budget, layout, p["micro_rows"],
                                  args.repeats)
    results.append(dict(r, layout=layout))
  mask = np.arange(budget)[None] < np.array([len(x) for x in responses])[:, None]
  diff = max(float(np.abs(logps[k] - logps["none"])[mask].max()) for k in LAYOUTS)
  losses = [r["loss"] for r in results]
  tol = 1e-4 if p["dtype"] == "float32" else 5e-2
  assert diff < tol, f"layouts disagree: max |log-prob diff| {diff}"
  assert max(losses) - min(losses) < tol * max(1.0, abs(losses[0])), f"layouts disagree: losses {losses}"

  base, mixed = results[0]["seconds"], results[1]["seconds"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"\npreset {args.preset}: {jax.devices()[0].platform}, {n_params / 1e6:.0f}M parameters ({p['layers']} "
        f"layers, {p['hidden']} wide, {p['dtype']}); {prompts_n} prompts x {N} responses, budget {budget}: "
        f"{count:,} tokens that count (each prompt once + responses), {resp_tokens:,} response tokens\n")
  print("| layout | row tokens | rows (micro-batches) | computed | computed / needed | score s | update s | "
        "seconds | tokens/s | vs none | vs none_mixed |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in results:
    print(f"| {r['layout']} | {r['row_tokens'] or '-'} | {r['rows']} ({r['micro_batches']}) | {r['computed']:,} | "
          f"{r['computed'] / r['needed']:.2f} | {r['score_s']:.1f} | {r['update_s']:.1f} | {r['seconds']:.1f} | "
          f"{count / r['seconds']:,.0f} | {base / r['seconds']:.2f}x | {mixed / r['seconds']:.2f}x |")
  print(f"\nsame numbers: max |log-prob diff| vs none {diff:.2g}; losses {', '.join(f'{x:.6g}' for x in losses)}")
  out = dict(preset=args.preset, model=p, parameters=int(n_params), prompts=prompts_n, responses_per_prompt=N,
             budget=budget, tokens_that_count=count, response_tokens=resp_tokens, max_logprob_diff=diff,
             results=results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
