"""What every stage builds first from a config: mesh, tokenizer, processor, model parameters (and, for
the synthetic task, the supervised warm start that stands in for a pretrained base model)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ares_jax import memory_plan, models, sampling, sharding, storage
from ares_jax import settings as settings_lib
from ares_jax.config_checks import DATA_KINDS
from ares_jax.data import processor as processor_lib
from ares_jax.data import tokenizer as tokenizer_lib
from ares_jax.data import reader, synthetic, tfds_source
from ares_jax.data.grading import Grader
from ares_jax.data.prompts import PromptStream, RowSource, SyntheticSource, split_rows
from ares_jax.data.template import PromptTemplate, ensure_chat_template
from ares_jax.models import hf_io, lora, peft_io
from ares_jax.models.qwen25vl import init_adapters
from ares_jax.train import run_control, sft


@dataclasses.dataclass(frozen=True)
class Built:
  """What a stage that runs the model starts from: the mesh, the model config, tokenizer, processor and
  parameters (loaded from `config.model.hf_path`, else a sharded random initialisation)."""

  mesh: jax.sharding.Mesh
  mcfg: models.ModelConfig
  tokenizer: Any
  processor: processor_lib.QwenVLProcessor
  params: Any

  @property
  def pad_id(self) -> int:
    return int(self.tokenizer.pad_token_id or 0)


def build(config: ml_collections.ConfigDict) -> Built:
  """The mesh, checked tokenizer, processor and parameters of `config`, then its workdir."""
  mesh = build_mesh(config)
  mcfg = settings_lib.model(config.model)
  tok = build_tokenizer(config)
  check_tokenizer(tok, mcfg)
  proc = build_processor(config, tok, mcfg)
  mcfg, params = build_params(config, mcfg, models.abstract_params(mcfg), mesh)
  # Last: a run stopped by its mesh, tokenizer or checkpoint leaves no empty workdir behind.
  storage.makedirs(config.workdir)  # local or gs://
  return Built(mesh, mcfg, tok, proc, params)


def prompt_stream(config: ml_collections.ConfigDict, processor, split: int) -> PromptStream:
  """Prompts of split `split` of `config.data` (see `make_source`), templated and length-checked; the
  training split (0) of a dataset is shuffled every epoch when `data.shuffle`."""
  d = config.data
  return PromptStream(make_source(config, split), processor, prompt_template(config, processor.tokenizer),
                      config.rollout.max_prompt_length, d.max_image_pixels,
                      # tfds: Grain shuffles and repeats (data/tfds_source.py); the stream walks it in order
                      shuffle=bool(d.shuffle) and split == 0 and d.kind == "files", seed=config.seed)


def prompt_template(config: ml_collections.ConfigDict, tokenizer) -> PromptTemplate:
  d = config.data
  return PromptTemplate(tokenizer, d.system_prompt, d.instruction, d.instruction_position)


def columns(config: ml_collections.ConfigDict) -> reader.Columns:
  return reader.Columns.with_overrides(**dict(config.data.columns))


def build_grader(config: ml_collections.ConfigDict) -> Grader:
  return Grader(workers=config.grading_workers, timeout_s=config.aepo.grading_timeout_s)


def build_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  m = config.mesh
  return sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor)


def build_tokenizer(config: ml_collections.ConfigDict):
  kind = config.tokenizer.kind
  if kind == "tiny":
    return ensure_chat_template(tokenizer_lib.tiny_tokenizer())
  if kind == "hf":
    path = config.tokenizer.path or config.model.hf_path
    if not path:
      raise ValueError("config.tokenizer.kind='hf' needs a local folder: set --config.model.hf_path (a Qwen2.5-VL "
                       "checkpoint folder) or --config.tokenizer.path, or run with --config.inspect.forward=False")
    return ensure_chat_template(tokenizer_lib.load_tokenizer(path), path)
  raise ValueError(f"config.tokenizer.kind={kind!r}: expected 'tiny' or 'hf'")


def check_tokenizer(tok: Any, mcfg: models.ModelConfig) -> None:
  """The model's special token ids must be the tokenizer's, or images silently become text."""
  wanted = {"<|image_pad|>": mcfg.image_token_id, "<|video_pad|>": mcfg.video_token_id,
            "<|vision_start|>": mcfg.vision_start_token_id, "<|vision_end|>": mcfg.vision_end_token_id}
  bad = [f"{t}: tokenizer {tok.convert_tokens_to_ids(t)} vs model {i}" for t, i in wanted.items()
         if tok.convert_tokens_to_ids(t) != i]
  if bad:
    raise ValueError("tokenizer and config.model disagree on special token ids: " + "; ".join(bad))
  if len(tok) > mcfg.text.vocab_size:
    raise ValueError(f"tokenizer has {len(tok)} tokens but config.model.vocab_size={mcfg.text.vocab_size}")


def build_params(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, boxed: Any,
                 mesh: jax.sharding.Mesh) -> tuple[models.ModelConfig, Any]:
  """Checkpoint weights when `config.model.hf_path` is set, else a sharded random initialisation. With
  LoRA (`config.model.lora`), the base is frozen in the compute dtype and the adapters are fresh (B = 0)
  or imported from the PEFT folder `model.lora.adapter_path` (whose rank, alpha and targets then hold)."""
  adapter_path = (config.model.get("lora") or {}).get("adapter_path")
  if adapter_path:
    mcfg = mcfg.replace(lora=peft_io.read_lora_config(adapter_path, dropout=mcfg.lora.dropout))
    logging.info("LoRA adapters from %s: %s", adapter_path, mcfg.lora)
    boxed = models.abstract_params(mcfg)
  shardings = sharding.param_shardings(boxed, mesh)
  if config.model.hf_path:
    path = config.model.hf_path
    bad = settings_lib.architecture_mismatches(config.model, hf_io.read_config(path))  # before reading weights
    if bad:
      raise models.ConfigError(f"the checkpoint {path} does not match the config file:\n  " + "\n  ".join(bad))
    logging.info("loading %s onto the mesh", path)
    # A LoRA base is read straight into the compute dtype: it is never updated.
    dtype = mcfg.dtype if mcfg.lora.enabled else mcfg.param_dtype
    loaded, params = models.load_hf(path, jnp.dtype(dtype), mesh=mesh, remat_policy=mcfg.remat_policy)
    # load_hf computes in the parameter dtype with automatic attention; the config's choices win.
    mcfg = loaded.replace(dtype=mcfg.dtype, attention=mcfg.attention, param_dtype=mcfg.param_dtype, lora=mcfg.lora)
  else:
    init = jax.jit(lambda key: models.init_params(mcfg, key), out_shardings=shardings)
    params = init(jax.random.key(config.seed))  # fresh adapters included
  if not mcfg.lora.enabled:
    return mcfg, params
  if adapter_path:
    adapters = peft_io.load_peft(adapter_path, mcfg, shardings[lora.POLICY_KEY])
  else:
    adapters = params.get(lora.POLICY_KEY)
    if adapters is None:
      adapters = init_adapters(mcfg, jax.random.fold_in(jax.random.key(config.seed), 1),
                                    shardings[lora.POLICY_KEY])
  return mcfg, lora.with_adapters(lora.frozen_base(mcfg, params), adapters)


def build_processor(config: ml_collections.ConfigDict, tok: Any,
                    mcfg: models.ModelConfig) -> processor_lib.QwenVLProcessor:
  """The Qwen2.5-VL processor with the config's pixel bounds and the model's patch geometry."""
  vc = mcfg.vision
  return processor_lib.QwenVLProcessor.create(
      tok, min_pixels=config.processor.min_pixels, max_pixels=config.processor.max_pixels,
      patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
      video=settings_lib.video(config))


def chunked(config: ml_collections.ConfigDict, b: Built, sc: sampling.SamplingConfig, most: int,
            resident: Any = ()) -> sampling.SamplingConfig:
  """`sc` with its rollout size set: the config's, or (0) the largest of at most `most` prompts whose
  rollout fits beside the device arrays `resident` (optimizer state, reference policy), by the memory
  planner on this run's devices: `chunk_prompts` for the dense engine, `prompts_in_flight` for the paged."""
  field = "prompts_in_flight" if sc.kv_cache == "paged" else "chunk_prompts"
  if getattr(sc, field):
    return sc
  size = memory_plan.auto_chunk(config, b.mesh, b.mcfg, sc, most, memory_plan.device_bytes(resident),
                                branching=sc.max_branches != 0)
  return dataclasses.replace(sc, **{field: size})


