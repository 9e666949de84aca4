"""Flax Qwen2.5-VL against transformers' Qwen2_5_VLForConditionalGeneration (float32, CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as R
from ares_jax import models
from ares_jax.models import blockwise_attention

TOL = 1e-4
IMPLEMENTATIONS = ("xla", "blockwise")  # the CPU ones; splash and cudnn glue: tests/test_attention.py


@pytest.fixture(scope="module", autouse=True)
def small_attention_tiles():
  """Tiles of 16 so that `blockwise` runs many tiles (and skips some) even on these short inputs."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(blockwise_attention, "DEFAULT_BLOCK", 16)
    yield


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  model = R.hf_model(seed=0)
  path = R.save(model, str(tmp_path_factory.mktemp("untied")))
  config, params = models.load_hf(path)
  return model, config, params


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
  model = R.hf_model(seed=1, tie=True)
  path = R.save(model, str(tmp_path_factory.mktemp("tied")))
  config, params = models.load_hf(path)
  return model, config, params


def _max_diff(model, config, params, batch):
  ref = R.hf_logits(model, batch)
  out = np.asarray(models.forward(config, params, batch["input_ids"], batch["attention_mask"],
                                  batch.get("pixel_values"), batch.get("image_grid_thw")))
  assert out.shape == ref.shape and out.dtype == np.float32
  valid = batch["attention_mask"].astype(bool)
  return float(np.abs(out - ref)[valid].max())


CASES = {
    "text_left_pad": ([[7], [12], [3]], [], "left"),
    "text_right_pad": ([[9], [4]], [], "right"),
    "one_image": ([[3, "img", 5]], [(56, 84)], "left"),
    "images_of_different_sizes_in_one_sample": ([[3, "img", 4, "img", 2, "img", 1]],
                                                [(56, 84), (140, 112), (84, 56)], "left"),
    "batch_left_padding_with_images": ([[2, "img", 3], [6, "img", 1, "img", 9], [11]],
                                       [(112, 112), (56, 168), (84, 84)], "left"),
    # 22 x 14 patches -> 11 x 7 merged tokens: windows of 4 x 4 do not tile it
    "uneven_windows": ([[4, "img", 3]], [(300, 200)], "right"),
}


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(untied, case, attention):
  model, config, params = untied
  segs, sizes, side = CASES[case]
  batch = R.build_batch(segs, R.random_images(sizes), padding_side=side, max_pixels=28 * 28 * 200)
  diff = _max_diff(model, config.replace(attention=attention), params, batch)
  print(f"{case}/{attention}: max |logit diff| = {diff:.2e}")
  assert diff <= TOL


@pytest.fixture(scope="module")
def full_attention_model(tmp_path_factory):
  """4 vision blocks, 2 of them full attention (transformers' fullatt_block_indexes)."""
  model = R.hf_model(seed=2, depth=4, fullatt=(1, 3))
  path = R.save(model, str(tmp_path_factory.mktemp("fullatt")))
  config, params = models.load_hf(path)
  return model, config, params


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_several_images_of_different_sizes_match_transformers(full_attention_model, attention):
  """3 images over 2 prompts, each image several windows wide: the full-attention blocks must keep
  each image to itself (block-diagonal segments) while the window blocks keep to windows."""
  model, config, params = full_attention_model
  batch = R.build_batch([[3, "img", 4, "img", 2], [5, "img", 6]],
                        R.random_images([(168, 224), (112, 84), (252, 196)]), "left", max_pixels=28 * 28 * 200)
  assert len(batch["image_grid_thw"]) == 3 and len({tuple(g) for g in batch["image_grid_thw"].tolist()}) == 3
  diff = _max_diff(model, config.replace(attention=attention), params, batch)
  print(f"several images/{attention}: max |logit diff| = {diff:.2e}")
  assert diff <= TOL
  # the full-attention blocks matter here: computing them as window blocks misses transformers by far
  windowed_only = config.replace(attention=attention, vision=dataclasses.replace(config.vision,
                                                                                fullatt_block_indexes=()))
  assert _max_diff(model, windowed_only, params, batch) > 100 * TOL


