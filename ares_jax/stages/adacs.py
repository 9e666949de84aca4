"""Stage `adacs`: difficulty-aware cold start (docs/design.md §6), top to bottom, one named step after another.

load_pool (teacher responses per question) -> measure_candidates (graded and measured) -> pass_rates of the
policy (n samples each, resumable) -> select (per-source target lengths, water-filled pass-rate tiers) ->
train_sft on sft_examples (assistant tokens only, vision tower frozen, checkpointed, resumable), the policy
evaluated before and after -> the policy saved as a Hugging Face folder for AEPO -> report
(`adacs_report.json` + `adacs_report.png`) and the result table, printed (stages/results.py).
The synthetic task supplies the pool when `config.adacs.pool_paths` is empty: each problem gets
teacher traces of several lengths, some with a slip; its warm-started tiny policy gives the pass rates.
"""

from __future__ import annotations

import collections
import io
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ares_jax import adacs, sharding, storage
from ares_jax import settings as settings_lib
from ares_jax.adacs.pass_rates import estimate_pass_rates, read_progress
from ares_jax.adacs.report import length_by_pass_rate, write_report
from ares_jax.data import synthetic
from ares_jax.data.coldstart import PoolQuestion, question_row, read_pool
from ares_jax.data.grading import Grader
from ares_jax.data.prompts import PromptStream, RowSource
from ares_jax.data.reader import Row
from ares_jax.stages import policy as policy_lib
from ares_jax.stages import results, setup
from ares_jax.evaluation.held_out import evaluate
from ares_jax.train import sft
from ares_jax.train import run_control
from ares_jax.train.checkpoint import Checkpointer, restore_template
from ares_jax.train.curves import plot_curves
from ares_jax.train.metrics import MetricsWriter
from ares_jax.train.state import TrainState


def synthetic_pool(config: ml_collections.ConfigDict) -> list[PoolQuestion]:
  """`adacs.synthetic_questions` problems of the synthetic task with teacher traces of varied length."""
  d, a = config.data, config.adacs
  seed = config.seed * 1000 + 2  # a stream of its own: not the AEPO train (0) or eval (1) problems
  rng = np.random.default_rng([seed, 1])
  slips = setup.synthetic_slips(config) if d.task == "checks" else None
  pool = []
  for i in range(a.synthetic_questions):
    p = synthetic.problem(seed, i, d.min_steps, d.max_steps, d.ops, d.task)
    images = []
    if d.images and i % 2 == 0:
      buf = io.BytesIO()
      synthetic.render(p).save(buf, format="PNG")
      images = [buf.getvalue()]
    row = Row(id=f"synthetic-{i}", location=f"synthetic:{i}", question=p.question, answer=p.answer,
              images=tuple(images), source=f"synthetic_{d.ops}", difficulty=p.difficulty)
    pool.append(PoolQuestion(row, p.teacher_candidates(a.max_checks, a.slip_rate, rng, slips), difficulty=p.difficulty))
  return pool


