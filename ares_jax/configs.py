"""Building blocks of the experiment configs in `configs/`, and `config.model` -> `ModelConfig`.

Every file in `configs/` is a big_vision-style `get_config()` returning an `ml_collections`
ConfigDict; `--config.a.b=value` overrides it on the command line. The pieces that all experiments
share (the top-level fields, the Qwen2.5-VL vision tower, the paper's AEPO hyper-parameters) are
built here once, so an experiment file only states what makes it different.

This module is imported while flags are parsed, before `jax.distributed.initialize()`: it must not
touch a JAX backend (model code is imported lazily inside `to_model_config`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ml_collections
from ml_collections import config_dict

if TYPE_CHECKING:
  from ares_jax.models import ModelConfig

from ares_jax.config_checks import DATA_KINDS, STAGES  # noqa: F401  (ares: adacs, then aepo from its policy)

# Qwen2.5-VL's token ids (identical for 3B and 7B).
QWEN_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645)


def base_config(stage: str, workdir: str) -> ml_collections.ConfigDict:
  """Top-level fields every experiment has, with the paper's RL hyper-parameters (design.md 5)."""
  c = ml_collections.ConfigDict()
  c.stage = stage  # one of STAGES
  c.workdir = workdir  # checkpoints, metrics, reports
  c.seed = 0
  c.total_steps = 1000
  c.checkpoint_every = 50
  # Checkpoints (train/checkpoint.py, train/run_control.py): keep the newest `keep` step checkpoints (AEPO's
  # reference policy is saved once beside them); async_save: write while the next step runs; preemption:
  # SIGTERM or JAX's preemption notice finishes the step, checkpoints it and exits 0 (rerun to resume).
  c.checkpoint = ml_collections.ConfigDict(dict(keep=3, async_save=True, preemption=True))
  c.distributed = False  # call jax.distributed.initialize() first (multi-host TPU pods / GPU clusters)
  # Persistent XLA compilation cache (local or gs://; "" = off): a relaunch reuses every compiled program.
  c.compilation_cache_dir = "~/.cache/ares_jax/xla"
  c.log_compiles = True  # log every new compile with its shapes (a bounded set per run is expected)

  # Device mesh (design.md 2): one size may be -1 to take the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "hf"  # "hf": a local folder; "tiny": the built-in tiny BPE (data/tokenizer.py)
  c.tokenizer.path = config_dict.placeholder(str)  # defaults to config.model.hf_path

  # Image preprocessing bounds (pixels after smart_resize). EasyR1's defaults; the paper is silent.
  c.processor = ml_collections.ConfigDict(dict(min_pixels=262144, max_pixels=4194304))

  c.rollout = rollout_defaults()
  c.aepo = aepo_defaults()
  c.optim = optim_defaults()
  c.ppo_epochs = 1  # passes over each rollout batch (verl/EasyR1 default)
  c.grading_workers = 2  # processes that grade answers (math-verify), each item under a timeout

  c.data = data_defaults()
  # Supervised warm start on the synthetic task's programmatic traces (tiny runs; data.kind=synthetic); 0 steps = none.
  # unboxed_rate: share of warm-start traces that state the answer without \boxed{} (format to learn in RL).
  # min_steps / max_steps: its own difficulty range (0: data.min_steps / data.max_steps).
  # slip_rate: per-step probability that a warm-start trace's step comes out one too high (wrong answer); the
  # checks task has data.slips' blind spots instead, and works carefully (checks every step) with probability
  # check_rate.
  # weight_decay: AdamW's, for the warm start alone (the rest of config.optim is shared).
  # over_checkpoint: also warm-start a policy loaded from model.hf_path (never by default: it would overwrite it).
  c.warm_start = ml_collections.ConfigDict(dict(steps=0, batch_size=32, lr=1e-3, weight_decay=1e-2, unboxed_rate=0.0,
                                                slip_rate=0.0, check_rate=0.5, min_steps=0, max_steps=0,
                                                over_checkpoint=False))
  # Evaluation (evaluation/, stage `eval`). AEPO scores `prompts` held-out prompts every `every` steps (0 = never),
  # greedy, or with samples > 0 the mean over that many samples per prompt at the rollout temperature (avg@k).
  # benchmarks: ("name=path", ...) in any layout data/reader.py reads: the eval stage scores them (instead of
  # the held-out prompts) and AEPO adds them to every evaluation; max_items per benchmark (0 = all);
  # batch_prompts: prompts per sampling call; group_by: "" | "column" (every benchmark with it) |
  # "name=column,..." -- a group counts only if all its rows are right (DynaMath's worst case);
  # rescore: re-judge {workdir}/eval/<name>.jsonl without a model.
  c.eval = ml_collections.ConfigDict(dict(every=0, prompts=64, samples=0, benchmarks=(), max_items=0,
                                          batch_prompts=64, group_by="", rescore=False))
  c.export_every = 0  # AEPO exports its policy to {workdir}/policy/ at the end and every this many steps (0: end only)
  c.adacs = adacs_defaults()

  c.sample = ml_collections.ConfigDict()
  c.sample.prompts = ()  # empty: problems of the synthetic task
  c.sample.num_prompts = 2
  c.sample.images = True  # synthetic prompts: every other one also shown as an image
  c.sample.tau_high = config_dict.placeholder(float)  # unset: from a warm-up batch

  # Memory plans (`python -m ares_jax.plan`) and the automatic rollout chunk (rollout.chunk_prompts=0):
  # image load per prompt, images at `image_pixels` (0: processor.max_pixels); HBM per device (0: the
  # device's own, or the topology's); a program fits when resident state + its peak <= usable * HBM.
  c.plan = ml_collections.ConfigDict(dict(images_per_prompt=1, image_pixels=0, hbm_gib=0.0, usable=0.95))

  c.inspect = ml_collections.ConfigDict()
  c.inspect.forward = True  # False: only the parameter table (no weights are loaded or initialised)
  c.inspect.prompt = "How many sides does the shape in the image have? Put the answer in \\boxed{}."
  c.inspect.image_size = (96, 128)  # (height, width) of the drawn test image
  c.inspect.top_k = 5
  return c