@pytest.mark.parametrize("case", ["text_left_pad", "batch_left_padding_with_images"])
def test_tied_embeddings_match_transformers(tied, case):
  model, config, params = tied
  assert config.tie_word_embeddings and "lm_head" not in params
  segs, sizes, side = CASES[case]
  batch = R.build_batch(segs, R.random_images(sizes), padding_side=side, max_pixels=28 * 28 * 200)
  diff = _max_diff(model, config, params, batch)
  print(f"tied/{case}: max |logit diff| = {diff:.2e}")
  assert diff <= TOL


def test_mrope_ids_equal_get_rope_index(untied):
  model, config, _ = untied
  batch = R.build_batch([[2, "img", 3, "img", 1], [5, "img", 8], [4]],
                        R.random_images([(56, 84), (168, 112), (84, 84)]), "left", max_pixels=28 * 28 * 200)
  ids = torch.tensor(batch["input_ids"])
  ref, ref_delta = model.model.get_rope_index(
      ids, mm_token_type_ids=(ids == R.IMAGE).int(), image_grid_thw=torch.tensor(batch["image_grid_thw"]),
      attention_mask=torch.tensor(batch["attention_mask"]))
  pos, delta = models.mrope_positions(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], config)
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(pos[:, valid], ref.numpy()[:, valid])
  np.testing.assert_array_equal(delta, ref_delta.numpy().ravel())


def test_left_padding_does_not_change_logits(untied):
  _, config, params = untied
  batch = R.build_batch([[3, "img", 4], [20]], R.random_images([(56, 56)]), "left")
  alone = R.build_batch([[3, "img", 4]], R.random_images([(56, 56)]), "left")
  both = np.asarray(models.forward(config, params, batch["input_ids"], batch["attention_mask"],
                                   batch["pixel_values"], batch["image_grid_thw"]))
  one = np.asarray(models.forward(config, params, alone["input_ids"], alone["attention_mask"],
                                  alone["pixel_values"], alone["image_grid_thw"]))
  t = one.shape[1]
  np.testing.assert_allclose(both[0, -t:], one[0], atol=1e-5)


def test_save_hf_loads_in_transformers_with_identical_logits(untied, tmp_path):
  from transformers import Qwen2_5_VLForConditionalGeneration
  model, config, params = untied
  models.save_hf(str(tmp_path), config, params)
  reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path)).eval().float()
  batch = R.build_batch([[3, "img", 5], [7]], R.random_images([(84, 112)]), "left")
  np.testing.assert_array_equal(R.hf_logits(reloaded, batch), R.hf_logits(model, batch))
  assert _max_diff(reloaded, config, params, batch) <= TOL


def test_save_hf_shards_and_reloads(untied, tmp_path):
  _, config, params = untied
  models.save_hf(str(tmp_path), config, params, max_shard_bytes=64 << 10)
  files = sorted(p.name for p in tmp_path.iterdir())
  assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
  config2, params2 = models.load_hf(str(tmp_path))
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_bf16_forward_stays_close(untied):
  model, config, params = untied
  cfg16 = config.replace(dtype="bfloat16", param_dtype="bfloat16")
  p16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  batch = R.build_batch([[3, "img", 5], [9]], R.random_images([(84, 112)]), "left")
  ref = R.hf_logits(model, batch)
  out = np.asarray(models.forward(cfg16, p16, batch["input_ids"], batch["attention_mask"],
                                  batch["pixel_values"], batch["image_grid_thw"]))
  valid = batch["attention_mask"].astype(bool)
  assert out.dtype == np.float32 and np.isfinite(out).all()
  err = np.abs(out - ref)[valid].max() / np.abs(ref[valid]).max()
  print(f"bf16 relative max error {err:.3e}")
  assert err < 0.05