def measure_candidates(pool: list[PoolQuestion], tokenizer, grader: Grader, max_length: int,
                       chunk: int = 4096):
  """Per question and candidate: token length and correctness (math-verify), in chunks so that a pool of
  hundreds of thousands of long responses never holds all their token ids at once."""
  flat = [(q, r) for q, qu in enumerate(pool) for r in qu.responses]
  candidates: list[list[dict]] = [[] for _ in pool]
  too_long = timeouts = 0
  for lo in tqdm(range(0, len(flat), chunk), desc="grading candidates", leave=False):
    part = flat[lo:lo + chunk]
    lengths = [len(t) for t in tokenizer([r for _, r in part])["input_ids"]]
    grades = grader.grade([r for _, r in part], [pool[q].answer for q, _ in part])
    timeouts += grades.timeouts
    for (q, _), n, acc in zip(part, lengths, grades.accuracy):
      fits = n + 1 <= max_length  # + EOS
      too_long += not fits
      # An over-long candidate cannot be trained on: not eligible, and not part of the length anchors.
      candidates[q].append({"length": n, "correct": bool(acc > 0) and fits})
  correct = sum(c["correct"] for cs in candidates for c in cs)
  return candidates, {"candidates": len(flat), "correct": correct, "too_long": too_long,
                      "grading_timeouts": timeouts}


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  a = config.adacs
  b = setup.build(config)
  mcfg, tok, proc, pad_id = b.mcfg, b.tokenizer, b.processor, b.pad_id
  grader = setup.build_grader(config)
  sc = setup.chunked(config, b, settings_lib.sampling(config, mcfg, pad_id, n=a.pass_rate_samples, max_branches=0),
                     a.pass_rate_batch)
  eval_stream = held_out_stream(config, proc)
  ckpt = Checkpointer.from_settings(os.path.join(config.workdir, "checkpoints"), settings_lib.checkpoint(config),
                                    adapters_only=mcfg.lora.enabled)
  resumed = ckpt.latest_step() is not None

  def warm(p):
    p = setup.warm_start(config, mcfg, p, setup.prompt_stream(config, proc, 0), pad_id, tok)
    # The warm-started base as a Hugging Face folder: what AdaCS started from (--config.model.hf_path=it
    # reruns AdaCS without the warm start, e.g. for another SFT setting).
    policy_lib.save_base(config, mcfg, p, tok)
    return p
  params = policy_lib.starting_params(config, ckpt, b.params, warm)

  # 1. The pool, every candidate graded and measured.
  pool, skipped = load_pool(config)
  candidates, cand_stats = measure_candidates(pool, tok, grader, a.max_response_length)
  stream = PromptStream(RowSource([question_row(q) for q in pool]), proc, setup.prompt_template(config, tok),
                        config.rollout.max_prompt_length, config.data.max_image_pixels)
  # 2. Pass rates: supplied, or estimated with the policy before SFT (resumable).
  rates = pass_rates(config, b, params, pool, stream, grader, sc, resumed)
  # 3. Selection.
  scored, plan = select(config, pool, rates, candidates)
  # 4. SFT on the selection, evaluated before and after on held-out problems.
  examples = sft_examples(plan, pool, stream, tok)
  eval_key = jax.random.key(config.seed + 1)
  evaluate_policy = lambda p: (evaluate(mcfg, p, eval_stream, grader, tok, sc, prompts=a.eval_prompts, key=eval_key,
                                        samples=config.eval.samples) if eval_stream else {})
  before_path = os.path.join(config.workdir, "eval_before_sft.json")
  if storage.exists(before_path):  # a resumed run: `params` are no longer the policy before SFT
    before = storage.read_json(before_path)
  else:
    before = evaluate_policy(params)
    if sharding.is_primary():
      storage.write_json(before_path, before)
  state = train_sft(config, mcfg, params, examples, ckpt, b.mesh, pad_id)
  after = evaluate_policy(state.params)
  grader.close()
  ckpt.close()
  # 5. The policy for AEPO, and the report.
  policy = policy_lib.export(config, mcfg, state.params, tok)  # every process gathers; process 0 writes
  out = report(config, pool, skipped, stream, cand_stats=cand_stats, scored=scored, plan=plan, before=before,
               after=after, policy=policy)
  if sharding.is_primary():
    print(results.adacs_table(config, out), flush=True)
  return out


def held_out_stream(config: ml_collections.ConfigDict, processor) -> PromptStream | None:
  """The held-out problems AEPO evaluates on too (split 1: the synthetic task's, or the held-out rows of
  `data.paths`), so before SFT, after SFT and after AEPO compare; None without any."""
  if config.data.kind != "files" or bool(config.data.paths or config.data.eval_paths):
    return setup.prompt_stream(config, processor, 1)
  logging.info("no held-out prompts (config.data.paths is empty): AdaCS is not evaluated before and after SFT")
  return None


