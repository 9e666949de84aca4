"""Videos through `QwenVLProcessor` against transformers' own `Qwen2_5_VLProcessor` (its video processor
needs torchvision, a test dependency) for the same frames, and through the prompt stream."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ares_jax.data import tokenizer as tokenizer_lib
from ares_jax.data.processor import ProcessorError, QwenVLProcessor
from ares_jax.data.video import Clip, VideoSettings

MIN_PIXELS, MAX_PIXELS = 28 * 28 * 4, 28 * 28 * 16
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return tokenizer_lib.tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def ours(tok):
  return QwenVLProcessor.create(tok, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
                                video=VideoSettings(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))


@pytest.fixture(scope="module")
def theirs(tok):
  from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # needs torchvision
  return Qwen2_5_VLProcessor(
      image_processor=Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS),
      video_processor=Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, cap_pixels_per_frame=False),
      tokenizer=tok)


def clip(frames: int, height: int, width: int, fps: float, seed: int) -> Clip:
  """Random frames already at a size smart_resize keeps (sides multiples of 28 within the bounds)."""
  rng = np.random.default_rng(seed)
  return Clip(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8), fps)


def reference(theirs, texts, clips, images=None):
  meta = [{"total_num_frames": len(c.frames), "fps": c.fps, "frames_indices": list(range(len(c.frames)))}
          for c in clips]
  out = theirs(text=texts, images=images, videos=[list(c.frames) for c in clips], video_metadata=meta,
               do_sample_frames=False, padding=True, padding_side="left", return_tensors="np")
  return {k: np.asarray(v) for k, v in out.items()}


def check_same(got, want):
  for key in ("input_ids", "attention_mask", "mm_token_type_ids", "video_grid_thw", "image_grid_thw"):
    if key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  np.testing.assert_allclose(got["second_per_grid_ts"], want["second_per_grid_ts"], rtol=1e-6)
  np.testing.assert_allclose(got["pixel_values_videos"], want["pixel_values_videos"], rtol=1e-6, atol=1e-6)
  if "pixel_values" in want:
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=1e-6, atol=1e-6)
  assert set(got) == set(want), (sorted(got), sorted(want))


def test_one_video_matches_transformers(ours, theirs):
  clips = [clip(4, 56, 84, 2.0, seed=0)]
  texts = [ours.chat_prompt("What moves?", num_videos=1)]
  got = ours(texts, videos=clips)
  check_same(got, reference(theirs, texts, clips))
  # 4 frames of 56x84: 2 temporal patches x 4 x 6 patches = 48 rows, 12 tokens
  assert got["video_grid_thw"].tolist() == [[2, 4, 6]] and got["pixel_values_videos"].shape == (48, 1176)
  assert got["second_per_grid_ts"].tolist() == [1.0]  # 2 frames a patch at 2 fps
  assert (got["mm_token_type_ids"] == 2).sum() == 12 and got["pixel_values_videos"].dtype == np.float32
  assert got["video_grid_thw"].dtype == np.int64


def test_image_and_video_in_one_prompt_and_two_videos_in_a_batch(ours, theirs):
  rng = np.random.default_rng(3)
  image = Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))
  clips = [clip(6, 84, 56, 3.0, seed=1), clip(2, 56, 112, 0.5, seed=2), clip(3, 56, 56, 1.5, seed=4)]
  texts = [ours.chat_prompt("Is the picture in the film?", num_images=1, num_videos=1),
           "<|im_start|>user\nFirst " + VIDEO + " then " + VIDEO + "<|im_end|>\n<|im_start|>assistant\n"]
  got = ours(texts, [image], clips)
  check_same(got, reference(theirs, texts, clips, [image]))
  assert got["video_grid_thw"].tolist() == [[3, 6, 4], [1, 4, 8], [2, 4, 4]]  # 3 frames pad to 4
  np.testing.assert_allclose(got["second_per_grid_ts"], [2 / 3.0, 2 / 0.5, 2 / 1.5], rtol=1e-6)
  types = got["mm_token_type_ids"]
  assert (types[0] == 1).sum() == 4 and (types[0] == 2).sum() == 18 and (types[1] == 2).sum() == 8 + 8


def test_a_still_video_is_the_image_layout(ours):
  """Two equal frames are laid out as the image processor lays out that image (repeated over time)."""
  frame = np.random.default_rng(5).integers(0, 256, (56, 84, 3), dtype=np.uint8)
  video = ours(["v " + VIDEO], videos=[Clip(np.stack([frame, frame]), 2.0)])
  image = ours(["i " + IMAGE], [Image.fromarray(frame)])
  np.testing.assert_allclose(video["pixel_values_videos"], image["pixel_values"], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(video["video_grid_thw"], image["image_grid_thw"])


def test_video_errors(ours):
  with pytest.raises(ProcessorError, match="multiples of 28"):
    ours(["x " + VIDEO], videos=[Clip(np.zeros((2, 50, 56, 3), np.uint8), 2.0)])
  with pytest.raises(ProcessorError, match="2 <\\|video_pad\\|> placeholders but 1 videos"):
    ours(["x " + VIDEO + VIDEO], videos=[Clip(np.zeros((2, 56, 56, 3), np.uint8), 2.0)])
  enc = ours.encode_chat(["a", "b"], videos=[None, Clip(np.zeros((2, 56, 56, 3), np.uint8), 2.0)])
  assert (enc["mm_token_type_ids"] == 2).sum(1).tolist() == [0, 4]
