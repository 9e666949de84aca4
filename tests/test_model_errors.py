"""Bad checkpoints and bad inputs raise errors that say what was found and what was expected."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_reference as R
from ares_jax import models


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ckpt"))
  R.save(R.hf_model(seed=4), path)
  return path


def _copy_with(src, dst, edit):
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return dst


def test_misshaped_tensor_names_tensor_and_both_shapes(ckpt, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  bad = _copy_with(ckpt, str(tmp_path), lambda t: t.__setitem__(name, np.zeros((95, 64), np.float32)))
  with pytest.raises(models.CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(95, 64\).*\(96, 64\)"):
    models.load_hf(bad)


def test_missing_tensor_is_named(ckpt, tmp_path):
  bad = _copy_with(ckpt, str(tmp_path), lambda t: t.pop("visual.blocks.2.attn.qkv.bias"))
  with pytest.raises(models.CheckpointError, match=r"missing.*visual\.blocks\.2\.attn\.qkv\.bias"):
    models.load_hf(bad)


def test_pickle_checkpoints_are_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(R.hf_config().to_dict()))
  (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
  with pytest.raises(models.CheckpointError, match="pickle"):
    models.load_hf(str(tmp_path))


def test_flat_config_layout_with_rope_scaling(ckpt):
  with open(os.path.join(ckpt, "config.json")) as f:
    nested = json.load(f)
  flat = {k: v for k, v in nested.items() if k != "text_config"}
  text = dict(nested["text_config"])
  rope = text.pop("rope_parameters")
  flat.update(text, rope_theta=rope["rope_theta"],
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
  assert models.from_hf_dict(flat) == models.from_hf_dict(nested)


def test_config_errors_name_the_field():
  cfg = R.hf_config().to_dict()
  cfg["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]
  with pytest.raises(models.ConfigError, match="mrope_section"):
    models.from_hf_dict(cfg)


@pytest.fixture(scope="module")
def loaded(ckpt):
  return models.load_hf(ckpt)


def test_image_token_count_mismatch_says_both_numbers_and_cause(loaded):
  config, params = loaded
  batch = R.build_batch([[3, "img", 4]], R.random_images([(56, 84)]))
  ids = batch["input_ids"][:, 5:]  # truncated through the image: 3 text, vision_start, 1 image token go
  mask = batch["attention_mask"][:, 5:]
  with pytest.raises(models.InputError, match=r"hold 5 image tokens.*6 merged patches.*truncated.*max_pixels"):
    models.forward(config, params, ids, mask, batch["pixel_values"], batch["image_grid_thw"])


def test_video_tokens_without_pixels(loaded):
  config, params = loaded
  ids = np.array([[5, R.VIDEO, R.VIDEO, 6]])
  with pytest.raises(models.InputError, match=r"2 video tokens but no pixel_values_videos/video_grid_thw"):
    models.forward(config, params, ids, np.ones_like(ids))


def test_image_tokens_without_pixels(loaded):
  config, params = loaded
  ids = np.array([[5, R.IMAGE, 6]])
  with pytest.raises(models.InputError, match="no pixel_values"):
    models.forward(config, params, ids, np.ones_like(ids))


def test_pixel_values_not_matching_grid(loaded):
  config, params = loaded
  batch = R.build_batch([[3, "img", 4]], R.random_images([(56, 84)]))
  with pytest.raises(models.InputError, match=r"pixel_values shape \(23, 1176\).*\(24, 1176\)"):
    models.forward(config, params, batch["input_ids"], batch["attention_mask"], batch["pixel_values"][:-1],
                   batch["image_grid_thw"])