def load_pool(config: ml_collections.ConfigDict) -> tuple[list[PoolQuestion], collections.Counter]:
  """`adacs.pool_paths` read (bad rows skipped and counted by reason), or the synthetic pool."""
  a = config.adacs
  skipped: collections.Counter = collections.Counter()
  pool = (read_pool(list(a.pool_paths), skipped, setup.columns(config), config.data.image_root or None)
          if a.pool_paths else synthetic_pool(config))
  if not pool:
    raise ValueError(f"config.adacs.pool_paths={tuple(a.pool_paths)} holds no usable question (skipped: "
                     f"{dict(skipped)})")
  return pool, skipped


def pass_rates(config: ml_collections.ConfigDict, b: setup.Built, params: Any, pool: list[PoolQuestion],
               stream: PromptStream, grader: Grader, sc, resumed: bool) -> dict[str, float | None]:
  """id -> p_q: the pool's own, else n samples of the policy before SFT (resumable, `pass_rates.jsonl`)."""
  a = config.adacs
  ids = [q.id for q in pool]
  todo = [i for i, q in enumerate(pool) if q.pass_rate is None]
  rates = {q.id: q.pass_rate for q in pool}
  progress = os.path.join(config.workdir, "pass_rates.jsonl")
  if resumed and any(ids[i] not in read_progress(progress) for i in todo):
    raise ValueError(f"{config.workdir} has SFT checkpoints but {progress} lacks pass rates, which must come "
                     "from the policy before SFT: restore that file or start in a fresh workdir")
  if todo:
    rates.update(estimate_pass_rates(b.mcfg, params, stream, ids, todo, b.tokenizer, grader, sc,
                                     key=jax.random.key(config.seed), progress_path=progress,
                                     batch_size=a.pass_rate_batch))
  return rates


def select(config: ml_collections.ConfigDict, pool: list[PoolQuestion], rates: dict, candidates: list[list[dict]]
           ) -> tuple[list[dict], list[dict]]:
  """(the questions with a pass rate, the selection plan), the plan written to `selection.jsonl`."""
  a = config.adacs
  questions = [{"id": q.id, "source": q.source, "pass_rate": rates[q.id], "candidates": candidates[i]}
               for i, q in enumerate(pool)]
  scored = [q for q in questions if q["pass_rate"] is not None]
  plan = adacs.select(scored, a.budget, seed=config.seed)
  if not plan:
    raise ValueError("AdaCS selected no question: no question has a correct candidate within "
                     f"config.adacs.max_response_length={a.max_response_length}")
  if sharding.is_primary():
    storage.write_jsonl(os.path.join(config.workdir, "selection.jsonl"), plan)
  return scored, plan


def sft_examples(plan: list[dict], pool: list[PoolQuestion], stream: PromptStream, tokenizer) -> list[tuple]:
  """(prompt, response token ids + EOS) of every selected candidate whose prompt encodes."""
  index = {q.id: i for i, q in enumerate(pool)}
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  chosen_text = [pool[index[p["id"]]].responses[p["candidate"]] for p in plan]
  encoded = stream.encode_many([index[p["id"]] for p in plan])
  examples = [(e, np.array(t + [eos], np.int32)) for e, t in zip(encoded, tokenizer(chosen_text)["input_ids"])]
  return [(e.prompt, t) for e, t in examples if e is not None]


