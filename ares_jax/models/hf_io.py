"""Hugging Face checkpoint import/export: one declarative table, safetensors only.

`load_hf` validates every tensor's name and shape before reading any data, then builds each
parameter directly on its target sharding with `jax.make_array_from_callback`: a device's shard is
assembled from just the tensors (layers) it needs, so the host never holds the whole model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from flax import traverse_util
from safetensors import safe_open

from ares_jax import sharding, storage
from ares_jax.models.config import ModelConfig, from_hf_dict, to_hf_dict
from ares_jax.models.qwen25vl import abstract_params


class CheckpointError(ValueError):
  """A checkpoint that does not fit the config; names the tensor and both shapes."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """HF tensor `hf` ({i} = layer index) <-> Flax parameter `path` (stacked on axis 0 when {i} is used).

  kind: 'linear' (HF [out, in] <-> Flax kernel [*in, *out] with `n_in` input dims), 'conv' (HF
  Conv3d [E, C, T, P, P] <-> Flax [C*T*P*P, E]), 'bias' (HF [out] <-> Flax [*out], e.g. [heads,
  head_dim]), 'same' (identical shapes: norms, embeddings, 1-D biases).
  """

  hf: str
  path: str
  kind: str = "same"
  n_in: int = 1
  only_untied: bool = False

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf


_TEXT_LAYER = "model.layers.{i}."
_VIS_BLOCK = "visual.blocks.{i}."
TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed_tokens/embedding"),
    Rule("model.norm.weight", "norm/scale"),
    Rule("lm_head.weight", "lm_head", "linear", only_untied=True),
    Rule(_TEXT_LAYER + "input_layernorm.weight", "decoder/layers/input_layernorm/scale"),
    Rule(_TEXT_LAYER + "post_attention_layernorm.weight", "decoder/layers/post_attention_layernorm/scale"),
    *(Rule(_TEXT_LAYER + f"self_attn.{p}_proj.weight", f"decoder/layers/self_attn/{p}_proj/kernel", "linear")
      for p in "qkv"),
    *(Rule(_TEXT_LAYER + f"self_attn.{p}_proj.bias", f"decoder/layers/self_attn/{p}_proj/bias", "bias")
      for p in "qkv"),
    Rule(_TEXT_LAYER + "self_attn.o_proj.weight", "decoder/layers/self_attn/o_proj/kernel", "linear", n_in=2),
    *(Rule(_TEXT_LAYER + f"mlp.{p}.weight", f"decoder/layers/mlp/{p}/kernel", "linear")
      for p in ("gate_proj", "up_proj", "down_proj")),
    Rule("visual.patch_embed.proj.weight", "visual/patch_embed/kernel", "conv"),
    Rule(_VIS_BLOCK + "norm1.weight", "visual/blocks/norm1/scale"),
    Rule(_VIS_BLOCK + "norm2.weight", "visual/blocks/norm2/scale"),
    Rule(_VIS_BLOCK + "attn.qkv.weight", "visual/blocks/qkv/kernel", "linear"),
    Rule(_VIS_BLOCK + "attn.qkv.bias", "visual/blocks/qkv/bias", "bias"),
    Rule(_VIS_BLOCK + "attn.proj.weight", "visual/blocks/proj/kernel", "linear", n_in=2),
    Rule(_VIS_BLOCK + "attn.proj.bias", "visual/blocks/proj/bias"),
    *(r for p in ("gate_proj", "up_proj", "down_proj") for r in (
        Rule(_VIS_BLOCK + f"mlp.{p}.weight", f"visual/blocks/mlp/{p}/kernel", "linear"),
        Rule(_VIS_BLOCK + f"mlp.{p}.bias", f"visual/blocks/mlp/{p}/bias"))),
    Rule("visual.merger.ln_q.weight", "visual/merger/ln_q/scale"),
    Rule("visual.merger.mlp.0.weight", "visual/merger/mlp_0/kernel", "linear"),
    Rule("visual.merger.mlp.0.bias", "visual/merger/mlp_0/bias"),
    Rule("visual.merger.mlp.2.weight", "visual/merger/mlp_2/kernel", "linear"),
    Rule("visual.merger.mlp.2.bias", "visual/merger/mlp_2/bias"),
)

# transformers >= 4.52 keeps these prefixes in memory and some checkpoints were saved with them.
_PREFIXES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def _swap_prefix(name: str, pairs) -> str:
  for old, new in pairs:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def canonical_name(name: str) -> str:
  """A tensor or module name as this table writes it (`model.layers.0...`, `visual.blocks.0...`)."""
  return _swap_prefix(name, _PREFIXES)


def in_memory_name(name: str) -> str:
  """A canonical module name as transformers 5 holds it (`model.language_model.layers.0...`, `model.visual...`):
  what peft's adapter files are keyed by."""
  return _swap_prefix(name, tuple((new, old) for old, new in _PREFIXES))


