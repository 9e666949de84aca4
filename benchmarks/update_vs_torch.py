"""One training step (forward + backward + clipped AdamW) of ares_jax's update path against PyTorch.

CPU preset (the issue's setting): a randomly initialised ~122M Qwen2-style text model (hidden 768,
12 layers, 12 heads, 2 KV heads, MLP 2048, vocab 32000, untied head), batch 4 x 256 tokens, fp32,
best of `--repeats` after one warm-up (compile) call each:

  (a) torch: transformers' Qwen2ForCausalLM, cross-entropy, backward, clip_grad_norm_ + AdamW;
  (b) jax, plain: the project's Flax model, cross-entropy + the project's optimizer (global-norm clip +
      optax AdamW) in one jitted program, parameters and optimizer state donated;
  (c) ares_jax Updater with the AEPO loss: one compiled micro-step (value-and-grad, accumulation) and
      the compiled apply (finite check, clip + AdamW, skip guard), metrics read back to the host.

Ratios are to (b): what the update path's structure (two programs, accumulator, guard, AEPO loss)
costs over the simplest fused step.

  python benchmarks/update_vs_torch.py
  python benchmarks/update_vs_torch.py --layers=2 --repeats=1   # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def time_it(fn, repeats: int) -> tuple[float, float]:
  """Best wall-clock and best process CPU seconds (all threads) of `repeats` calls after a warm-up. CPU
  seconds count work, not waiting: the steadier number on a machine shared with other jobs."""
  fn()  # warm-up: compiles / allocates
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return min(wall), min(cpu)


def torch_step_s(p, ids: np.ndarray, repeats: int) -> tuple[tuple[float, float], int]:
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM
  torch.set_num_threads(p.threads)
  torch.manual_seed(0)
  cfg = Qwen2Config(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.mlp, num_hidden_layers=p.layers,
                    num_attention_heads=p.heads, num_key_value_heads=p.kv, tie_word_embeddings=False,
                    rope_theta=1e6, bos_token_id=0, eos_token_id=1, pad_token_id=2)
  model = Qwen2ForCausalLM(cfg).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=1e-2)
  x = torch.tensor(ids, dtype=torch.long)
  n = sum(q.numel() for q in model.parameters())

  def step():
    logits = model(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, p.vocab).float(), x[:, 1:].reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  t = time_it(step, repeats)
  del model, opt
  return t, n


def model_config(p):
  from ares_jax import models
  half = p.hidden // p.heads // 2
  text = models.TextConfig(vocab_size=p.vocab, hidden_size=p.hidden, intermediate_size=p.mlp, num_layers=p.layers,
                           num_heads=p.heads, num_kv_heads=p.kv,
                           mrope_section=(half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8))
  vision = models.VisionConfig(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=p.hidden,
                               fullatt_block_indexes=(0,))
  return models.ModelConfig(text=text, vision=vision, image_token_id=p.vocab - 4, video_token_id=p.vocab - 3,
                            vision_start_token_id=p.vocab - 2, vision_end_token_id=p.vocab - 1, bos_token_id=0,
                            eos_token_id=1)


def jax_steps_s(p, ids: np.ndarray, repeats: int):
  import jax
  import jax.numpy as jnp
  import optax
  from ares_jax import models
  from ares_jax.train import optimizer as optim_lib
  from ares_jax.aepo.step import AepoBatch, LossSettings, aepo_loss_fn
  from ares_jax.train.sequences import score_tokens, scored_logits
  from ares_jax.train.update import MicroBatch, Updater

  mcfg = model_config(p)
  optim = optim_lib.OptimSettings(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2, grad_clip=1.0)
  tx = optim_lib.make_optimizer(optim, 100)
  mask = np.ones_like(ids)
  positions, _ = models.mrope_positions(ids, mask, None, mcfg)
  # committed to the device, as a run's parameters are (an uncommitted input compiles a program of its own)
  fresh = lambda: jax.device_put(models.init_params(mcfg, jax.random.key(0)), jax.devices()[0])
  n = sum(x.size for x in jax.tree.leaves(fresh()))

  # (b) cross-entropy + optimizer in one program
  def ce(params, ids, mask, positions):
    logits = scored_logits(mcfg, params, models.ModelInputs(ids, positions, mask))[:, :-1].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1).mean()

  def plain_step(params, opt_state, ids, mask, positions):
    loss, grads = jax.value_and_grad(ce)(params, ids, mask, positions)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  plain_step = jax.jit(plain_step, donate_argnums=(0, 1))

  carry = [fresh()]
  carry.append(jax.device_put(tx.init(carry[0]), jax.devices()[0]))

  def run_plain():
    carry[0], carry[1], loss = plain_step(carry[0], carry[1], ids, mask, positions)
    return float(loss)

  plain = time_it(run_plain, repeats)
  del carry[:]

  # (c) the project's update path with the AEPO loss: responses are every token after the first
  params = fresh()
  settings = LossSettings(temperature=1.0, clip_low=0.2, clip_high=0.28, dual_clip=None, loss_agg="token_mean")
  inputs = models.ModelInputs(ids, positions, mask)
  b, t = ids.shape
  src = np.broadcast_to(np.maximum(np.arange(t) - 1, 0), (b, t)).astype(np.int32)
  old = score_tokens(mcfg, params, inputs, src, 1.0)
  scored = np.broadcast_to(np.arange(t) > 0, (b, t))  # every token after the first
  adv = np.broadcast_to(np.where(np.arange(b) % 2 == 0, 1.0, -1.0)[:, None], (b, t)).astype(np.float32)
  arrays = AepoBatch(inputs, src, old_logp=old, ref_logp=old, adv=adv, loss_mask=scored,
                     weights=np.full((b, t), 1e-2, np.float32), seq_weight=np.full((b, t), 1 / (t - 1), np.float32))
  updater = Updater(aepo_loss_fn(mcfg), tx, params)
  state = [updater.init_state(params, jax.random.key(0))]

  def run_updater():
    state[0], m = updater.update(state[0], [MicroBatch(arrays, settings, 1.0)])
    return m["loss"]

  project = time_it(run_updater, repeats)
  return plain, project, n


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--hidden", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--kv", type=int, default=2)
  ap.add_argument("--mlp", type=int, default=2048)
  ap.add_argument("--vocab", type=int, default=32000)
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--skip_torch", action="store_true")
  p = ap.parse_args()
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  ids = np.random.default_rng(0).integers(3, p.vocab - 8, size=(p.batch, p.length)).astype(np.int32)

  rows = []
  if not p.skip_torch:
    t, n_torch = torch_step_s(p, ids, p.repeats)
    rows.append(("(a) torch fwd+bwd+AdamW (transformers Qwen2ForCausalLM)", t))
  plain, project, n = jax_steps_s(p, ids, p.repeats)
  rows += [("(b) jax plain jitted step (CE + optax AdamW)", plain),
           ("(c) ares_jax Updater, AEPO loss (micro-step + apply)", project)]
  import jax
  print(f"\nmodel: {n / 1e6:.1f}M params (jax; torch {n_torch / 1e6:.1f}M)" if not p.skip_torch else
        f"\nmodel: {n / 1e6:.1f}M params", f"fp32, batch {p.batch} x {p.length} tokens, best of {p.repeats}, "
        f"{jax.devices()[0].platform} x{jax.device_count()}, {p.threads} torch threads")
  print(f"{'step':58s} {'seconds':>8s} {'vs (b)':>7s} {'CPU s':>7s} {'vs (b)':>7s}")
  for label, (wall, cpu) in rows:
    print(f"{label:58s} {wall:8.3f} {wall / plain[0]:6.2f}x {cpu:7.3f} {cpu / plain[1]:6.2f}x")


if __name__ == "__main__":
  main()