def data_defaults() -> ml_collections.ConfigDict:
  """Prompts for RL and held-out evaluation (data/reader.py, data/prompts.py, data/template.py)."""
  d = ml_collections.ConfigDict()
  d.kind = "synthetic"  # synthetic: the built-in task | files: data.paths | tfds: data.tfds_dir (data/build.py)
  # kind=files: JSONL / parquet / VLMEvalKit TSV files or folders (a ViRL39K folder, an EasyR1 parquet, ...).
  d.paths = ()
  d.tfds_dir = ""  # kind=tfds: a dataset folder written by `python -m ares_jax.data.build`
  # Held-out prompts: these files when given, else the rows whose id hashes below eval_fraction (never trained on).
  d.eval_paths = ()
  d.eval_fraction = 0.02
  d.image_root = ""  # image paths are relative to this folder ("" = each data file's own folder)
  d.shuffle = True  # a fresh permutation of the training rows every epoch (seeded by config.seed)
  d.max_image_pixels = 89_478_485  # larger images are skipped as decompression bombs (PIL's default bound)
  # The prompt: the tokenizer's chat template; system_prompt unset = the template's default system turn,
  # "" = no system turn; the instruction goes after (or before) the question.
  d.system_prompt = config_dict.placeholder(str)
  d.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
  d.instruction_position = "after"  # after | before
  # Column names when a layout names them otherwise ("" = found by name: question | problem | prompt, ...).
  d.columns = ml_collections.ConfigDict({k: "" for k in (
      "question", "answer", "image", "id", "source", "category", "pass_rate", "difficulty", "response")})
  # The synthetic task (kind=synthetic): "Mod 10, start s, apply +d k times", k in [min_steps, max_steps].
  # task=steps: the difficulty is k; task=checks: the operand's level, and checking is the policy's choice
  # (data/synthetic.py): the solvers' steps have blind spots on a fraction slips.levels[L - 1] of level L's
  # (value, operand) pairs, their check lines on a fraction slips.check of all pairs (drawn from config.seed).
  d.task, d.min_steps, d.max_steps, d.ops, d.images = "steps", 1, 6, "+-*", False
  d.slips = ml_collections.ConfigDict(dict(levels=(0.0, 0.12, 0.3), check=0.1))
  return d


