"""The one place where an experiment's ConfigDict (configs/*.py, `--config.x=y`) becomes typed settings.

Everything below the stages takes frozen, keyword-only dataclasses, defined beside the code that reads
them; a stage turns its config into them here, once, at its start:

    model        config.model             -> models.ModelConfig (architecture, numerics, LoRA)
    sampling     config.rollout (+ window) -> sampling.SamplingConfig
    shaping      config.aepo              -> aepo.step.ShapingSettings (statistics, rewards, KL budget)
    loss         config.aepo + rollout    -> aepo.step.LossSettings (the static part of a micro-batch)
    ppo          config.aepo + ppo_epochs -> aepo.step.PPOSettings
    packing      config.updates (+ stage) -> train.packing.PackingSettings (update rows)
    optim        config.optim             -> train.optimizer.OptimSettings
    adacs_sft    config.adacs             -> train.sft.SftSettings (AdaCS's SFT)
    warm_start_sft config.warm_start      -> train.sft.SftSettings (the tiny config's warm start)
    checkpoint   config.checkpoint*       -> train.checkpoint.CheckpointSettings
    benchmarks   config.eval              -> evaluation.benchmarks.Settings
    tfds         config.data (kind=tfds)  -> data.tfds_source.TfdsSettings
    video        config.processor.video_* -> data.video.VideoSettings
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ares_jax import sharding
from ares_jax.aepo.step import LossSettings, PPOSettings, ShapingSettings
from ares_jax.data.tfds_source import TfdsSettings
from ares_jax.data.video import VideoSettings
from ares_jax.evaluation import benchmarks
from ares_jax.models.config import ConfigError, LoraConfig, ModelConfig, TextConfig, VisionConfig
from ares_jax.sampling import SamplingConfig
from ares_jax.train.checkpoint import CheckpointSettings
from ares_jax.train.optimizer import OptimSettings
from ares_jax.train.packing import PackingSettings
from ares_jax.train.sft import SftSettings


def model(m: ml_collections.ConfigDict) -> ModelConfig:
  """`config.model` -> `models.ModelConfig`, checking the shapes fit; errors name the config field."""
  def need(ok: bool, msg: str) -> None:
    if not ok:
      raise ConfigError(msg)

  need(m.hidden_size % m.num_heads == 0,
       f"config.model.hidden_size={m.hidden_size} is not divisible by config.model.num_heads={m.num_heads}")
  need(m.num_heads % m.num_kv_heads == 0,
       f"config.model.num_heads={m.num_heads} is not divisible by config.model.num_kv_heads={m.num_kv_heads}")
  head_dim = m.hidden_size // m.num_heads
  need(len(m.mrope_section) == 3 and sum(m.mrope_section) == head_dim // 2,
       f"config.model.mrope_section={tuple(m.mrope_section)} must have 3 entries summing to head_dim/2 = "
       f"{head_dim // 2}")
  v = m.vision
  need(v.hidden_size % v.num_heads == 0, f"config.model.vision.hidden_size={v.hidden_size} is not divisible by "
       f"config.model.vision.num_heads={v.num_heads}")
  need(v.out_hidden_size == m.hidden_size, f"config.model.vision.out_hidden_size={v.out_hidden_size} must equal "
       f"config.model.hidden_size={m.hidden_size}")
  need(all(0 <= i < v.depth for i in v.fullatt_block_indexes),
       f"config.model.vision.fullatt_block_indexes={tuple(v.fullatt_block_indexes)} must lie in [0, {v.depth})")
  text = TextConfig(
      vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
      num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, rms_norm_eps=m.rms_norm_eps,
      rope_theta=float(m.rope_theta), mrope_section=tuple(int(s) for s in m.mrope_section),
      max_position_embeddings=m.max_position_embeddings)
  vision = VisionConfig(
      depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_heads=v.num_heads,
      out_hidden_size=v.out_hidden_size, in_channels=v.in_channels, patch_size=v.patch_size,
      temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
      window_size=v.window_size, fullatt_block_indexes=tuple(int(i) for i in v.fullatt_block_indexes),
      rope_theta=float(v.rope_theta), tokens_per_second=v.tokens_per_second)
  return ModelConfig(
      text=text, vision=vision, tie_word_embeddings=m.tie_word_embeddings, image_token_id=m.image_token_id,
      video_token_id=m.video_token_id, vision_start_token_id=m.vision_start_token_id,
      vision_end_token_id=m.vision_end_token_id, bos_token_id=m.bos_token_id, eos_token_id=m.eos_token_id,
      dtype=m.dtype, param_dtype=m.param_dtype, remat_policy=m.remat_policy, attention=m.get("attention", "auto"),
      lora=_lora_config(m.get("lora")))


def _lora_config(lo: ml_collections.ConfigDict | None) -> LoraConfig:
  if lo is None or not lo.rank:
    return LoraConfig()
  return LoraConfig(rank=int(lo.rank), alpha=float(lo.alpha), dropout=float(lo.dropout), targets=tuple(lo.targets))


# Fields that a checkpoint's config.json fixes; the config file must agree with them.
_ARCH_FIELDS = (
    ("vocab_size", "text.vocab_size"), ("hidden_size", "text.hidden_size"),
    ("intermediate_size", "text.intermediate_size"), ("num_layers", "text.num_layers"),
    ("num_heads", "text.num_heads"), ("num_kv_heads", "text.num_kv_heads"),
    ("mrope_section", "text.mrope_section"), ("tie_word_embeddings", "tie_word_embeddings"),
    ("image_token_id", "image_token_id"), ("vision.depth", "vision.depth"),
    ("vision.hidden_size", "vision.hidden_size"), ("vision.fullatt_block_indexes", "vision.fullatt_block_indexes"),
    ("vision.window_size", "vision.window_size"))


def _get(obj: Any, dotted: str) -> Any:
  for part in dotted.split("."):
    obj = obj[part] if isinstance(obj, ml_collections.ConfigDict) else getattr(obj, part)
  return tuple(obj) if isinstance(obj, (list, tuple)) else obj


def architecture_mismatches(m: ml_collections.ConfigDict, loaded: ModelConfig) -> list[str]:
  """Fields where `config.model` disagrees with a checkpoint's config.json, as readable lines."""
  out = []
  for ours, theirs in _ARCH_FIELDS:
    a, b = _get(m, ours), _get(loaded, theirs)
    if a != b:
      out.append(f"config.model.{ours}={a!r} but the checkpoint has {b!r}")
  return out