def report(config: ml_collections.ConfigDict, pool, skipped, stream: PromptStream, *, cand_stats: dict,
           scored: list[dict], plan: list[dict], before: dict, after: dict, policy: str) -> dict[str, Any]:
  """`adacs_report.json` + `adacs_report.png` (process 0), returned."""
  a = config.adacs
  chosen = {p["id"]: p["candidate"] for p in plan}
  by_d = lambda ev: {k.rsplit("_d", 1)[1]: v for k, v in ev.items() if k.startswith("eval/length_d")}
  out = {
      "questions": len(pool), "rows_skipped": dict(skipped), "prompts_skipped": dict(stream.skipped),
      "candidates": cand_stats, "selected": len(plan), "budget": a.budget,
      "selected_per_tier": {f"{t:.3f}": n for t, n in sorted(collections.Counter(p["tier"] for p in plan).items())},
      "anchors": {s: list(v) for s, v in adacs.anchor_lengths(scored).items()},
      "length_vs_pass_rate": {"before_selection": length_by_pass_rate(scored),
                              "after_selection": length_by_pass_rate(scored, chosen)},
      "eval_before_sft": before, "eval_after_sft": after,
      "spearman_length_vs_difficulty": after.get("eval/spearman_length_vs_difficulty"),
      "spearman_length_vs_difficulty_before_sft": before.get("eval/spearman_length_vs_difficulty"),
      "policy_length_by_difficulty": {"before SFT": by_d(before), "after SFT": by_d(after)},
      "difficulty": results.difficulty_axis(config),
      "source_titles": results.source_titles(config, sorted({q["source"] for q in scored})),
      "policy": policy,
  }
  paths = write_report(config.workdir, out) if sharding.is_primary() else ("", "")
  logging.info("AdaCS: %d of %d questions selected; Spearman(length, difficulty) %.3f -> %.3f; report %s",
               len(plan), len(pool), before.get("eval/spearman_length_vs_difficulty", float("nan")),
               after.get("eval/spearman_length_vs_difficulty", float("nan")), paths[0])
  return out


def train_sft(config, mcfg, params, examples, ckpt: Checkpointer, mesh, pad_id: int) -> TrainState:
  """`adacs.epochs` shuffled passes in batches of `adacs.batch_size` (micro-batches of similar length
  accumulate into one update); checkpoints every `checkpoint_every` steps; resumes from the newest readable
  checkpoint; on SIGTERM / a preemption notice, checkpoints the step in progress and raises `Preempted`."""
  a, s = config.adacs, settings_lib.adacs_sft(config, mesh)
  steps_per_epoch = -(-len(examples) // a.batch_size)
  total = a.epochs * steps_per_epoch
  updater = sft.make_sft(mcfg, params, s.optim, total, s.frozen)
  restored = ckpt.restore_latest(restore_template(updater, params, mesh, ckpt))
  start = restored.step if restored else 0
  if restored:
    state = restored.state
    logging.info("AdaCS SFT resumed from %s (step %d of %d)", ckpt.path_of(start), start, total)
  else:
    state = sharding.replicate_rest(updater.init_state(params, jax.random.key(config.seed)), mesh)
  writer = MetricsWriter(config.workdir, resume_step=start or None)
  lengths = np.array([len(t) for _, t in examples])
  stop = run_control.StopRequests(settings_lib.checkpoint(config).preemption, "adacs sft")
  for step in tqdm(range(start + 1, total + 1), desc="adacs sft", initial=start, total=total):
    epoch, k = divmod(step - 1, steps_per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(len(examples))
    batch = order[k * a.batch_size:(k + 1) * a.batch_size]
    batch = batch[np.argsort(lengths[batch], kind="stable")]  # similar widths per micro-batch (updates.packing=none)
    micro = sft.micro_batches(mcfg, [examples[i][0] for i in batch], [examples[i][1] for i in batch],
                              s.packing, pad_id)
    state, m = updater.update(state, micro)
    writer.write(step, {"sft/loss": m["loss"], "sft/grad_norm": m["grad_norm"], "sft/examples": len(batch),
                        "epoch": epoch, "update_skipped": m["update_skipped"]})
    preempted = stop.should_stop(step)  # the same answer on every process
    if preempted or step % config.checkpoint_every == 0 or step == total:
      ckpt.save(step, state, {"epoch": epoch})
    if preempted:
      stop.close()
      writer.close()
      ckpt.close()  # waits for the write
      raise run_control.Preempted("adacs sft", step, str(ckpt.path_of(step)))
  stop.close()
  writer.close()
  if total:
    plot_curves(config.workdir, results.SFT_PANELS, results.SFT_STEP, filename="sft_curves.png")
  return state
