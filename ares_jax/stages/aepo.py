"""Stage `aepo`: the RL loop of ARES (design.md 5), top to bottom.

data -> sampling.generate (tau_high of the previous batch; a warm-up batch first) -> grading ->
tau, N_HE, bins, targets, lambda -> online filter -> advantages and KL weights -> old/reference
log-probs -> PPO epochs of mini-batches of micro-batches -> metrics -> checkpoint.
The tiny config first runs a short supervised warm start on programmatic traces so that pass rates
span easy, medium and hard; its result is also the reference policy (kept in `aepo.ref_dtype`; a LoRA
policy's reference is its base with the adapters off, so nothing is kept).
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ares_jax import aepo, sampling, sharding
from ares_jax.data.batching import prompt_batch
from ares_jax.data.tokenizer import word_token_table
from ares_jax.models import lora
from ares_jax.stages import policy as policy_lib
from ares_jax.stages import setup
from ares_jax.evaluation.held_out import evaluate
from ares_jax.stages import evaluate as eval_stage
from ares_jax.stages.aepo_batch import shape_batch
from ares_jax.train import aepo_update
from ares_jax.train import optimizer as optim_lib
from ares_jax.train.aepo_update import LossSettings, UpdateRows
from ares_jax.train import run_control
from ares_jax.train.checkpoint import Checkpointer, CheckpointSettings, restore_template
from ares_jax.train.metrics import MetricsWriter, plot_curves
from ares_jax.train.state import TrainState
from ares_jax.train.update import Updater


def restore_reference(config: ml_collections.ConfigDict, ckpt: Checkpointer, params: Any) -> Any:
  """The reference policy saved at step 0. When it is missing it is rebuilt from the starting policy if that
  is rebuilt the same way (`model.hf_path`, or the seed's initialisation), else the run stops in one line."""
  template = aepo_update.reference_template(params, config.aepo.ref_dtype)
  if ckpt.has("reference"):
    return ckpt.restore_once("reference", template)
  where = f"{ckpt.directory}/reference"
  if policy_lib.warm_start_due(config):
    raise FileNotFoundError(f"{where} is missing: the reference policy (this run's warm-started policy of step 0) "
                            "cannot be rebuilt; put that folder back or start fresh (a new --config.workdir)")
  logging.warning("%s is missing: rebuilt from the starting policy (%s) and saved again", where,
                  config.model.hf_path or f"initialisation from seed {config.seed}")
  ref_params = aepo_update.reference_copy(params, config.aepo.ref_dtype)
  ckpt.save_once("reference", ref_params)
  return ref_params


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  b = setup.build(config)
  mesh, mcfg, tok, params, pad_id = b.mesh, b.mcfg, b.tokenizer, b.params, b.pad_id
  train_stream = setup.prompt_stream(config, b.processor, 0)
  eval_stream = setup.prompt_stream(config, b.processor, 1)
  a, r_cfg = config.aepo, config.rollout
  sc = setup.sampling_config(config, tok, mcfg)
  # A LoRA policy trains its adapters only; its reference is the base (adapters off): no copy is kept.
  adapted = mcfg.lora.enabled
  updater = Updater(aepo_update.aepo_loss_fn(mcfg), optim_lib.make_optimizer(config.optim, config.total_steps),
                    params, lora.frozen_names(params), dropout=lora.uses_dropout(mcfg))
  cs = CheckpointSettings.from_config(config)
  ckpt = Checkpointer.from_settings(os.path.join(config.workdir, "checkpoints"), cs, adapters_only=adapted)
  grader = setup.build_grader(config)
  params = policy_lib.starting_params(
      config, ckpt, params, lambda p: setup.warm_start(config, mcfg, p, train_stream, pad_id, tok))

  # The newest readable checkpoint (an unreadable one is reported and the one before it used); the reference
  # policy never changes, so it is saved once beside the step checkpoints.
  restored = ckpt.restore_latest(restore_template(updater, params, mesh, ckpt))
  if restored is None:
    ref_params = None if adapted else aepo_update.reference_copy(params, a.ref_dtype)
    state = sharding.replicate_rest(updater.init_state(params, jax.random.key(config.seed)), mesh)
    meta = {"data_position": 0}
    if not adapted:
      ckpt.save_once("reference", ref_params)
    ckpt.save(0, state, meta)
    start = 0
  else:
    start, state, meta = restored
    ref_params = None if adapted else restore_reference(config, ckpt, params)
    logging.info("resumed from %s (data position %d)", ckpt.path_of(start), meta["data_position"])
  # rollout.chunk_prompts=0: the largest chunk whose rollout fits beside the optimizer state and reference
  sc = setup.chunked(config, b, sc, r_cfg.prompts_per_step, (state.opt_state, ref_params))
  writer = MetricsWriter(config.workdir, resume_step=start if start > 0 else None)
  position = int(meta["data_position"])
  settings = LossSettings.from_config(config)
  triggers = word_token_table(tok, a.trigger_words) if a.trigger_words else None  # design.md 5.3
  history = []
  bench = (eval_stage.BenchmarkRunner(config, b, eval_stage.decode_config(config, sc))
           if config.eval.benchmarks else None)

  def held_out(params, step: int) -> dict[str, float]:
    out = evaluate(mcfg, params, eval_stream, grader, tok, sc, config.eval.prompts, jax.random.key(1),
                   config.eval.samples)
    if bench is not None:  # eval.benchmarks too; their files in {workdir}/eval/step_<step>/
      out.update(eval_stage.metrics(bench(params, os.path.join(eval_stage.eval_dir(config), f"step_{step}"))))
    return out

  if start == 0 and config.eval.every > 0:
    history.append(writer.write(0, held_out(state.params, 0)))
  stop = run_control.StopRequests(cs.preemption, "aepo")  # SIGTERM / JAX's preemption notice
  guard = run_control.SkipGuard(a.max_skipped_updates)

  def close() -> None:  # the last asynchronous checkpoint write is complete once this returns
    for part in (stop, bench, grader, writer, ckpt):
      if part is not None:
        part.close()

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
    shaped = shape_batch(rollouts, acc, fmt, a, float(state.stats["tau_high"]), np.asarray(state.stats["target_ema"]),
                         triggers)
    state = sharding.replicate_rest(state.replace(stats={
        "tau_high": np.float32(shaped.tau_high), "target_ema": np.asarray(shaped.ema_state, np.float32)}), mesh)
    metrics = dict(shaped.metrics, **{"grading/timeouts": grades.timeouts, "grading/errors": grades.errors,
                                      "data/skipped": sum(train_stream.skipped.values())})
    rows = UpdateRows.from_rollouts(mcfg, rollouts, shaped, [e.prompt for e in exs], a.micro_batch_size,
                                    sc.max_new_tokens, pad_id)
    if len(rows):
      state, upd = ppo_update(state, ref_params, updater, rows, settings, config, step, guard)
      metrics.update(upd)
    t3 = time.perf_counter()
    metrics.update({"time/rollout": t1 - t0, "time/reward": t2 - t1, "time/update": t3 - t2,
                    "skipped_updates": float(state.skipped)})
    if config.eval.every > 0 and step % config.eval.every == 0:
      metrics.update(held_out(state.params, step))
    history.append(writer.write(step, metrics))
    if guard.tripped:  # updates skipped as non-finite aepo.max_skipped_updates times in a row
      close()
      raise guard.error(step, ckpt.latest_step())
    preempted = stop.should_stop(step)  # the same answer on every process
    if preempted or step % cs.every == 0 or step == config.total_steps:
      ckpt.save(step, state, {"data_position": position})
    if preempted:
      close()
      raise run_control.Preempted("aepo", step, str(ckpt.path_of(step)))
    if config.export_every > 0 and step % config.export_every == 0 and step != config.total_steps:
      policy_lib.export(config, mcfg, state.params, tok)
  policy_lib.export(config, mcfg, state.params, tok)
  close()
  logging.info("curves: %s", plot_curves(config.workdir))
  return {"history": history, "skipped_rows": dict(train_stream.skipped)}


def ppo_update(state: TrainState, ref_params, updater: Updater, rows: UpdateRows, settings: LossSettings,
               config: ml_collections.ConfigDict, step: int,
               guard: run_control.SkipGuard | None = None) -> tuple[TrainState, dict[str, float]]:
  """Old and reference log-probs, then PPO epochs over shuffled mini-batches (one optimizer update
  each) of micro-batches; metrics are the mean over the updates; `guard` sees every update's skip flag."""
  old, ref = aepo_update.old_and_ref_logprobs(rows, state.params, ref_params, settings.temperature)
  updates = []
  shuffle = np.random.default_rng([config.seed, step])
  for mini in aepo_update.mini_batches(len(rows), config.aepo.global_batch_size, config.ppo_epochs, shuffle):
    state, m = updater.update(state, aepo_update.micro_batches(rows, mini, old, ref, settings))
    if guard is not None:
      guard.observe(m["update_skipped"])
    updates.append(m)
  return state.replace(step=state.step + 1), {k: float(np.mean([m[k] for m in updates])) for k in updates[0]}