def sampling(config: ml_collections.ConfigDict, mcfg: ModelConfig, pad_id: int, **overrides) -> SamplingConfig:
  """The rollout section of an experiment config as a `SamplingConfig` (`overrides` replace fields)."""
  r = config.rollout
  eos = mcfg.eos_token_id if isinstance(mcfg.eos_token_id, tuple) else (mcfg.eos_token_id,)
  kw = dict(max_new_tokens=r.max_response_length, temperature=r.temperature, top_p=r.top_p,
            top_k=max(int(r.top_k), 0), n=r.n, window=config.aepo.window, max_branches=r.max_branches,
            eos_ids=tuple(e for e in eos if e is not None), pad_id=int(pad_id),
            cache_dtype=r.get("cache_dtype", None), chunk_prompts=r.chunk_prompts, kv_cache=r.kv_cache,
            page_size=r.page_size, prompts_in_flight=r.prompts_in_flight,
            drain_halvings=r.drain_halvings, decode_attention=r.get("decode_attention", "auto"))
  kw.update(overrides)
  return SamplingConfig(**kw)


def shaping(config: ml_collections.ConfigDict) -> ShapingSettings:
  a = config.aepo
  return ShapingSettings(
      entropy_quantile=float(a.entropy_quantile), tau_ema=float(a.tau_ema), easy_threshold=float(a.easy_threshold),
      hard_threshold=float(a.hard_threshold), target_mode=a.target_mode, eps=float(a.eps),
      max_penalty=float(a.max_penalty), format_weight=float(a.format_weight), filter_low=float(a.filter_low),
      filter_high=float(a.filter_high), window=int(a.window), kl_coef=float(a.kl_coef),
      kl_bin_scale=tuple(float(x) for x in a.kl_bin_scale), rho=float(a.rho))


