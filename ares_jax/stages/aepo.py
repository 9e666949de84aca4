"""Stage `aepo`: the RL loop of ARES (design.md 5), top to bottom.

data -> sampling.generate (tau_high of the previous batch; a warm-up batch first) -> grading ->
tau, N_HE, bins, targets, lambda -> online filter -> advantages and KL weights -> old/reference
log-probs -> PPO epochs of mini-batches of micro-batches -> metrics -> checkpoint.
The tiny config first runs a short supervised warm start on programmatic traces so that pass rates
span easy, medium and hard; its result is also the reference policy.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ares_jax import aepo, models, sampling, sharding
from ares_jax.stages import setup
from ares_jax.stages.evaluation import evaluate
from ares_jax.stages.aepo_batch import shape_batch
from ares_jax.train import optimizer as optim_lib
from ares_jax.train.checkpoint import Checkpointer
from ares_jax.train.metrics import MetricsWriter, plot_curves
from ares_jax.train.sequences import pack, prompt_batch, response_logprobs, score
from ares_jax.train.state import TrainState
from ares_jax.train.update import Updater


def aepo_loss_fn(model_config: models.ModelConfig):
  def loss(params, arrays, static):
    prompt_width, temperature, clip_low, clip_high, dual_clip, loss_agg = static
    logp = response_logprobs(model_config, params, arrays["input_ids"], arrays["attention_mask"],
                             arrays["positions"], arrays["vision"], prompt_width, temperature)
    return aepo.aepo_loss(logp, arrays["old_logp"], arrays["ref_logp"], arrays["adv"], arrays["loss_mask"],
                          arrays["weights"], clip_low, clip_high, dual_clip, loss_agg)
  return loss


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  b = setup.build(config)
  mesh, mcfg, tok, params, pad_id = b.mesh, b.mcfg, b.tokenizer, b.params, b.pad_id
  train_stream = setup.prompt_stream(config, b.processor, 0)
  eval_stream = setup.prompt_stream(config, b.processor, 1)
  a, r_cfg = config.aepo, config.rollout
  sc = setup.sampling_config(config, tok, mcfg)
  tx = optim_lib.make_optimizer(config.optim, config.total_steps)
  loss_fn = aepo_loss_fn(mcfg)
  updater = Updater(loss_fn, tx)
  ckpt = Checkpointer(os.path.join(config.workdir, "checkpoints"))
  grader = setup.build_grader(config)

  start = ckpt.latest_step()
  if start is None:
    if config.warm_start.steps > 0:
      params = setup.warm_start(config, mcfg, params, train_stream, pad_id, tok)
    ref_params = jax.tree.map(jnp.copy, params)  # own buffers: updates donate the policy's
    state = sharding.replicate_rest(TrainState.create(params, tx, jax.random.key(config.seed)), mesh)
    meta = {"data_position": 0}
    ckpt.save(0, {"state": state, "ref": ref_params}, meta)
    start = 0
  else:
    template = {"state": sharding.replicate_rest(TrainState.create(params, tx, jax.random.key(config.seed)), mesh),
                "ref": params}
    restored, meta = ckpt.restore(template, start)
    state, ref_params = restored["state"], restored["ref"]
    logging.info("resumed from step %d (data position %d)", start, meta["data_position"])
  writer = MetricsWriter(config.workdir, resume_step=start if start > 0 else None)
  position = int(meta["data_position"])
  static = (None, r_cfg.temperature, a.clip_low, a.clip_high, a.dual_clip or None, a.loss_agg)
  history = []
  held_out = lambda params: evaluate(mcfg, params, eval_stream, grader, tok, sc, config.eval.prompts,
                                     jax.random.key(1), config.eval.samples)
  if start == 0 and config.eval.every > 0:
    history.append(writer.write(0, held_out(state.params)))
  for step in tqdm(range(start + 1, config.total_steps + 1), desc="aepo", initial=start, total=config.total_steps):
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    t0 = time.perf_counter()
    exs, position = train_stream.take(position, r_cfg.prompts_per_step)
    batch = prompt_batch([e.prompt for e in exs], pad_id)
    tau_prev = float(state.stats["tau_high"])
    if not np.isfinite(tau_prev):  # warm-up batch: sets tau_high, no branching
      warm = sampling.generate(mcfg, state.params, batch, sc, jax.random.fold_in(key, 7))
      tau_prev = float(aepo.entropy_threshold(warm.entropy, warm.mask, a.entropy_quantile))
    rollouts = sampling.generate(mcfg, state.params, batch, sc, key, tau_high=tau_prev)
    t1 = time.perf_counter()
    used, texts = rollouts.texts(tok)
    grades = grader.grade(texts, [exs[i].answer for i in rollouts.prompt_index[used]])
    acc = np.zeros(len(rollouts.length), np.float32)
    fmt = np.zeros_like(acc)
    acc[used], fmt[used] = grades.accuracy, grades.format
    t2 = time.perf_counter()
    shaped = shape_batch(rollouts, acc, fmt, a, float(state.stats["tau_high"]), np.asarray(state.stats["target_ema"]))
    state = sharding.replicate_rest(state.replace(stats={
        "tau_high": np.float32(shaped.tau_high), "target_ema": np.asarray(shaped.ema_state, np.float32)}), mesh)
    metrics = dict(shaped.metrics, **{"grading/timeouts": grades.timeouts, "grading/errors": grades.errors,
                                      "data/skipped": sum(train_stream.skipped.values())})
    rows = np.flatnonzero(shaped.train)
    if len(rows):
      state, upd = ppo_update(mcfg, state, ref_params, updater, rollouts, shaped, rows, exs, config, static, step,
                              pad_id, sc.max_new_tokens)
      metrics.update(upd)
    t3 = time.perf_counter()
    metrics.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                    "skipped_updates": float(state.skipped)})
    if config.eval.every > 0 and step % config.eval.every == 0:
      metrics.update(held_out(state.params))
    history.append(writer.write(step, metrics))
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      ckpt.save(step, {"state": state, "ref": ref_params}, {"data_position": position})
  grader.close()
  writer.close()
  ckpt.close()
  logging.info("curves: %s", plot_curves(config.workdir))
  return {"history": history, "skipped_rows": dict(train_stream.skipped)}


def ppo_update(mcfg, state, ref_params, updater, r, shaped, rows, exs, config, static, step, pad_id, width):
  """Old and reference log-probs, then PPO epochs over shuffled mini-batches of `rows`.

  Every micro-batch is padded to `micro_batch_size` rows (copies of its first row with an empty
  loss mask), so the jitted scoring and gradient programs compile once instead of once per size.
  """
  a = config.aepo
  mb = a.micro_batch_size
  prompts = [exs[r.prompt_index[s]].prompt for s in rows]
  responses = [r.response(s) for s in rows]
  packs = {}

  def packed(idx):  # idx: positions into `rows`, padded to mb with idx[0]
    k = tuple(idx)
    if k not in packs:
      full = list(idx) + [idx[0]] * (mb - len(idx))
      packs[k] = pack(mcfg, [prompts[i] for i in full], [responses[i] for i in full], pad_id,
                      response_width=width)
    return packs[k]

  def padded(x, n):
    return np.concatenate([x, np.repeat(x[:1], mb - n, axis=0)]) if n < mb else x

  old, ref = np.zeros((len(rows), width), np.float32), np.zeros((len(rows), width), np.float32)
  for i in range(0, len(rows), mb):
    idx = list(range(i, min(i + mb, len(rows))))
    p = packed(idx)
    args = (p.input_ids, p.attention_mask, p.positions, p.vision, p.prompt_width, static[1])
    old[idx] = np.asarray(sharding.to_host(score(mcfg, state.params, *args)))[:len(idx)]
    ref[idx] = np.asarray(sharding.to_host(score(mcfg, ref_params, *args)))[:len(idx)]
  loss_mask = shaped.loss_mask[rows]
  metrics: dict[str, float] = {}
  n_updates = 0
  rng = np.random.default_rng([config.seed, step])
  for _ in range(config.ppo_epochs):
    order = rng.permutation(len(rows))
    for lo in range(0, len(rows), a.global_batch_size):
      mini = order[lo:lo + a.global_batch_size]
      tokens = loss_mask[mini].sum()
      micro = []
      for j in range(0, len(mini), mb):
        idx = sorted(mini[j:j + mb].tolist())
        n = len(idx)
        p = packed(idx)
        mask = np.zeros((mb, width), bool)
        mask[:n] = loss_mask[idx]
        arrays = dict(input_ids=p.input_ids, attention_mask=p.attention_mask, positions=p.positions,
                      vision=p.vision, old_logp=padded(old[idx], n), ref_logp=padded(ref[idx], n),
                      adv=padded(shaped.adv[rows[idx]], n), loss_mask=mask,
                      weights=padded(shaped.kl_weights[rows[idx]], n))
        share = (mask.sum() / max(tokens, 1) if a.loss_agg == "token_mean" else n / len(mini))
        micro.append((arrays, (p.prompt_width,) + static[1:], float(share)))
      state, m = updater.update(state, micro)
      n_updates += 1
      for k, v in m.items():
        metrics[k] = metrics.get(k, 0.0) + v
  return state.replace(step=state.step + 1), {k: v / max(n_updates, 1) for k, v in metrics.items()}