def adacs_defaults() -> ml_collections.ConfigDict:
  """AdaCS (design.md 6): pool, pass rates, selection budget and the SFT step (paper: 2 epochs, lr 2e-5)."""
  a = ml_collections.ConfigDict()
  # JSONL / parquet files or folders in the ARES cold-start layout (question, image(s), answer, response,
  # source; optional id, pass_rate). Empty: the synthetic task with teacher traces of varied length.
  a.pool_paths = ()
  a.synthetic_questions = 512
  a.max_checks = 3  # synthetic teacher traces re-check 0..max_checks of their last steps
  a.slip_rate = 0.15  # each synthetic teacher trace is wrong (one slipped step) with this probability
  a.pass_rate_samples = 8  # n of design.md 6
  a.pass_rate_batch = 64  # questions per sampling call (and per line block of pass_rates.jsonl)
  a.max_response_length = 4096  # longer candidates cannot be trained on and are not eligible
  a.budget = 1 << 30  # questions to select; the tiers are filled evenly up to it
  a.epochs = 2
  a.batch_size = 256  # examples per optimizer step
  a.micro_batch_size = 8  # gradient accumulation
  a.lr = 2e-5
  a.freeze_vision = True
  a.eval_prompts = 64  # held-out synthetic problems for Spearman(length, difficulty) before/after SFT
  return a


def rollout_defaults() -> ml_collections.ConfigDict:
  """Sampling settings of an AEPO step (design.md 5.4, 5.10)."""
  r = ml_collections.ConfigDict()
  r.n = 8  # trajectories per prompt
  r.temperature = 1.0
  r.top_p = 0.99
  r.top_k = -1  # -1: off
  r.max_branches = 4  # per prompt (n / 2); forks at high-window-entropy positions
  r.prompts_per_step = 512  # rollout batch (EasyR1 default; the paper does not state it)
  r.max_prompt_length = 2048
  r.max_response_length = 2048
  # Prompts per compiled rollout call (bounds the KV cache); 0: the largest that fits the memory budget,
  # found by the memory planner at startup. Results do not depend on it.
  r.chunk_prompts = 0
  return r


def aepo_defaults() -> ml_collections.ConfigDict:
  """AEPO's algorithm settings with the paper's / design.md's defaults (sections 5.1-5.10)."""
  a = ml_collections.ConfigDict()
  a.window = 4  # w of the window entropy (5.1); the sampler uses it too
  a.entropy_quantile = 0.95  # per-trajectory quantile averaged into tau_high (5.2)
  a.tau_ema = 0.0  # 0: off; else EMA decay of tau_high
  a.trigger_words = ()  # empty: count every marked window (5.3)
  a.easy_threshold = 2 / 3  # pass rate >= this: easy (5.5)
  a.hard_threshold = 1 / 3  # pass rate < this: hard
  a.target_mode = "correct_mean"  # correct_mean | batch_mean | ema | ares_release (5.6)
  a.max_penalty = 1.0
  a.eps = 1e-6
  a.format_weight = 0.0  # (5.7)
  a.grading_timeout_s = 5.0
  a.filter_low = 0.01  # DAPO online filter bounds on group mean accuracy (5.8)
  a.filter_high = 0.99
  a.kl_coef = 1e-2  # (5.9)
  a.kl_bin_scale = (2.0, 1.0, 0.5)  # beta_d = kl_coef * scale for (easy, medium, hard)
  a.rho = 0.5  # KL relaxation inside validated HWE windows
  a.ref_dtype = "bfloat16"  # the reference policy's parameters (design.md 7: half the memory of fp32)
  a.clip_low = 0.2  # (5.10)
  a.clip_high = 0.28
  a.dual_clip = 0.0  # 0: off; else the dual-clip constant c (> 1)
  a.loss_agg = "token_mean"  # token_mean | seq_mean_token_mean
  a.global_batch_size = 128  # trajectories per optimizer step (EasyR1 default)
  a.micro_batch_size = 8
  a.max_skipped_updates = 20  # stop with an error after this many non-finite (skipped) updates in a row; 0: never
  return a


def optim_defaults() -> ml_collections.ConfigDict:
  """AdamW as in the paper's RL stage (5.10)."""
  o = ml_collections.ConfigDict()
  o.lr = 1e-6
  o.weight_decay = 1e-2
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.grad_clip = 1.0
  o.warmup_steps = 0
  o.schedule = "constant"  # constant (the paper) | cosine
  return o


