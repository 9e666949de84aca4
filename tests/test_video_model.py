"""Videos through the Flax Qwen2.5-VL against transformers (float32, CPU): logits of video prompts, images and
videos mixed, videos of different lengths and sizes batched with left and right padding, time-scaled M-RoPE,
and greedy generation of a video prompt."""

import jax
import numpy as np
import pytest
import torch

import hf_reference as R
from ares_jax import models, sampling
from ares_jax.models import positions as pos_lib

TOL = 1e-4

# (segments per row, image sizes, video grids (t, h, w) in patches, seconds per temporal patch, padding side)
CASES = {
    "video_only": ([[3, "vid", 5]], [], [(3, 4, 6)], [1.0], "left"),
    "image_and_video": ([[2, "img", 3, "vid", 4]], [(56, 84)], [(2, 6, 4)], [0.5], "left"),
    "two_videos_left_padding": ([[4, "vid", 2], [1, "vid", 7, "img", 1]], [(84, 56)], [(4, 4, 4), (2, 6, 8)],
                                [1.0, 2.0], "left"),
    "two_videos_right_padding": ([[6, "vid"], [2, "vid", 9]], [], [(1, 8, 4), (5, 4, 6)], [0.25, 1.5], "right"),
    "seconds_not_given": ([[5, "vid", 2]], [], [(3, 4, 4)], None, "left"),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return R.saved_and_loaded(str(tmp_path_factory.mktemp("video")), seed=3)


def _batch(case, seed=0):
  segs, sizes, grids, seconds, side = CASES[case]
  return R.build_batch(segs, R.random_images(sizes, seed=seed), side, videos=grids, seconds=seconds, seed=seed)


def _forward(config, params, batch):
  return np.asarray(models.forward(config, params, batch["input_ids"], batch["attention_mask"],
                                   **{k: batch.get(k) for k in models.MEDIA_KEYS}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_video_logits_match_transformers(tiny, case):
  model, _, config, params = tiny
  batch = _batch(case)
  ref, out = R.hf_logits(model, batch), _forward(config, params, batch)
  valid = batch["attention_mask"].astype(bool)
  diff = float(np.abs(out - ref)[valid].max())
  print(f"{case}: max |logit diff| = {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("case", ["image_and_video", "two_videos_left_padding", "two_videos_right_padding"])
def test_video_mrope_ids_equal_get_rope_index(tiny, case):
  model, _, config, _ = tiny
  batch = _batch(case)
  kw = R.hf_inputs(batch)
  ref, ref_delta = model.model.get_rope_index(
      kw["input_ids"], kw["mm_token_type_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw"),
      kw.get("second_per_grid_ts"), attention_mask=kw["attention_mask"])
  ours, delta = pos_lib.mrope_positions(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                                        config, batch.get("video_grid_thw"), batch.get("second_per_grid_ts"))
  valid = batch["attention_mask"].astype(bool)
  np.testing.assert_array_equal(ours[:, valid], ref.numpy()[:, valid])
  np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(-1))
  # the time axis advances with seconds: a video whose patches are 2 s apart at 2 tokens/s steps by 4
  assert config.vision.tokens_per_second == model.config.vision_config.tokens_per_second


def test_time_index_is_seconds_times_tokens_per_second(tiny):
  _, _, config, _ = tiny
  batch = R.build_batch([[1, "vid"]], [], "left", videos=[(3, 2, 2)], seconds=[1.5])
  pos, _ = pos_lib.mrope_positions(batch["input_ids"], batch["attention_mask"], None, config,
                                   batch["video_grid_thw"], batch["second_per_grid_ts"])
  start = 2  # one text token, then vision_start
  step = config.vision.tokens_per_second * 1.5
  np.testing.assert_array_equal(pos[0, 0, start:start + 3], start + np.floor(np.arange(3) * step).astype(int))


def test_video_greedy_equals_transformers_generate(tiny):
  model, _, config, params = tiny
  batch = R.build_batch([[3, "vid", 5], [7, "img", 2, "vid", 1]], R.random_images([(56, 56)], seed=4), "left",
                        videos=[(2, 4, 4), (4, 4, 6)], seconds=[1.0, 0.5], seed=4)
  sc = sampling.SamplingConfig(max_new_tokens=12, temperature=0.0, eos_ids=(1,), pad_id=2, suppress_ids=())
  r = sampling.generate(config, params, batch, sc, jax.random.key(0))
  kw = R.hf_inputs(batch)
  with torch.no_grad():
    out = model.generate(**kw, max_new_tokens=12, do_sample=False, eos_token_id=1, pad_token_id=2)
  ref = out[:, kw["input_ids"].shape[1]:].numpy()
  for i in range(len(ref)):
    n = int(r.length[i])
    np.testing.assert_array_equal(r.tokens[i, :n], ref[i, :n])


def test_video_inputs_that_do_not_match_are_refused(tiny):
  _, _, config, params = tiny
  batch = _batch("video_only")
  with pytest.raises(models.InputError, match="video tokens but no pixel_values_videos"):
    models.forward(config, params, batch["input_ids"], batch["attention_mask"])
  with pytest.raises(models.InputError, match="pixel_values_videos shape"):
    models.forward(config, params, batch["input_ids"], batch["attention_mask"],
                   pixel_values_videos=batch["pixel_values_videos"][:-1], video_grid_thw=batch["video_grid_thw"])
  with pytest.raises(models.InputError, match="second_per_grid_ts"):
    models.forward(config, params, batch["input_ids"], batch["attention_mask"],
                   pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"],
                   second_per_grid_ts=[1.0, 2.0])