def loss(config: ml_collections.ConfigDict) -> LossSettings:
  a = config.aepo
  return LossSettings(temperature=float(config.rollout.temperature),
                      clip_low=float(a.clip_low), clip_high=float(a.clip_high),
                      dual_clip=float(a.dual_clip) if a.dual_clip else None, loss_agg=a.loss_agg)


def ppo(config: ml_collections.ConfigDict, mesh: Any = None) -> PPOSettings:
  a = config.aepo
  return PPOSettings(global_batch_size=int(a.global_batch_size), packing=packing(config, "aepo", mesh),
                     epochs=int(config.ppo_epochs), seed=int(config.seed))


def packing(config: ml_collections.ConfigDict, stage: str, mesh: Any = None) -> PackingSettings:
  """`config.updates` for `stage` ("aepo" | "adacs") on `mesh` (rows come in multiples of its batch-sharding
  devices), its zeros resolved (`PackingSettings.from_config`)."""
  return PackingSettings.from_config(config, stage, sharding.batch_shards(mesh))


def optim(config: ml_collections.ConfigDict, **overrides: Any) -> OptimSettings:
  """`config.optim`; `overrides` replace fields (AdaCS's lr, the warm start's lr and schedule)."""
  o = config.optim
  kw = dict(lr=float(o.lr), weight_decay=float(o.weight_decay), b1=float(o.b1), b2=float(o.b2), eps=float(o.eps),
            grad_clip=float(o.grad_clip), warmup_steps=int(o.get("warmup_steps", 0)),
            schedule=o.get("schedule", "constant"))
  kw.update(overrides)
  return OptimSettings(**kw)


def adacs_sft(config: ml_collections.ConfigDict, mesh: Any = None) -> SftSettings:
  a = config.adacs
  return SftSettings(optim=optim(config, lr=float(a.lr)), packing=packing(config, "adacs", mesh),
                     frozen=("visual",) if a.freeze_vision else ())


def warm_start_sft(config: ml_collections.ConfigDict, mesh: Any = None) -> SftSettings:
  """The synthetic task's warm start: AdamW of `config.optim` with the warm start's lr and weight decay, a
  cosine schedule with 5% warm-up; it trains the whole base (nothing frozen)."""
  w = config.warm_start
  return SftSettings(optim=optim(config, lr=float(w.lr), weight_decay=float(w.weight_decay), schedule="cosine",
                                 warmup_steps=max(1, w.steps // 20)),
                     packing=packing(config, "aepo", mesh), frozen=())


def checkpoint(config: ml_collections.ConfigDict) -> CheckpointSettings:
  c = config.get("checkpoint") or {}
  d = CheckpointSettings(every=int(config.checkpoint_every))
  return CheckpointSettings(every=d.every, keep=int(c.get("keep", d.keep)),
                            async_save=bool(c.get("async_save", d.async_save)),
                            preemption=bool(c.get("preemption", d.preemption)))


def benchmark_settings(config: ml_collections.ConfigDict) -> benchmarks.Settings:
  e = config.eval
  return benchmarks.Settings(samples=e.samples, max_items=e.max_items, batch_prompts=e.batch_prompts,
                             group_by=e.group_by, max_image_pixels=config.data.max_image_pixels)


def tfds(config: ml_collections.ConfigDict) -> TfdsSettings:
  d, v = config.data, config.model.vision
  return TfdsSettings(tfds_dir=d.tfds_dir, shuffle=bool(d.shuffle), seed=int(config.seed),
                      eval_paths_given=bool(d.get("eval_paths")), min_pixels=int(config.processor.min_pixels),
                      max_pixels=int(config.processor.max_pixels),
                      image_factor=int(v.patch_size) * int(v.spatial_merge_size))


def video(config: ml_collections.ConfigDict) -> VideoSettings:
  p = config.processor
  return VideoSettings(fps=float(p.video_fps), min_pixels=int(p.video_min_pixels), max_pixels=int(p.video_max_pixels),
                       total_pixels=int(p.video_total_pixels), min_frames=int(p.video_min_frames),
                       max_frames=int(p.video_max_frames))
