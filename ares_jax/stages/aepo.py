"""Stage `aepo`: the RL loop of ARES (docs/design.md §5; the step: §2.3), top to bottom.

A step reads through these files, in this order, each once:

  1. data      ares_jax/data/prompts.py    PromptStream.take: the step's prompts (a resumable position)
  2. sampling  ares_jax/sampling/chunks.py generate: rollouts with exact entropy, window entropy and
                                           branching at high-window-entropy positions (tau_high of the
                                           previous batch; a warm-up batch first)
  3. rewards   ares_jax/data/grading.py    Grader.batch: accuracy and format of every answer, each group
                                           graded as it ends while the rest decode (`grade`)
  4. aepo      ares_jax/aepo/step.py       shape_batch (tau, N_HE, bins, rewards, advantages, filter, KL
                                           weights) -> UpdateRows -> ppo_update, on aepo/'s pure math
  5. update    ares_jax/train/update.py    Updater.update: accumulated micro-batch gradients, one AdamW step

then metrics (train/metrics.py) and a checkpoint (train/checkpoint.py); at the end `curves.png` (train/curves.py)
and the result table, printed (stages/results.py). The tiny config first runs a short
supervised warm start on programmatic traces so that pass rates span easy, medium and hard; its result is
also the reference policy (kept in `aepo.ref_dtype`; a LoRA policy's reference is its base with the
adapters off, so nothing is kept).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ares_jax import aepo, sampling, sharding
from ares_jax import settings as settings_lib
from ares_jax.aepo import step as aepo_step
from ares_jax.data.batching import prompt_batch
from ares_jax.data.grading import Grader, GradingBatch
from ares_jax.data.tokenizer import word_token_table
from ares_jax.evaluation.held_out import evaluate
from ares_jax.models import lora
from ares_jax.stages import evaluate as eval_stage
from ares_jax.stages import policy as policy_lib
from ares_jax.stages import results, setup
from ares_jax.train import optimizer as optim_lib
from ares_jax.train import run_control
from ares_jax.train.checkpoint import Checkpointer, restore_template
from ares_jax.train.curves import plot_curves
from ares_jax.train.metrics import MetricsWriter
from ares_jax.train.state import TrainState
from ares_jax.train.update import Updater


def run(config: ml_collections.ConfigDict, print_result: bool = True) -> dict[str, Any]:
  """The AEPO loop; ends by printing its held-out result table (stages/results.py) unless `print_result` is
  False (the `ares` stage prints one table for both halves)."""
  b = setup.build(config)
  mesh, mcfg, tok, pad_id = b.mesh, b.mcfg, b.tokenizer, b.pad_id
  train_stream = setup.prompt_stream(config, b.processor, 0)
  eval_stream = setup.prompt_stream(config, b.processor, 1)
  a, prompts_per_step = config.aepo, config.rollout.prompts_per_step
  shaping, loss, ppo = settings_lib.shaping(config), settings_lib.loss(config), settings_lib.ppo(config, mesh)
  cs = settings_lib.checkpoint(config)
  # A LoRA policy trains its adapters only; its reference is the base (adapters off): no copy is kept.
  adapted = mcfg.lora.enabled
  updater = Updater(aepo_step.aepo_loss_fn(mcfg), optim_lib.make_optimizer(settings_lib.optim(config),
                                                                           config.total_steps),
                    b.params, lora.frozen_names(b.params), dropout=lora.uses_dropout(mcfg))
  ckpt = Checkpointer.from_settings(os.path.join(config.workdir, "checkpoints"), cs, adapters_only=adapted)
  grader = setup.build_grader(config)
  params = policy_lib.starting_params(
      config, ckpt, b.params, lambda p: setup.warm_start(config, mcfg, p, train_stream, pad_id, tok))
  start, state, ref_params, position = _restore_or_start(config, updater, ckpt, params, mesh, adapted)
  # rollout.chunk_prompts=0: the largest chunk whose rollout fits beside the optimizer state and reference
  sc = setup.chunked(config, b, settings_lib.sampling(config, mcfg, pad_id), prompts_per_step,
                     (state.opt_state, ref_params))
  triggers = word_token_table(tok, a.trigger_words) if a.trigger_words else None  # docs/design.md §5.3
  writer = MetricsWriter(config.workdir, resume_step=start if start > 0 else None)
  bench = (eval_stage.BenchmarkRunner(config, b, eval_stage.decode_config(config, sc))
           if config.eval.benchmarks else None)

  def held_out(params, step: int) -> dict[str, float]:
    out = evaluate(mcfg, params, eval_stream, grader, tok, sc, prompts=config.eval.prompts, key=jax.random.key(1),
                   samples=config.eval.samples)
    if bench is not None:  # eval.benchmarks too; their files in {workdir}/eval/step_<step>/
      out.update(eval_stage.metrics(bench(params, os.path.join(eval_stage.eval_dir(config), f"step_{step}"))))
    return out

  history = []
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
    # 1-2. Prompts and rollouts.
    exs, position = train_stream.take(position, prompts_per_step)
    prompts, answers = [e.prompt for e in exs], [e.answer for e in exs]
    early = EarlyGrading(grader.batch(), answers, tok)  # 3 starts here: groups are graded as they end
    rollouts = rollout(mcfg, state, prompt_batch(prompts, pad_id), sc, key, shaping.entropy_quantile, early.on_done)
    t1 = time.perf_counter()
    # 3. Rewards: accuracy and format of every used slot (time/reward: the wait for what decoding did not hide).
    acc, fmt, grades = grade(grader, rollouts, answers, tok, early)
    t2 = time.perf_counter()
    # 4. AEPO statistics, rewards, advantages and KL weights; the next step's tau_high and target EMA.
    shaped = aepo_step.shape_batch(rollouts, acc, fmt, shaping, float(state.stats["tau_high"]),
                                   np.asarray(state.stats["target_ema"]), triggers)
    state = sharding.replicate_rest(state.replace(stats={
        "tau_high": np.float32(shaped.tau_high), "target_ema": np.asarray(shaped.ema_state, np.float32)}), mesh)
    metrics = dict(shaped.metrics, **{"grading/timeouts": grades.timeouts, "grading/errors": grades.errors,
                                      "data/skipped": sum(train_stream.skipped.values())})
    # 5. PPO updates on the kept trajectories.
    rows = aepo_step.UpdateRows.from_rollouts(mcfg, rollouts, shaped, prompts, ppo.packing,
                                              sc.max_new_tokens, pad_id)
    if len(rows):
      state, upd = aepo_step.ppo_update(state, ref_params, updater, rows, loss, ppo, step, guard)
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
    # Checkpoint; on a preemption request every process stops at this same step.
    preempted = stop.should_stop(step)
    if preempted or step % cs.every == 0 or step == config.total_steps:
      ckpt.save(step, state, {"data_position": position})
    if preempted:
      close()
      raise run_control.Preempted("aepo", step, str(ckpt.path_of(step)))
    if config.export_every > 0 and step % config.export_every == 0 and step != config.total_steps:
      policy_lib.export(config, mcfg, state.params, tok)
  policy_lib.export(config, mcfg, state.params, tok)
  close()
  curves = plot_curves(config.workdir, results.aepo_panels(config), results.AEPO_STEP)
  if print_result and sharding.is_primary():
    print(results.aepo_table(config, curves), flush=True)
  return {"history": history, "skipped_rows": dict(train_stream.skipped)}


def rollout(mcfg, state: TrainState, batch: dict, sc: sampling.SamplingConfig, key: jax.Array,
            entropy_quantile: float, on_done=None) -> sampling.Rollouts:
  """The step's rollouts, branching at windows above the previous batch's tau_high; the first step has no
  tau_high yet and takes it from a warm-up batch (which does not branch, and is not graded). `on_done`:
  `generate`'s, for the step's rollouts."""
  tau_prev = float(state.stats["tau_high"])
  if not np.isfinite(tau_prev):
    warm = sampling.generate(mcfg, state.params, batch, sc, jax.random.fold_in(key, 7))
    tau_prev = float(aepo.entropy_threshold(warm.entropy, warm.mask, entropy_quantile))
  return sampling.generate(mcfg, state.params, batch, sc, key, tau_high=tau_prev, on_done=on_done)


@dataclasses.dataclass(frozen=True)
class EarlyGrading:
  """A step's grading batch, fed by `generate`'s `on_done` (pass `on_done`) with each group of prompts as it
  ends, so the host grades while the device decodes the rest. Items are keyed by their slot in the step's
  rollouts."""

  batch: GradingBatch
  answers: list[str]
  tokenizer: Any
  slots: list[np.ndarray] = dataclasses.field(default_factory=list)  # the slots put, per group set

  def on_done(self, rows: np.ndarray, part: sampling.Rollouts) -> None:
    used, texts = part.texts(self.tokenizer)  # part's slots: row j // group, sample j % group
    group = len(part.length) // len(rows)
    prompt_rows = rows[part.prompt_index[used]]
    slots = prompt_rows * group + used % group  # the slot of the whole rollout (generate's numbering)
    self.slots.append(slots)
    self.batch.put(texts, [self.answers[r] for r in prompt_rows], keys=slots)


def grade(grader: Grader, rollouts: sampling.Rollouts, answers: list[str], tokenizer,
          early: EarlyGrading | None = None):
  """(accuracy [S], format [S], the grades): 0 for unused slots; the grades are in slot order.

  With `early` (whose `on_done` went to the `generate` that made `rollouts`) the used slots were put to the
  grader group by group as they ended, graded while the rest decoded: this only waits for what is left,
  which is all the step's `time/reward` measures. The result is what grading every used slot now gives: a
  grade is a pure function of (response, gold), and the batch returns its items in slot order."""
  used = np.flatnonzero(rollouts.used)
  if early is None:
    _, texts = rollouts.texts(tokenizer)
    batch = grader.batch()
    batch.put(texts, [answers[i] for i in rollouts.prompt_index[used]])
  else:
    put = np.sort(np.concatenate(early.slots)) if early.slots else np.zeros(0, np.int64)
    if not np.array_equal(put, used):
      raise RuntimeError(f"generate reported {len(put)} slots ({len(np.unique(put))} distinct) of its "
                         f"{len(used)} used ones to on_done: every group must be reported once")
    batch = early.batch
  grades = batch.result()
  acc = np.zeros(len(rollouts.length), np.float32)
  fmt = np.zeros_like(acc)
  acc[used], fmt[used] = grades.accuracy, grades.format
  return acc, fmt, grades


def _restore_or_start(config: ml_collections.ConfigDict, updater: Updater, ckpt: Checkpointer, params: Any,
                      mesh: jax.sharding.Mesh, adapted: bool) -> tuple[int, TrainState, Any, int]:
  """(start step, train state, reference policy, data position): from the newest readable checkpoint (an
  unreadable one is reported and the one before it used), else fresh, with the reference policy saved once
  beside the step checkpoints (it never changes) and the step-0 checkpoint written."""
  restored = ckpt.restore_latest(restore_template(updater, params, mesh, ckpt))
  if restored is None:
    ref_params = None if adapted else aepo_step.reference_copy(params, config.aepo.ref_dtype)
    state = sharding.replicate_rest(updater.init_state(params, jax.random.key(config.seed)), mesh)
    if not adapted:
      ckpt.save_once("reference", ref_params)
    ckpt.save(0, state, {"data_position": 0})
    return 0, state, ref_params, 0
  start, state, meta = restored
  ref_params = None if adapted else restore_reference(config, ckpt, params)
  logging.info("resumed from %s (data position %d)", ckpt.path_of(start), meta["data_position"])
  return start, state, ref_params, int(meta["data_position"])


def restore_reference(config: ml_collections.ConfigDict, ckpt: Checkpointer, params: Any) -> Any:
  """The reference policy saved at step 0. When it is missing it is rebuilt from the starting policy if that
  is rebuilt the same way (`model.hf_path`, or the seed's initialisation), else the run stops in one line."""
  template = aepo_step.reference_template(params, config.aepo.ref_dtype)
  if ckpt.has("reference"):
    return ckpt.restore_once("reference", template)
  where = f"{ckpt.directory}/reference"
  if policy_lib.warm_start_due(config):
    raise FileNotFoundError(f"{where} is missing: the reference policy (this run's warm-started policy of step 0) "
                            "cannot be rebuilt; put that folder back or start fresh (a new --config.workdir)")
  logging.warning("%s is missing: rebuilt from the starting policy (%s) and saved again", where,
                  config.model.hf_path or f"initialisation from seed {config.seed}")
  ref_params = aepo_step.reference_copy(params, config.aepo.ref_dtype)
  ckpt.save_once("reference", ref_params)
  return ref_params