def make_source(config: ml_collections.ConfigDict, split_seed: int = 0):
  """Split 0: AEPO train prompts (and the warm start); 1: held-out evaluation (AdaCS before and after SFT,
  AEPO); the synthetic AdaCS pool draws from seed * 1000 + 2. Datasets have two splits: the
  training rows, and `data.eval_paths` or else the rows whose id hashes below `data.eval_fraction`."""
  d = config.data
  if d.kind == "synthetic":
    return SyntheticSource(config.seed * 1000 + split_seed, d.min_steps, d.max_steps, d.images, d.ops, d.task)
  if d.kind == "files":
    train, held = _dataset_rows(tuple(d.paths), tuple(d.eval_paths), d.eval_fraction, d.image_root or None,
                                columns(config))
    return RowSource(train if split_seed == 0 else held)
  if d.kind == "tfds":
    return tfds_source.source(settings_lib.tfds(config), split_seed)
  raise ValueError(f"config.data.kind={d.kind!r}: expected one of {DATA_KINDS}")


@functools.lru_cache(maxsize=2)
def _dataset_rows(paths: tuple, eval_paths: tuple, eval_fraction: float, image_root: str | None,
                  cols: reader.Columns) -> tuple[list, list]:
  """(training rows, held-out rows), read once per run: each stream of a stage shares them."""
  rows = reader.read_rows(paths, cols, image_root)
  if eval_paths:
    held = reader.read_rows(eval_paths, cols, image_root)
    held_ids = {r.id for r in held}
    train = [r for r in rows if r.id not in held_ids]  # a row in both files is never trained on
  else:
    train, held = split_rows(rows, eval_fraction)
  if not train:
    raise ValueError(f"config.data.paths={paths} holds no usable training row")
  logging.info("data: %d training rows, %d held-out rows", len(train), len(held))
  return train, held


