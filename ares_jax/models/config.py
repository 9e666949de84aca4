"""Model configuration: frozen dataclasses mirroring Hugging Face's Qwen2.5-VL config.json.

Both layouts found on the hub are read: the nested one written by transformers >= 4.52
(`text_config` / `vision_config`) and the older flat one (text fields at the top level);
RoPE settings come from `rope_parameters` or the older `rope_scaling` + `rope_theta`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

from ares_jax.models.attention import IMPLEMENTATIONS


class ConfigError(ValueError):
  """A config.json that ares_jax cannot honour; the message names the field."""


# LoRA targets (models/lora.py): the decoder's projections, the vision blocks' qkv + proj, the merger's two linears.
TEXT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
VISION_TARGETS = ("vision_attn", "merger")  # the vision blocks' qkv + proj; the merger's two linears
TARGETS = TEXT_TARGETS + VISION_TARGETS


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """`config.model.lora`: rank r (0 = no adapters), alpha, dropout on the adapter's input, targets."""

  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TEXT_TARGETS

  def __post_init__(self):
    bad = [t for t in self.targets if t not in TARGETS]
    if self.rank < 0 or bad:
      raise ValueError(f"config.model.lora: rank={self.rank} must be >= 0 and targets {bad} must be among "
                       f"{', '.join(TARGETS)}")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    """alpha / r, the factor on B A x."""
    return self.alpha / self.rank

  def on(self, target: str) -> "LoraConfig | None":
    """This config when `target` is adapted, else None (what `layers.dense(lora=...)` takes)."""
    return self if self.enabled and target in self.targets else None


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1_000_000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128_000

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  out_hidden_size: int = 3584
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10_000.0
  tokens_per_second: int = 2

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened (C, T, P, P) patch row of `pixel_values` (1176 for Qwen2.5-VL)."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  @property
  def window_merged(self) -> int:
    """Side of an attention window in merged tokens (112 px / 14 px / 2 = 4)."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything that fixes the computation of the policy; hashable, so it is a static jit argument."""

  text: TextConfig
  vision: VisionConfig
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  dtype: str = "float32"  # activations / compute
  param_dtype: str = "float32"
  remat_policy: str = "none"  # none | full | dots | dots_with_no_batch_dims
  # auto | xla | blockwise | splash | cudnn (models/attention.py); auto picks by the mesh's platform
  attention: str = "auto"
  lora: LoraConfig = LoraConfig()  # rank 0: no adapters (models/lora.py)

  def __post_init__(self):
    if self.attention not in IMPLEMENTATIONS:
      raise ConfigError(f"config.model.attention={self.attention!r}; choose one of {', '.join(IMPLEMENTATIONS)}")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


_UNSUPPORTED_TEXT = {
    "use_sliding_window": (True, "sliding-window attention is not used by any Qwen2.5-VL release"),
}


def _rope(d: Mapping[str, Any], field: str) -> tuple[float, tuple[int, ...] | None]:
  rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "mrope"):
    raise ConfigError(f"{field}.rope_type={kind!r}: only the default (M-)RoPE of Qwen2.5-VL is supported")
  theta = rope.get("rope_theta", d.get("rope_theta", 1_000_000.0))
  section = rope.get("mrope_section")
  return float(theta), (tuple(int(s) for s in section) if section else None)


