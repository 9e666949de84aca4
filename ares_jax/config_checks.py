"""The whole config checked at startup, before any device, weight or data file is touched.

Every problem is one line naming the field and what to set, so a mistyped option costs a second, not a
compile and minutes of data loading. Imports nothing heavy (it runs while flags are parsed, before
`jax.distributed.initialize()`); the enumerations below are checked against the modules that consume
them by tests/test_config_checks.py.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Callable

import ml_collections

STAGES = ("inspect", "sample", "aepo", "adacs", "ares", "eval")
DATA_KINDS = ("synthetic", "files", "tfds")
SYNTHETIC_TASKS = ("steps", "checks")
TARGET_MODES = ("correct_mean", "batch_mean", "ema", "ares_release")  # aepo/rewards.py
LOSS_AGGS = ("token_mean", "seq_mean_token_mean")  # aepo/loss.py
PACKINGS = ("shared_prompt", "packed", "none")  # train/row_fill.py
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")  # models/layers.py
ATTENTION = ("auto", "xla", "blockwise", "splash", "cudnn")  # models/attention.py
SCHEDULES = ("constant", "cosine")  # train/optimizer.py
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZERS = ("hf", "tiny")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down", "vision_attn", "merger")  # models/lora.py

# Stages that read RL / held-out prompts from config.data.
_PROMPT_STAGES = ("aepo", "ares", "eval")


def problems(config: ml_collections.ConfigDict) -> list[str]:
  """Every problem of `config`, one line each (empty: the config is usable)."""
  out: list[str] = []

  def need(ok: bool, msg: str) -> None:
    if not ok:
      out.append(msg)

  def one_of(field: str, value: Any, choices: tuple) -> None:
    need(value in choices, f"config.{field}={value!r}: expected one of {', '.join(map(str, choices))}")

  def in_range(field: str, value: Any, ok: Callable[[float], bool], what: str) -> None:
    good = isinstance(value, (int, float)) and not isinstance(value, bool) and ok(value)
    need(good, f"config.{field}={value!r}: expected {what}")

  c = config
  one_of("stage", c.stage, STAGES)
  in_range("total_steps", c.total_steps, lambda v: v >= 0 and v == int(v), "an integer >= 0")
  in_range("checkpoint_every", c.get("checkpoint_every", 1), lambda v: v >= 1, "an integer >= 1")
  in_range("grading_workers", c.grading_workers, lambda v: v >= 1, "an integer >= 1")
  in_range("ppo_epochs", c.ppo_epochs, lambda v: v >= 1, "an integer >= 1")
  if c.get("checkpoint") is not None:
    in_range("checkpoint.keep", c.checkpoint.get("keep", 1), lambda v: v >= 1, "an integer >= 1")
  sizes = [c.mesh.data, c.mesh.fsdp, c.mesh.tensor]
  need(all(isinstance(s, int) and (s >= 1 or s == -1) for s in sizes) and sizes.count(-1) <= 1,
       f"config.mesh=(data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}): each size is >= 1, or -1 for the "
       "remaining devices (at most one -1)")
  one_of("tokenizer.kind", c.tokenizer.kind, TOKENIZERS)
  in_range("processor.min_pixels", c.processor.min_pixels, lambda v: v > 0, "> 0")
  need(c.processor.min_pixels <= c.processor.max_pixels,
       f"config.processor.min_pixels={c.processor.min_pixels} > config.processor.max_pixels={c.processor.max_pixels}")
  p = c.processor
  in_range("processor.video_fps", p.video_fps, lambda v: v > 0, "> 0")
  for name in ("video_min_pixels", "video_max_pixels", "video_total_pixels", "video_min_frames", "video_max_frames"):
    in_range(f"processor.{name}", p[name], lambda v: v >= 1 and v == int(v), "an integer >= 1")
  for lo, hi in (("video_min_pixels", "video_max_pixels"), ("video_min_frames", "video_max_frames")):
    if all(isinstance(p[k], (int, float)) for k in (lo, hi)):
      need(p[lo] <= p[hi], f"config.processor.{lo}={p[lo]} > config.processor.{hi}={p[hi]}")

  m = c.model
  one_of("model.dtype", m.dtype, DTYPES)
  one_of("model.param_dtype", m.param_dtype, DTYPES)
  one_of("model.remat_policy", m.remat_policy, REMAT_POLICIES)
  one_of("model.attention", m.get("attention", "auto"), ATTENTION)
  out += _lora_problems(m.get("lora"))

  r = c.rollout
  in_range("rollout.n", r.n, lambda v: v >= 1, "an integer >= 1")
  in_range("rollout.temperature", r.temperature, lambda v: v >= 0, ">= 0 (0 = greedy)")
  in_range("rollout.top_p", r.top_p, lambda v: 0 < v <= 1, "a value in (0, 1]")
  in_range("rollout.max_branches", r.max_branches, lambda v: v >= 0, "an integer >= 0")
  in_range("rollout.prompts_per_step", r.prompts_per_step, lambda v: v >= 1, "an integer >= 1")
  in_range("rollout.max_prompt_length", r.max_prompt_length, lambda v: v >= 1, "an integer >= 1")
  in_range("rollout.max_response_length", r.max_response_length, lambda v: v >= 1, "an integer >= 1")
  in_range("rollout.chunk_prompts", r.chunk_prompts, lambda v: v >= 0, "an integer >= 0 (0 = planned)")
  one_of("rollout.kv_cache", r.kv_cache, ("paged", "dense"))
  in_range("rollout.page_size", r.page_size, lambda v: v >= 1, "an integer >= 1")
  in_range("rollout.prompts_in_flight", r.prompts_in_flight, lambda v: v >= 0, "an integer >= 0 (0 = planned)")
  in_range("rollout.drain_halvings", r.drain_halvings, lambda v: v >= 0, "an integer >= 0 (0 = never)")
  one_of("rollout.decode_attention", r.decode_attention, ("auto", "per_group", "per_slot"))

  a = c.aepo
  in_range("aepo.window", a.window, lambda v: v >= 1, "an integer >= 1")
  in_range("aepo.entropy_quantile", a.entropy_quantile, lambda v: 0 < v <= 1, "a quantile in (0, 1]")
  in_range("aepo.tau_ema", a.tau_ema, lambda v: 0 <= v < 1, "a decay in [0, 1) (0 = off)")
  need(0 <= a.hard_threshold <= a.easy_threshold <= 1,
       f"config.aepo.hard_threshold={a.hard_threshold} and easy_threshold={a.easy_threshold}: need "
       "0 <= hard_threshold <= easy_threshold <= 1")
  one_of("aepo.target_mode", a.target_mode, TARGET_MODES)
  one_of("aepo.loss_agg", a.loss_agg, LOSS_AGGS)
  one_of("aepo.ref_dtype", a.ref_dtype, DTYPES)
  need(a.dual_clip == 0 or a.dual_clip > 1, f"config.aepo.dual_clip={a.dual_clip}: 0 (off) or a constant > 1")
  need(0 <= a.filter_low <= a.filter_high <= 1,
       f"config.aepo.filter_low={a.filter_low} and filter_high={a.filter_high}: need 0 <= low <= high <= 1")
  need(len(a.kl_bin_scale) == 3, f"config.aepo.kl_bin_scale={tuple(a.kl_bin_scale)}: three scales (easy, medium, "
       "hard)")
  in_range("aepo.kl_coef", a.kl_coef, lambda v: v >= 0, ">= 0")
  in_range("aepo.rho", a.rho, lambda v: 0 <= v <= 1, "a weight in [0, 1]")
  in_range("aepo.clip_low", a.clip_low, lambda v: v >= 0, ">= 0")
  in_range("aepo.clip_high", a.clip_high, lambda v: v >= 0, ">= 0")
  in_range("aepo.max_skipped_updates", a.get("max_skipped_updates", 0), lambda v: v >= 0,
           "an integer >= 0 (0 = never stop)")
  in_range("aepo.grading_timeout_s", a.grading_timeout_s, lambda v: v > 0, "seconds > 0")
  in_range("aepo.micro_batch_size", a.micro_batch_size, lambda v: v >= 1, "an integer >= 1")
  u = c.get("updates") or {}
  one_of("updates.packing", u.get("packing", "shared_prompt"), PACKINGS)
  in_range("updates.row_tokens", u.get("row_tokens", 0), lambda v: v >= 0, "0 (automatic) or a positive integer")
  in_range("updates.tokens_per_micro_batch", u.get("tokens_per_micro_batch", 0), lambda v: v >= 0,
           "0 (automatic) or a positive integer")
  need(not u.get("row_tokens", 0) or not u.get("tokens_per_micro_batch", 0)
       or u.tokens_per_micro_batch >= u.row_tokens,
       f"config.updates.tokens_per_micro_batch={u.get('tokens_per_micro_batch')} is less than one row "
       f"(config.updates.row_tokens={u.get('row_tokens')})")
  longest = {"aepo": c.rollout.max_prompt_length + c.rollout.max_response_length,
             "adacs": c.rollout.max_prompt_length + c.adacs.max_response_length}
  for stage, n in longest.items():
    for field in ("row_tokens", "tokens_per_micro_batch"):
      need(not u.get(field, 0) or c.stage not in (stage, "ares") or u.get(field) >= n,
           f"config.updates.{field}={u.get(field)} cannot hold the {stage} stage's longest sequence "
           f"(rollout.max_prompt_length + {'adacs' if stage == 'adacs' else 'rollout'}.max_response_length = {n})")
  in_range("aepo.global_batch_size", a.global_batch_size, lambda v: v >= 1, "an integer >= 1")
  need(all(isinstance(w, str) and w.strip() for w in a.trigger_words),
       f"config.aepo.trigger_words={tuple(a.trigger_words)}: a tuple of words, e.g. ('wait', 'however')")

  pl = c.plan
  in_range("plan.prompt_tokens", pl.get("prompt_tokens", 1500), lambda v: v >= 1 and v == int(v), "an integer >= 1")
  in_range("plan.response_tokens", pl.get("response_tokens", 1000), lambda v: v >= 1 and v == int(v),
           "an integer >= 1")
  in_range("plan.mfu", pl.get("mfu", 0.4), lambda v: 0 < v <= 1, "a utilisation in (0, 1]")
  in_range("plan.videos_per_prompt", pl.get("videos_per_prompt", 0), lambda v: v >= 0 and v == int(v),
           "an integer >= 0")
  in_range("plan.video_frames", pl.get("video_frames", 16), lambda v: v >= 2 and v == int(v), "an integer >= 2")
  in_range("plan.video_pixels", pl.get("video_pixels", 100352), lambda v: v >= 4 * 28 * 28 and v == int(v),
           "pixels per frame, at least 4 * 28 * 28")

  o = c.optim
  in_range("optim.lr", o.lr, lambda v: v > 0, "a learning rate > 0")
  one_of("optim.schedule", o.schedule, SCHEDULES)
  in_range("optim.warmup_steps", o.warmup_steps, lambda v: v >= 0, "an integer >= 0")

  ad = c.adacs
  in_range("adacs.pass_rate_samples", ad.pass_rate_samples, lambda v: v >= 1, "an integer >= 1")
  in_range("adacs.lr", ad.lr, lambda v: v > 0, "a learning rate > 0")
  in_range("adacs.micro_batch_size", ad.micro_batch_size, lambda v: v >= 1, "an integer >= 1")
  need(ad.batch_size >= ad.micro_batch_size, f"config.adacs.batch_size={ad.batch_size} < "
       f"config.adacs.micro_batch_size={ad.micro_batch_size}")
  in_range("eval.samples", c.eval.samples, lambda v: v >= 0, "an integer >= 0 (0 = greedy)")
  in_range("eval.every", c.eval.every, lambda v: v >= 0, "an integer >= 0 (0 = never)")
  for spec in c.eval.get("benchmarks", ()):
    need(isinstance(spec, str) and "=" in spec, f"config.eval.benchmarks: {spec!r} is not 'name=path'")

  out += _data_problems(c)
  out += _path_problems(c)
  return out


def _lora_problems(lo: ml_collections.ConfigDict | None) -> list[str]:
  """config.model.lora: rank >= 0 (0 = off), alpha > 0, dropout in [0, 1), known targets, an adapter folder
  that holds a PEFT adapter."""
  if lo is None:
    return []
  out = []
  rank, alpha, dropout = lo.get("rank", 0), lo.get("alpha", 16.0), lo.get("dropout", 0.0)
  number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  if not (number(rank) and rank >= 0 and rank == int(rank)):
    out.append(f"config.model.lora.rank={rank!r}: expected an integer >= 0 (0 = no adapters)")
  if not (number(alpha) and alpha > 0):
    out.append(f"config.model.lora.alpha={alpha!r}: expected a number > 0 (the update is alpha / rank * B A x)")
  if not (number(dropout) and 0 <= dropout < 1):
    out.append(f"config.model.lora.dropout={dropout!r}: expected a rate in [0, 1)")
  targets = lo.get("targets", ())
  if isinstance(targets, str) or not targets or any(t not in LORA_TARGETS for t in targets):
    out.append(f"config.model.lora.targets={targets!r}: expected a non-empty tuple of {', '.join(LORA_TARGETS)}")
  path = lo.get("adapter_path")
  if path and "://" not in path:
    if not os.path.isdir(os.path.expanduser(path)):
      out.append(f"config.model.lora.adapter_path={path!r}: no such folder (a PEFT adapter folder)")
    else:
      missing = [f for f in ("adapter_config.json", "adapter_model.safetensors")
                 if not os.path.exists(os.path.join(os.path.expanduser(path), f))]
      if missing:
        out.append(f"config.model.lora.adapter_path={path!r}: no {' or '.join(missing)} in this folder (PEFT "
                   "adapters as safetensors; pickled adapter_model.bin files are never loaded)")
  return out


def _data_problems(c: ml_collections.ConfigDict) -> list[str]:
  d, out = c.data, []
  if d.kind not in DATA_KINDS:
    return [f"config.data.kind={d.kind!r}: expected one of {', '.join(DATA_KINDS)}"]
  benchmarks_only = c.stage == "eval" and (c.eval.get("benchmarks") or c.eval.get("rescore"))
  if d.kind == "files" and not d.paths and c.stage in _PROMPT_STAGES and not benchmarks_only:
    out.append("config.data.paths is empty: set --config.data.paths=\"('/data/ViRL39K',)\" (JSONL, parquet or TSV "
               "files or folders)")
  if d.kind == "tfds" and not d.get("tfds_dir"):
    out.append("config.data.tfds_dir is empty: build one with `python -m ares_jax.data.build --src=... --out=...`")
  if c.stage in ("adacs", "ares") and d.kind != "synthetic" and not c.adacs.pool_paths:
    out.append("config.adacs.pool_paths is empty: set --config.adacs.pool_paths=\"('/data/ARES-Adaptive-Coldstart',)\""
               " (the cold-start pool)")
  if not 0.0 <= d.eval_fraction < 1.0:
    out.append(f"config.data.eval_fraction={d.eval_fraction}: expected a fraction in [0, 1)")
  if d.instruction_position not in ("after", "before"):
    out.append(f"config.data.instruction_position={d.instruction_position!r}: expected 'after' or 'before'")
  if d.kind == "synthetic":
    if d.task not in SYNTHETIC_TASKS:
      out.append(f"config.data.task={d.task!r}: expected one of {', '.join(SYNTHETIC_TASKS)}")
    if not 1 <= d.min_steps <= d.max_steps:
      out.append(f"config.data.min_steps={d.min_steps}, max_steps={d.max_steps}: need 1 <= min_steps <= max_steps")
    levels = tuple(d.slips.levels)
    if len(levels) != 3 or not all(0.0 <= p <= 1.0 for p in levels):
      out.append(f"config.data.slips.levels={levels}: expected three probabilities (levels 1, 2, 3)")
    if not 0.0 <= d.slips.check <= 1.0:
      out.append(f"config.data.slips.check={d.slips.check}: expected a probability in [0, 1]")
    if not 0.0 <= c.warm_start.check_rate <= 1.0:
      out.append(f"config.warm_start.check_rate={c.warm_start.check_rate}: expected a probability in [0, 1]")
  return out


def _exists(path: str) -> bool:
  return "://" in path or os.path.exists(os.path.expanduser(path))  # remote paths are checked when opened


def _path_problems(c: ml_collections.ConfigDict) -> list[str]:
  """Paths the run must read: they exist, and a checkpoint folder holds what ares_jax loads."""
  out = []
  hf = c.model.get("hf_path")
  rescoring = c.stage == "eval" and c.eval.get("rescore")
  if hf and not rescoring and "://" not in hf:
    folder = os.path.expanduser(hf)
    if not os.path.isdir(folder):
      out.append(f"config.model.hf_path={hf!r}: no such folder (a local Hugging Face checkpoint: config.json + "
                 "*.safetensors; models are never downloaded)")
    elif not os.path.exists(os.path.join(folder, "config.json")):
      out.append(f"config.model.hf_path={hf!r}: no config.json in this folder")
    elif not glob.glob(os.path.join(folder, "*.safetensors")):
      bins = glob.glob(os.path.join(folder, "*.bin")) + glob.glob(os.path.join(folder, "*.pt*"))
      hint = (" (it holds PyTorch pickles, which are never loaded: convert them with transformers' "
              "save_pretrained(..., safe_serialization=True))") if bins else ""
      out.append(f"config.model.hf_path={hf!r}: no *.safetensors weights in this folder{hint}")
  tok = c.tokenizer.get("path")
  if tok and not _exists(tok):
    out.append(f"config.tokenizer.path={tok!r}: no such folder")
  d = c.data
  lists = [("data.eval_paths", d.eval_paths), ("adacs.pool_paths", c.adacs.pool_paths)]
  if d.kind == "files":
    lists.append(("data.paths", d.paths))
  for field, paths in lists:
    if isinstance(paths, str):
      out.append(f"config.{field}={paths!r}: a tuple of paths, e.g. \"('{paths}',)\"")
      continue
    out += [f"config.{field}: {p!r} does not exist" for p in paths if not _exists(str(p))]
  if d.kind == "tfds" and d.get("tfds_dir") and not _exists(d.tfds_dir):
    out.append(f"config.data.tfds_dir={d.tfds_dir!r}: no such folder")
  if d.image_root and not _exists(d.image_root):
    out.append(f"config.data.image_root={d.image_root!r}: no such folder")
  if not c.eval.get("rescore"):
    for spec in c.eval.get("benchmarks", ()):
      path = str(spec).split("=", 1)[-1]
      if "=" in str(spec) and not _exists(path):
        out.append(f"config.eval.benchmarks: {path!r} ({str(spec).split('=', 1)[0]}) does not exist")
  return out