def synthetic_slips(config: ml_collections.ConfigDict) -> synthetic.Slips:
  """The checks task's blind spots (config.data.slips), drawn from the run's seed."""
  s = config.data.slips
  return synthetic.Slips(tuple(s.levels), s.check, config.seed)


def warm_start(config, mcfg, params, stream: PromptStream, pad_id: int, tokenizer) -> Any:
  """Supervised warm start on the synthetic task's programmatic traces (config.warm_start)."""
  w = config.warm_start
  eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
  if w.max_steps:  # a difficulty range of its own (e.g. wider than the RL prompts')
    d = config.data
    source = SyntheticSource(config.seed * 1000, w.min_steps or d.min_steps, w.max_steps, d.images, d.ops, d.task)
    stream = PromptStream(source, stream.processor, stream.template, stream.max_prompt_length)

  slips = synthetic_slips(config)

  def batches(step):
    exs, _ = stream.take(10_000_000 + step * w.batch_size, w.batch_size)
    prompts = [e.prompt for e in exs]
    # A base policy that does not always follow the answer format (w.unboxed_rate): RL's first job.
    rng = np.random.default_rng([config.seed, step])
    boxed = rng.random(len(exs)) >= w.unboxed_rate
    traces = []
    for e, b in zip(exs, boxed):
      p = stream.source.problem(e.index)
      if p.task == "checks":
        # A base policy that checks each step with probability w.check_rate whatever the problem, with
        # the task's blind spots: how much to check is what AdaCS and AEPO can teach it.
        traces.append(p.solver_trace(slips, rng, check_rate=w.check_rate, boxed=bool(b)))
        continue
      # A base policy that slips (one step one too high) with probability w.slip_rate per step: its
      # pass rate falls with the number of steps, and not slipping is what RL can teach it.
      slipped = np.flatnonzero(rng.random(p.steps) < w.slip_rate).tolist()
      traces.append(p.trace(slips=slipped, boxed=bool(b)))
    responses = [np.array(tokenizer(t)["input_ids"] + [eos], np.int32) for t in traces]
    return prompts, responses

  # SIGTERM / a preemption notice stops it too (it has no checkpoint: a rerun redoes it, as it is deterministic).
  with run_control.StopRequests(settings_lib.checkpoint(config).preemption, "warm start") as stop:
    def on_step(step: int, _) -> None:
      if stop.should_stop(step + 1):
        raise run_control.Preempted("warm start", step + 1, None)

    # It stands in for pretraining: it trains the base (a LoRA policy's adapters stay as they are).
    base, losses = sft.run_sft(lora.base_config(mcfg), lora.base_params(params), batches,
                               settings_lib.warm_start_sft(config, sharding.mesh_of(params)), w.steps,
                               pad_id=pad_id, rng=jax.random.key(config.seed), desc="warm start", on_step=on_step)
  logging.info("warm start: loss %.3f -> %.3f over %d steps", losses[0], losses[-1], len(losses))
  return lora.with_adapters(base, params.get(lora.POLICY_KEY))
