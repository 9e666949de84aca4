"""Building blocks of the experiment configs in `configs/`.

Every file in `configs/` is a big_vision-style `get_config()` returning an `ml_collections`
ConfigDict; `--config.a.b=value` overrides it on the command line. The pieces that all experiments
share (the top-level fields, the Qwen2.5-VL vision tower, the paper's AEPO hyper-parameters) are
built here once, so an experiment file only states what makes it different.

This module is imported while flags are parsed, before `jax.distributed.initialize()`: it imports no JAX.
`ares_jax/settings.py` turns the finished ConfigDict into the typed settings the code below the stages takes.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from ares_jax.config_checks import DATA_KINDS, STAGES  # noqa: F401  (ares: adacs, then aepo from its policy)

# Qwen2.5-VL's token ids (identical for 3B and 7B).
QWEN_TOKEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                      vision_end_token_id=151653, bos_token_id=151643, eos_token_id=151645)


def base_config(stage: str, workdir: str) -> ml_collections.ConfigDict:
  """Top-level fields every experiment has, with the paper's RL hyper-parameters (docs/design.md §5)."""
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
  # Every new compile is logged in one line (name, seconds, persistent-cache hit); True adds JAX's own line
  # with the program's global shapes and types (to chase shape churn: a bounded set per run is expected).
  c.log_compiles = False

  # Device mesh (docs/design.md §8.1): one size may be -1 to take the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.kind = "hf"  # "hf": a local folder; "tiny": the built-in tiny BPE (data/tokenizer.py)
  c.tokenizer.path = config_dict.placeholder(str)  # defaults to config.model.hf_path

  # Image preprocessing bounds (pixels after smart_resize). EasyR1's defaults; the paper is silent.
  c.processor = ml_collections.ConfigDict(dict(min_pixels=262144, max_pixels=4194304))
  # Videos (data/video.py): sampled at video_fps, video_min_frames..video_max_frames frames, each frame within
  # video_min_pixels..video_max_pixels and the clip within video_total_pixels. qwen-vl-utils' defaults.
  c.processor.update(dict(video_fps=2.0, video_min_pixels=128 * 28 * 28, video_max_pixels=768 * 28 * 28,
                          video_total_pixels=int(128000 * 28 * 28 * 0.9), video_min_frames=4, video_max_frames=768))

  c.rollout = rollout_defaults()
  c.aepo = aepo_defaults()
  c.optim = optim_defaults()
  c.ppo_epochs = 1  # passes over each rollout batch (verl/EasyR1 default)
  # Update rows of scoring and training (README "How updates are laid out", docs/design.md §10.5): "shared_prompt"
  # (each prompt once per group, its responses after it, rows packed end to end), "packed" (prompt + response
  # sequences end to end) or "none" (one padded row per sequence, `micro_batch_size` rows per micro-batch).
  # tokens_per_micro_batch: tokens per micro-batch (0: the stage's micro_batch_size x its longest prompt +
  # response, rounded up to 128); row_tokens: tokens per row (0: packed, that longest sequence; shared_prompt,
  # three of them, at most a device's share of the micro-batch: a row shorter than a group repeats its prompt).
  c.updates = ml_collections.ConfigDict(dict(packing="shared_prompt", row_tokens=0, tokens_per_micro_batch=0))
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
  # one video per prompt of `prompts` (a file, a folder of frames; "" = none), decoded as data rows' videos are
  c.sample.videos = ()
  c.sample.num_prompts = 2
  c.sample.images = True  # synthetic prompts: every other one also shown as an image
  c.sample.tau_high = config_dict.placeholder(float)  # unset: from a warm-up batch

  # Memory plans (`python -m ares_jax.plan`) and the automatic rollout chunk (rollout.chunk_prompts=0):
  # image load per prompt, images at `image_pixels` (0: processor.max_pixels); video load per prompt,
  # `video_frames` frames a video at `video_pixels` a frame (default: Video-R1's training setting); HBM per device (0: the
  # device's own, or the topology's); a program fits when resident state + its peak <= usable * HBM. The
  # predicted step time (`step_time`) at expected prompt (image tokens included) and response lengths, with
  # compute-bound programs at `mfu` of the chip's peak.
  c.plan = ml_collections.ConfigDict(dict(images_per_prompt=1, image_pixels=0, videos_per_prompt=0,
                                          video_frames=16, video_pixels=128 * 28 * 28, hbm_gib=0.0, usable=0.95,
                                          prompt_tokens=1500, response_tokens=1000, mfu=0.4))

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
      "question", "answer", "image", "video", "id", "source", "category", "pass_rate", "difficulty", "response")})
  # The synthetic task (kind=synthetic): "Mod 10, start s, apply +d k times", k in [min_steps, max_steps].
  # task=steps: the difficulty is k; task=checks: the operand's level, and checking is the policy's choice
  # (data/synthetic.py): the solvers' steps have blind spots on a fraction slips.levels[L - 1] of level L's
  # (value, operand) pairs, their check lines on a fraction slips.check of all pairs (drawn from config.seed).
  d.task, d.min_steps, d.max_steps, d.ops, d.images = "steps", 1, 6, "+-*", False
  d.slips = ml_collections.ConfigDict(dict(levels=(0.0, 0.12, 0.3), check=0.1))
  return d


