"""LoRA adapters <-> the PEFT folder format (adapter_config.json + adapter_model.safetensors).

Tensor names are what peft 0.x writes for transformers 5's `Qwen2_5_VLForConditionalGeneration`:
`base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r], with modules named as
transformers holds them in memory (`model.language_model.layers.{i}.self_attn.q_proj`,
`model.visual.blocks.{i}.attn.qkv`, `model.visual.merger.mlp.0`). Older names (`model.layers.{i}...`,
`visual...`) are read too. Each module's HF name and input rank come from `hf_io.TABLE` (the kernel's
rule), so the weight and adapter conversions cannot drift apart. Safetensors only.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save

from ares_jax import sharding, storage
from ares_jax.models import hf_io, lora
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import abstract_params

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def _module_rule(path: str) -> hf_io.Rule:
  return next(r for r in hf_io.TABLE if r.path == path + "/kernel")


def modules(config: ModelConfig) -> list[tuple[str, hf_io.Rule]]:
  """(Flax module path, its kernel's hf_io rule) of every adapted module of `config.lora.targets`."""
  return [(m, _module_rule(m)) for t in config.lora.targets for m in lora.MODULES[t]]


def target_regex(config: ModelConfig) -> str:
  """peft's `target_modules` as one regex (peft full-matches it against module names): a plain list of
  suffixes would also catch the vision blocks' mlp.gate_proj when only the text MLP is targeted."""
  names = [hf_io.in_memory_name(rule.hf[:-len(".weight")]) for _, rule in modules(config)]
  return "|".join(".*" + re.escape(n).replace(r"\{i\}", r"\d+") for n in names)


def _names(rule: hf_io.Rule, config: ModelConfig) -> list[str]:
  module = hf_io.in_memory_name(rule.hf[:-len(".weight")])
  n = hf_io.layer_count(rule, config)
  return [module.format(i=i) for i in range(n)] if rule.stacked else [module]


def save_peft(path: str, config: ModelConfig, params: dict, base_model_name_or_path: str | None) -> None:
  """Writes the adapters of policy tree `params` as a PEFT folder at `path` (local or gs://); every process
  calls it (the adapters are gathered to the host; they are small), process 0 writes."""
  flat = traverse_util.flatten_dict(sharding.to_host(lora.adapters(params)), sep="/")
  r = config.lora.rank
  tensors = {}
  for path_, rule in modules(config):
    a, b = np.asarray(flat[path_ + "/lora_a"]), np.asarray(flat[path_ + "/lora_b"])
    names = _names(rule, config)
    if not rule.stacked:
      a, b = a[None], b[None]
    for i, name in enumerate(names):
      tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
      tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
  meta = {"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": config.lora.alpha,
          "lora_dropout": config.lora.dropout, "target_modules": target_regex(config), "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "modules_to_save": None,
          "init_lora_weights": True, "inference_mode": True, "base_model_name_or_path": base_model_name_or_path,
          "auto_mapping": {"base_model_class": "Qwen2_5_VLForConditionalGeneration",
                           "parent_library": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl"}}
  if sharding.is_primary():
    with storage.writing_folder(path, marker=CONFIG_FILE) as folder:
      storage.write_bytes(folder / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
      storage.write_json(folder / CONFIG_FILE, meta, indent=2)  # the marker, last
  sharding.barrier(f"save_peft {path}")


def read_lora_config(path: str, dropout: float | None = None) -> lora.LoraConfig:
  """The `LoraConfig` of a PEFT folder (rank, alpha, dropout unless given, targets from its tensors)."""
  meta = storage.read_json(os.path.join(path, CONFIG_FILE))
  where = f"{path}/{CONFIG_FILE}"
  if meta.get("peft_type", "LORA") != "LORA":
    raise ValueError(f"{where}: peft_type={meta.get('peft_type')!r}; only LORA adapters import")
  for flag in ("use_dora", "use_rslora"):
    if meta.get(flag):
      raise ValueError(f"{where}: {flag}=true is not supported (plain LoRA, scale alpha / r, only)")
  if meta.get("rank_pattern") or meta.get("alpha_pattern"):
    raise ValueError(f"{where}: per-module rank_pattern / alpha_pattern are not supported")
  with storage.local_folder(path, lambda n: n == WEIGHTS_FILE) as local:
    with safe_open(os.path.join(local, WEIGHTS_FILE), framework="numpy") as f:
      found = {_canonical_module(k) for k in f.keys()}
  targets = tuple(t for t in lora.TARGETS if any(
      hf_io.canonical_name(_module_rule(m).hf[:-len(".weight")]).format(i=0) in found
      for m in lora.MODULES[t]))
  return lora.LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]),
                         dropout=float(meta.get("lora_dropout", 0.0) if dropout is None else dropout),
                         targets=targets)


def _canonical_module(key: str) -> str:
  """`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight` ->
  `model.layers.0.self_attn.q_proj` (hf_io's canonical module name)."""
  name = key[len(PREFIX):] if key.startswith(PREFIX) else key
  name = re.sub(r"\.lora_[AB](\.default)?\.weight$", "", name)
  return hf_io.canonical_name(name)


def load_peft(path: str, config: ModelConfig, shardings: Any = None) -> dict:
  """The adapters of PEFT folder `path` as the "lora" subtree for `config` (whose lora settings must be
  the folder's: see `read_lora_config`), placed on `shardings` when given."""
  want = {k: v.shape for k, v in traverse_util.flatten_dict(
      nn.unbox(abstract_params(config)[lora.POLICY_KEY]), sep="/").items()}
  r = config.lora.rank
  out: dict[str, np.ndarray] = {}
  with storage.local_folder(path, lambda n: n == WEIGHTS_FILE) as local:
    with safe_open(os.path.join(local, WEIGHTS_FILE), framework="numpy") as f:
      by_module = {}
      for k in f.keys():
        by_module.setdefault(_canonical_module(k), {})["A" if ".lora_A" in k else "B"] = k
      for mpath, rule in modules(config):
        canon = [hf_io.canonical_name(n) for n in _names(rule, config)]
        a_shape, b_shape = want[mpath + "/lora_a"], want[mpath + "/lora_b"]
        per_a, per_b = (a_shape[1:], b_shape[1:]) if rule.stacked else (a_shape, b_shape)
        a_rows, b_rows = [], []
        for name in canon:
          if name not in by_module:
            raise ValueError(f"{path}: no LoRA tensors for module {name} (config.model.lora.targets="
                             f"{config.lora.targets})")
          a = f.get_tensor(by_module[name]["A"])
          b = f.get_tensor(by_module[name]["B"])
          if a.shape != (r, int(np.prod(per_a[:-1]))) or b.shape != (int(np.prod(per_b[1:])), r):
            raise ValueError(f"{path}: LoRA tensors of {name} have shapes A {a.shape}, B {b.shape}; the model "
                             f"expects A ({r}, {int(np.prod(per_a[:-1]))}), B ({int(np.prod(per_b[1:]))}, {r})")
          a_rows.append(a.T.reshape(per_a))
          b_rows.append(b.T.reshape(per_b))
        out[mpath + "/lora_a"] = np.stack(a_rows) if rule.stacked else a_rows[0]
        out[mpath + "/lora_b"] = np.stack(b_rows) if rule.stacked else b_rows[0]
  tree = traverse_util.unflatten_dict({k: jnp.asarray(v, config.param_dtype) for k, v in out.items()}, sep="/")
  return tree if shardings is None else jax.device_put(tree, shardings)