def from_hf_dict(d: Mapping[str, Any], **overrides) -> ModelConfig:
  """Builds a ModelConfig from a Qwen2.5-VL config.json (nested or flat layout)."""
  mt = d.get("model_type", "qwen2_5_vl")
  if mt not in ("qwen2_5_vl", "qwen2_5_vl_text"):
    raise ConfigError(f"model_type={mt!r}: ares_jax implements Qwen2.5-VL (model_type 'qwen2_5_vl')")
  t = dict(d)  # flat layout: text fields at top level
  t.update(d.get("text_config") or {})
  for key, (bad, why) in _UNSUPPORTED_TEXT.items():
    if t.get(key) == bad:
      raise ConfigError(f"text_config.{key}={bad}: {why}")
  if t.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"text_config.hidden_act={t['hidden_act']!r}: only 'silu' is supported")
  theta, section = _rope(t, "text_config.rope_parameters")
  head_dim = t["hidden_size"] // t["num_attention_heads"]
  section = section or (16, 24, 24)
  if len(section) != 3 or sum(section) != head_dim // 2:
    raise ConfigError(
        f"text_config.rope_parameters.mrope_section={list(section)} must have 3 entries summing to "
        f"head_dim/2 = {head_dim // 2}")
  text = TextConfig(
      vocab_size=t["vocab_size"], hidden_size=t["hidden_size"], intermediate_size=t["intermediate_size"],
      num_layers=t["num_hidden_layers"], num_heads=t["num_attention_heads"],
      num_kv_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
      rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)), rope_theta=theta, mrope_section=section,
      max_position_embeddings=t.get("max_position_embeddings", 128_000))
  v = dict(d.get("vision_config") or {})
  if v.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"vision_config.hidden_act={v['hidden_act']!r}: only 'silu' is supported")
  vrope = v.get("rope_parameters") or {}
  vision = VisionConfig(
      depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 1280),
      intermediate_size=v.get("intermediate_size", 3420), num_heads=v.get("num_heads", 16),
      out_hidden_size=v.get("out_hidden_size", text.hidden_size),
      in_channels=v.get("in_channels", v.get("in_chans", 3)), patch_size=v.get("patch_size", 14),
      temporal_patch_size=v.get("temporal_patch_size", 2), spatial_merge_size=v.get("spatial_merge_size", 2),
      window_size=v.get("window_size", 112),
      fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
      rope_theta=float(vrope.get("rope_theta", 10_000.0)), tokens_per_second=v.get("tokens_per_second", 4))  # transformers' default when absent
  if vision.out_hidden_size != text.hidden_size:
    raise ConfigError(f"vision_config.out_hidden_size={vision.out_hidden_size} must equal text hidden_size "
                      f"{text.hidden_size}")
  tie = bool(d.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False))
  eos = t.get("eos_token_id", d.get("eos_token_id"))
  kw = dict(
      text=text, vision=vision, tie_word_embeddings=tie,
      image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
      vision_start_token_id=d.get("vision_start_token_id", 151652),
      vision_end_token_id=d.get("vision_end_token_id", 151653),
      bos_token_id=t.get("bos_token_id", d.get("bos_token_id")),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos)
  kw.update(overrides)
  return ModelConfig(**kw)


def to_hf_dict(config: ModelConfig) -> dict[str, Any]:
  """The nested config.json layout that transformers >= 5 writes and reads."""
  t, v = config.text, config.vision
  eos = list(config.eos_token_id) if isinstance(config.eos_token_id, tuple) else config.eos_token_id
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "dtype": config.param_dtype,
      "tie_word_embeddings": config.tie_word_embeddings,
      "image_token_id": config.image_token_id,
      "video_token_id": config.video_token_id,
      "vision_start_token_id": config.vision_start_token_id,
      "vision_end_token_id": config.vision_end_token_id,
      "text_config": {
          "model_type": "qwen2_5_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
          "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "hidden_act": "silu",
          "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
          "rope_parameters": {"rope_type": "default", "rope_theta": t.rope_theta,
                              "mrope_section": list(t.mrope_section)},
          "tie_word_embeddings": config.tie_word_embeddings,
          "bos_token_id": config.bos_token_id, "eos_token_id": eos, "use_sliding_window": False,
      },
      "vision_config": {
          "model_type": "qwen2_5_vl_vision", "depth": v.depth, "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size, "num_heads": v.num_heads,
          "out_hidden_size": v.out_hidden_size, "in_channels": v.in_channels, "patch_size": v.patch_size,
          "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
          "window_size": v.window_size, "fullatt_block_indexes": list(v.fullatt_block_indexes),
          "tokens_per_second": v.tokens_per_second, "hidden_act": "silu",
          "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
      },
  }
