"""Qwen2.5-VL in Flax linen, numerically equal to Hugging Face transformers."""

from ares_jax.models.config import (ConfigError, LoraConfig, ModelConfig, TextConfig, VisionConfig, from_hf_dict,
                                    to_hf_dict)
from ares_jax.models.positions import InputError, mrope_positions
from ares_jax.models.qwen25vl import (MEDIA_KEYS, ModelInputs, Qwen25VL, abstract_params, decode_step, forward, init_adapters,
                                     init_params, prepare_vision, unstack_layers)
from ares_jax.models.hf_io import CheckpointError, load_hf, read_config, save_hf

__all__ = [
    "CheckpointError", "ConfigError", "InputError", "LoraConfig", "MEDIA_KEYS", "ModelConfig", "ModelInputs", "Qwen25VL",
    "TextConfig", "VisionConfig", "abstract_params", "decode_step", "forward", "from_hf_dict", "init_adapters",
    "init_params", "load_hf", "mrope_positions", "prepare_vision", "read_config", "save_hf", "to_hf_dict",
    "unstack_layers",
]