def qwen25vl_vision(**overrides: Any) -> ml_collections.ConfigDict:
  """The Qwen2.5-VL vision tower (the same for 3B and 7B except `out_hidden_size`)."""
  v = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
           in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
           fullatt_block_indexes=(7, 15, 23, 31), rope_theta=10000.0, tokens_per_second=2)
  unknown = set(overrides) - set(v)
  if unknown:
    raise KeyError(f"unknown vision fields {sorted(unknown)}")
  v.update(overrides)
  return ml_collections.ConfigDict(v)


def qwen25vl_7b() -> ml_collections.ConfigDict:
  """`config.model` of Qwen2.5-VL-7B-Instruct (untied head), bf16 compute over fp32 master weights, full remat."""
  return model_fields(
      vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
      num_kv_heads=4, rms_norm_eps=1e-6, rope_theta=1e6, mrope_section=(16, 24, 24),
      tie_word_embeddings=False, vision=qwen25vl_vision(),
      dtype="bfloat16", param_dtype="float32", remat_policy="full")


def model_fields(*, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
                 num_kv_heads: int, tie_word_embeddings: bool, vision: ml_collections.ConfigDict,
                 rms_norm_eps: float = 1e-6, rope_theta: float = 1e6, mrope_section: tuple[int, int, int] = (16, 24, 24),
                 max_position_embeddings: int = 128000, token_ids: dict[str, int] | None = None,
                 dtype: str = "float32", param_dtype: str = "float32",
                 remat_policy: str = "none", attention: str = "auto") -> ml_collections.ConfigDict:
  """`config.model`: the architecture (mirrors HF config.json), numerics, and an optional checkpoint.

  `vision.out_hidden_size` is tied to `hidden_size` by a FieldReference, so overriding the width
  on the command line keeps the vision merger consistent.
  """
  m = ml_collections.ConfigDict()
  m.hf_path = config_dict.placeholder(str)  # HF Qwen2.5-VL folder; unset: random initialisation
  m.vocab_size = vocab_size
  m.hidden_size = hidden_size
  m.intermediate_size = intermediate_size
  m.num_layers = num_layers
  m.num_heads = num_heads
  m.num_kv_heads = num_kv_heads
  m.rms_norm_eps = rms_norm_eps
  m.rope_theta = rope_theta
  m.mrope_section = tuple(mrope_section)
  m.max_position_embeddings = max_position_embeddings
  m.tie_word_embeddings = tie_word_embeddings
  m.vision = vision
  m.vision.out_hidden_size = m.get_ref("hidden_size")
  for k, val in (token_ids or QWEN_TOKEN_IDS).items():
    m[k] = val
  m.dtype = dtype  # compute dtype
  m.param_dtype = param_dtype
  m.remat_policy = remat_policy  # none | full | dots | dots_with_no_batch_dims
  m.attention = attention  # auto | xla | blockwise | splash | cudnn (auto: by the mesh's platform)
  m.lora = lora_defaults()
  return m


def lora_defaults() -> ml_collections.ConfigDict:
  """`config.model.lora` (models/lora.py): rank 0 trains the whole model; rank > 0 trains LoRA adapters on
  `targets` (q k v o gate up down of the decoder; vision_attn, merger of the vision tower) over a frozen base."""
  lo = ml_collections.ConfigDict()
  lo.rank = 0
  lo.alpha = 16.0  # the update is (alpha / rank) B A x
  lo.dropout = 0.0  # on the adapters' input, in training
  lo.targets = ("q", "k", "v", "o", "gate", "up", "down")
  lo.adapter_path = config_dict.placeholder(str)  # a PEFT folder to continue from (its rank, alpha, targets)
  return lo


def to_model_config(m: ml_collections.ConfigDict) -> "ModelConfig":
  """`config.model` -> `models.ModelConfig`, checking the shapes fit; errors name the config field."""
  from ares_jax.models import ConfigError, ModelConfig, TextConfig, VisionConfig

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


def _lora_config(lo: ml_collections.ConfigDict | None):
  from ares_jax.models.lora import LoraConfig  # pylint: disable=g-import-not-at-top  (configs stays light)
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


def architecture_mismatches(m: ml_collections.ConfigDict, loaded: "ModelConfig") -> list[str]:
  """Fields where `config.model` disagrees with a checkpoint's config.json, as readable lines."""
  out = []
  for ours, theirs in _ARCH_FIELDS:
    a, b = _get(m, ours), _get(loaded, theirs)
    if a != b:
      out.append(f"config.model.{ours}={a!r} but the checkpoint has {b!r}")
  return out