def adacs_defaults() -> ml_collections.ConfigDict:
  """AdaCS (docs/design.md §6): pool, pass rates, selection budget and the SFT step (paper: 2 epochs, lr 2e-5)."""
  a = ml_collections.ConfigDict()
  # JSONL / parquet files or folders in the ARES cold-start layout (question, image(s), answer, response,
  # source; optional id, pass_rate). Empty: the synthetic task with teacher traces of varied length.
  a.pool_paths = ()
  a.synthetic_questions = 512
  a.max_checks = 3  # synthetic teacher traces re-check 0..max_checks of their last steps
  a.slip_rate = 0.15  # each synthetic teacher trace is wrong (one slipped step) with this probability
  a.pass_rate_samples = 8  # n of docs/design.md §6.2
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
  """Sampling settings of an AEPO step (docs/design.md §5.4, §5.10)."""
  r = ml_collections.ConfigDict()
  r.n = 8  # trajectories per prompt
  r.temperature = 1.0
  r.top_p = 0.99
  r.top_k = -1  # -1: off
  r.max_branches = 4  # per prompt (n / 2); forks at high-window-entropy positions
  r.prompts_per_step = 512  # rollout batch (EasyR1 default; the paper does not state it)
  r.max_prompt_length = 2048
  r.max_response_length = 2048
  # How rollouts hold their KV (README "How rollouts are decoded"): "paged" (each prompt once per group,
  # responses in pages of `page_size` tokens, copy-on-write forks, ended groups refilled) or "dense" (a full
  # row per trajectory; the reference engine). Results do not depend on any of these fields.
  r.kv_cache = "paged"
  r.page_size = 64
  # paged: groups decoding together; 0: the largest that fits the memory budget (the memory planner, at
  # startup; all of a call's prompts on CPU)
  r.prompts_in_flight = 0
  # paged: once no prompt waits, the groups still decoding move into half as many slots whenever at most
  # half are busy, up to this many times per call (each size compiles one more decode program; 0: never)
  r.drain_halvings = 3
  # paged decode attention: "per_group" (each group's pages read once for all its slots: fewest bytes, G x
  # the score flops), "per_slot" (each slot gathers its own pages: fewest flops), "auto" (CPU: per_slot)
  r.decode_attention = "auto"
  # dense: prompts per compiled rollout call (bounds the KV cache); 0: the largest that fits, planned at
  # startup. paged: prompts prefilled per call (0: an eighth of the groups in flight)
  r.chunk_prompts = 0
  return r


def aepo_defaults() -> ml_collections.ConfigDict:
  """AEPO's algorithm settings with the paper's / docs/design.md's defaults (§5.1-5.10)."""
  a = ml_collections.ConfigDict()
  a.window = 4  # w of the window entropy (§5.1); the sampler uses it too
  a.entropy_quantile = 0.95  # per-trajectory quantile averaged into tau_high (§5.2)
  a.tau_ema = 0.0  # 0: off; else EMA decay of tau_high
  a.trigger_words = ()  # empty: count every marked window (§5.3)
  a.easy_threshold = 2 / 3  # pass rate >= this: easy (§5.5)
  a.hard_threshold = 1 / 3  # pass rate < this: hard
  a.target_mode = "correct_mean"  # correct_mean | batch_mean | ema | ares_release (§5.6)
  a.max_penalty = 1.0
  a.eps = 1e-6
  a.format_weight = 0.0  # (§5.7)
  a.grading_timeout_s = 5.0
  a.filter_low = 0.01  # DAPO online filter bounds on group mean accuracy (§5.8)
  a.filter_high = 0.99
  a.kl_coef = 1e-2  # (§5.9)
  a.kl_bin_scale = (2.0, 1.0, 0.5)  # beta_d = kl_coef * scale for (easy, medium, hard)
  a.rho = 0.5  # KL relaxation inside validated HWE windows
  a.ref_dtype = "bfloat16"  # the reference policy's parameters (docs/design.md §5.9: half the memory of fp32)
  a.clip_low = 0.2  # (§5.10)
  a.clip_high = 0.28
  a.dual_clip = 0.0  # 0: off; else the dual-clip constant c (> 1)
  a.loss_agg = "token_mean"  # token_mean | seq_mean_token_mean
  a.global_batch_size = 128  # trajectories per optimizer step (EasyR1 default)
  a.micro_batch_size = 8
  a.max_skipped_updates = 20  # stop with an error after this many non-finite (skipped) updates in a row; 0: never
  return a


def optim_defaults() -> ml_collections.ConfigDict:
  """AdamW as in the paper's RL stage (docs/design.md §5.10)."""
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