def hf_shape(rule: Rule, flax_shape: tuple[int, ...], config: ModelConfig) -> tuple[int, ...]:
  """Expected HF shape of one tensor given the (per-layer) Flax shape."""
  if rule.kind == "linear":
    return (int(np.prod(flax_shape[rule.n_in:])), int(np.prod(flax_shape[:rule.n_in])))
  if rule.kind == "conv":
    v = config.vision
    return (flax_shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
  if rule.kind == "bias":
    return (int(np.prod(flax_shape)),)
  return flax_shape


def to_flax(rule: Rule, a: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if rule.kind in ("linear", "conv"):
    return a.reshape(a.shape[0], -1).T.reshape(flax_shape)
  return a.reshape(flax_shape)


def to_hf(rule: Rule, a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if rule.kind in ("linear", "conv"):
    return np.ascontiguousarray(a.reshape(-1, shape[0]).T).reshape(shape)
  return a.reshape(shape)


def _rules(config: ModelConfig) -> Iterator[Rule]:
  for rule in TABLE:
    if not (rule.only_untied and config.tie_word_embeddings):
      yield rule


def layer_count(rule: Rule, config: ModelConfig) -> int:
  return config.vision.depth if rule.hf.startswith("visual.") else config.text.num_layers


class _Reader:
  """Lazy name -> tensor access over the safetensors files of a checkpoint folder."""

  def __init__(self, path: str, shown: str | None = None):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
      bad = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
      hint = f" (found {bad}: pickle-based weights are never loaded; convert them to safetensors)" if bad else ""
      raise CheckpointError(f"no *.safetensors files in {shown or path}{hint}")
    self._handles = {f: safe_open(os.path.join(path, f), framework="numpy") for f in files}
    self.where: dict[str, tuple[str, str]] = {}
    for f, h in self._handles.items():
      for name in h.keys():
        self.where[canonical_name(name)] = (f, name)

  def shape(self, name: str) -> tuple[int, ...]:
    f, raw = self.where[name]
    return tuple(self._handles[f].get_slice(raw).get_shape())

  def read(self, name: str) -> np.ndarray:
    f, raw = self.where[name]
    return self._handles[f].get_tensor(raw)


def read_config(path: str, **overrides) -> ModelConfig:
  return from_hf_dict(storage.read_json(os.path.join(path, "config.json")), **overrides)


def _weights_or_config(name: str) -> bool:
  return name.endswith(".safetensors") or name == "config.json"


def load_hf(path: str, dtype=jnp.float32, *, mesh: jax.sharding.Mesh | None = None,
            **config_overrides) -> tuple[ModelConfig, Any]:
  """Reads a Hugging Face Qwen2.5-VL folder (config.json + *.safetensors) into (config, params).

  Parameters are cast to `dtype` (also the compute dtype unless overridden) and, with `mesh`,
  placed straight onto their shardings from `ares_jax.sharding.LOGICAL_RULES`. A sharded folder
  (`model-0000k-of-0000n.safetensors`, as HF saves 7B models and `save_hf` writes) reads like one file.
  A `gs://` folder is downloaded to a temporary local folder first (safetensors reads memory maps).
  """
  with storage.local_folder(path, _weights_or_config, marker="config.json") as local:
    return _load(local, path, dtype, mesh, config_overrides)


def _load(local: str, path: str, dtype, mesh, config_overrides) -> tuple[ModelConfig, Any]:
  """load_hf on local folder `local` (`path` is what messages name)."""
  name = jnp.dtype(dtype).name
  config = read_config(local, **{"dtype": name, "param_dtype": name, **config_overrides})
  reader = _Reader(local, path)
  boxed = abstract_params(config)
  mesh = mesh or sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  shardings = traverse_util.flatten_dict(sharding.param_shardings(boxed, mesh), sep="/")
  flat = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")

  plan, missing = [], []
  for rule in _rules(config):
    target = tuple(flat[rule.path].shape)
    per_layer = target[1:] if rule.stacked else target
    names = ([rule.hf.format(i=i) for i in range(layer_count(rule, config))] if rule.stacked else [rule.hf])
    for n in names:
      if n not in reader.where:
        missing.append(n)
        continue
      want, got = hf_shape(rule, per_layer, config), reader.shape(n)
      if want != got:
        raise CheckpointError(f"tensor {n!r} in {path} has shape {got}, but the config expects {want} "
                              f"(Flax parameter {rule.path} {per_layer})")
    plan.append((rule, names, target, per_layer))
  if missing:
    raise CheckpointError(f"{len(missing)} tensors missing from {path}: {missing[:8]}"
                          + (" ..." if len(missing) > 8 else ""))
  known = {n for _, names, _, _ in plan for n in names}
  extra = sorted(set(reader.where) - known - {"lm_head.weight"})
  if extra:
    logging.warning("load_hf: ignoring %d tensors the model does not use: %s", len(extra), extra[:8])

  params = {}
  for rule, names, target, per_layer in plan:
    def fetch(index, rule=rule, names=names, per_layer=per_layer):
      if rule.stacked:
        layers = range(len(names))[index[0]]
        rows = [to_flax(rule, reader.read(names[i]), per_layer)[index[1:]] for i in layers]
        return np.stack(rows).astype(dtype)
      return to_flax(rule, reader.read(names[0]), per_layer)[index].astype(dtype)
    params[rule.path] = jax.make_array_from_callback(target, shardings[rule.path], fetch)
  return config, traverse_util.unflatten_dict(params, sep="/")


_ST_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor of the export: its name, rule, Flax leaf, layer (None: not stacked), shape, bytes."""

  name: str
  rule: Rule
  leaf: Any
  layer: int | None
  shape: tuple[int, ...]
  nbytes: int


def _export_plan(config: ModelConfig, params: Any) -> list[_Entry]:
  flat = traverse_util.flatten_dict(nn.unbox(params), sep="/")
  entries = []
  for rule in _rules(config):
    leaf = flat[rule.path]
    per_layer = tuple(leaf.shape[1:] if rule.stacked else leaf.shape)
    shape = hf_shape(rule, per_layer, config)
    nbytes = int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    for i in range(layer_count(rule, config) if rule.stacked else 1):
      entries.append(_Entry(rule.hf.format(i=i), rule, leaf, i if rule.stacked else None, shape, nbytes))
  return entries


def _group(entries: list[_Entry], max_shard_bytes: int) -> list[list[_Entry]]:
  """Consecutive entries in shards of at most `max_shard_bytes` (a larger tensor gets a shard of its own)."""
  shards: list[list[_Entry]] = [[]]
  size = 0
  for e in entries:
    if size and size + e.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += e.nbytes
  return shards


def _header(entries: list[_Entry], dtypes: list[str]) -> bytes:
  """A safetensors header for `entries` laid out back to back, space-padded to 8 bytes as the format asks."""
  meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for e, dt in zip(entries, dtypes):
    meta[e.name] = {"dtype": _ST_DTYPES[dt], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
    offset += e.nbytes
  text = json.dumps(meta, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)
  return len(text).to_bytes(8, "little") + text


def save_hf(path: str, config: ModelConfig, params: Any, *, tokenizer: Any = None,
            max_shard_bytes: int = 2 << 30, gather=None) -> None:
  """Writes a folder that transformers' `Qwen2_5_VLForConditionalGeneration.from_pretrained` loads:
  safetensors shards of at most `max_shard_bytes` (with `model.safetensors.index.json` when there are
  several), config.json and, when given, the tokenizer's files.

  No host ever holds the model: one tensor (one layer of one parameter) at a time is gathered from all
  processes by `gather` (default `sharding.to_host`, a collective: every process must call save_hf) and
  process 0 streams it into the open shard, whose header is known in advance from the shapes. The folder
  is written through `storage.writing_folder` with config.json last, so a reader never takes half a
  policy for a whole one; `path` may be local or `gs://` (where a failed export leaves no config.json).
  """
  gather = gather or sharding.to_host
  primary = sharding.is_primary()
  entries = _export_plan(config, params)
  dtype = jnp.dtype(entries[0].leaf.dtype)
  shards = _group(entries, max_shard_bytes)
  names = ([f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
           if len(shards) > 1 else ["model.safetensors"])
  with storage.writing_folder(path, marker="config.json") if primary else contextlib.nullcontext() as folder:
    for name, group in zip(names, shards):
      with (folder / name).open("wb") if primary else contextlib.nullcontext() as out:
        if primary:
          out.write(_header(group, [jnp.dtype(e.leaf.dtype).name for e in group]))
        for e in group:
          a = np.asarray(gather(e.leaf if e.layer is None else e.leaf[e.layer]))
          if primary:
            t = np.ascontiguousarray(to_hf(e.rule, a, e.shape))
            assert t.nbytes == e.nbytes, (e.name, t.nbytes, e.nbytes)
            out.write(t.reshape(-1).view(np.uint8).data)
          del a
    if primary:
      if len(shards) > 1:
        storage.write_json(folder / "model.safetensors.index.json",
                           {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                            "weight_map": {e.name: n for n, g in zip(names, shards) for e in g}}, indent=2)
      if tokenizer is not None:
        with tempfile.TemporaryDirectory() as local:
          tokenizer.save_pretrained(local)
          storage.upload_folder(local, folder)
      # The marker, last: a reader that finds config.json finds every other file.
      storage.write_json(folder / "config.json", to_hf_dict(config.replace(param_dtype=dtype.name)), indent=2)
  sharding.barrier(f"save_hf {path}")  # nobody reads the folder before process 0 has written it
