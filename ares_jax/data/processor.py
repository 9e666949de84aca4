"""The Qwen2.5-VL processor, assembled from the PIL image processor, numpy video patches and a tokenizer.

transformers' `Qwen2_5_VLProcessor` needs torchvision for its video processor, which the data workers
should not need. This module reproduces what it returns for text, still images and videos:
`Qwen2VLImageProcessorPil` (smart_resize, CLIP normalisation, patchify in 2x2 merge-block order) for
images, the same layout in numpy for videos (`Clip`s, already sampled and sized by data/video.py), and
the tokenizer. Each `<|image_pad|>` / `<|video_pad|>` in a prompt is expanded to t*h*w/merge_size**2
copies, one per merged patch, exactly as the stock processor does, so `models.forward` gets the inputs
it is specified against (tests/test_video_processor.py checks it against the stock processor).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ares_jax.data.video import Clip, VideoSettings

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_TOKEN + VISION_END
VIDEO_PLACEHOLDER = VISION_START + VIDEO_TOKEN + VISION_END
# OPENAI_CLIP_MEAN / _STD, as transformers' video processor fuses them with the 1/255 rescale: in float32,
# (x - 255 mean) / (255 std), so that pixel_values_videos match it to the last bit or two
_CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32) * np.float32(255.0)
_CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32) * np.float32(255.0)

# transformers' defaults for Qwen2-VL / Qwen2.5-VL (56*56 and 28*28*1280 pixels).
DEFAULT_MIN_PIXELS = 56 * 56
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


class ProcessorError(ValueError):
  """Inputs the processor cannot turn into model inputs; the message says why."""


def _flatten_images(images: Any) -> list[Any]:
  """A flat list of images in order of appearance; accepts one image, a list, or a list per sample."""
  if images is None:
    return []
  if not isinstance(images, (list, tuple)):
    return [images]
  flat: list[Any] = []
  for item in images:
    if isinstance(item, (list, tuple)):
      flat.extend(item)
    elif item is not None:
      flat.append(item)
  return flat


def _per_question(items: Any, questions: list[str], what: str) -> list[list[Any]]:
  if items is None:
    return [[] for _ in questions]
  if len(items) != len(questions):
    raise ProcessorError(f"{len(questions)} questions but {len(items)} {what} entries (give one per question)")
  return [[] if x is None else list(x) if isinstance(x, (list, tuple)) else [x] for x in items]


class QwenVLProcessor:
  """Text + images + videos -> `input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`,
  `image_grid_thw`, `pixel_values_videos`, `video_grid_thw`, `second_per_grid_ts`.

  Arrays are numpy, laid out as the stock Hugging Face processor returns them with
  `return_tensors="np", padding=True`: int64 ids and masks, float32 `pixel_values`
  [sum(t*h*w), 3*2*14*14], int64 `image_grid_thw` [num_images, 3], the same for videos, and float32
  `second_per_grid_ts` [num_videos] (temporal patch / the clip's fps). `video_settings` say how the
  data workers sample and size videos for it (data/video.py).
  """

  def __init__(self, tokenizer: Any, image_processor: Qwen2VLImageProcessorPil,
               video_settings: VideoSettings = VideoSettings()):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.video_settings = video_settings
    self.image_token_id = self._token_id(IMAGE_TOKEN)
    self.video_token_id = self._token_id(VIDEO_TOKEN)

  @classmethod
  def create(cls, tokenizer: Any, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
             patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2,
             video: VideoSettings = VideoSettings()) -> "QwenVLProcessor":
    """A processor whose images are resized to [min_pixels, max_pixels] (multiples of 28 per side) and
    whose videos are sampled and sized by `video` (its factor set to this patch geometry)."""
    if not 0 < min_pixels <= max_pixels:
      raise ProcessorError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels} max_pixels={max_pixels}")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
        temporal_patch_size=temporal_patch_size, merge_size=merge_size)
    return cls(tokenizer, image_processor, dataclasses.replace(video, factor=patch_size * merge_size))

  def _token_id(self, token: str) -> int:
    i = self.tokenizer.convert_tokens_to_ids(token)
    if i is None or i == self.tokenizer.unk_token_id:
      raise ProcessorError(f"the tokenizer has no {token} token: it is not a Qwen2.5-VL tokenizer")
    return int(i)

  @property
  def merge_length(self) -> int:
    return int(self.image_processor.merge_size) ** 2

  @staticmethod
  def chat_prompt(question: str, num_images: int = 0, system: str | None = None, num_videos: int = 0) -> str:
    """One user turn in Qwen's chat format, images first, then videos, ending where the assistant starts.

    `<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>question<|im_end|>\n<|im_start|>assistant\n`.
    Qwen's own chat template also inserts a default system turn ("You are a helpful assistant.")
    when none is given; pass `system` to get a system turn.
    """
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return (f"{head}<|im_start|>user\n{IMAGE_PLACEHOLDER * num_images}{VIDEO_PLACEHOLDER * num_videos}"
            f"{question}<|im_end|>\n<|im_start|>assistant\n")

  def resize(self, image: Any) -> np.ndarray:
    """`image` (RGB) at the size the processor will give it, as uint8 [H, W, 3]. Processing the result
    gives the same `pixel_values` as processing `image` (smart_resize of a size it returned is that
    size), so resized images are what processes exchange and what a dataset stores."""
    # transformers is slow to import: only where it is used
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    ip = self.image_processor
    w, h = image.size
    rh, rw = smart_resize(h, w, ip.patch_size * ip.merge_size, min_pixels=ip.size["shortest_edge"],
                          max_pixels=ip.size["longest_edge"])
    if (rw, rh) != (w, h):
      image = image.resize((rw, rh), resample=ip.resample)
    return np.asarray(image, np.uint8)

  def process_images(self, images: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """pixel_values [sum(t*h*w), patch_dim] float32 and image_grid_thw [num_images, 3] int64."""
    out = self.image_processor(images=list(images), return_tensors="np")
    return np.asarray(out["pixel_values"], np.float32), np.asarray(out["image_grid_thw"], np.int64)

  def process_videos(self, clips: Sequence[Clip]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pixel_values_videos [sum(t*h*w), patch_dim] float32, video_grid_thw [V, 3] int64 and
    second_per_grid_ts [V] float32, laid out as transformers' `Qwen2VLVideoProcessor.patchify`: frames in
    temporal pairs (an odd count padded with the last frame), rows in 2x2 merge-block order, each row
    (channel, time, y, x) of one 14x14 patch. Clips are used at their size (data/video.py sized them)."""
    ip = self.image_processor
    p, m, tp = int(ip.patch_size), int(ip.merge_size), int(ip.temporal_patch_size)
    rows, grids, seconds = [], [], []
    for k, clip in enumerate(clips):
      if not isinstance(clip, Clip):
        raise ProcessorError(f"video {k} is a {type(clip).__name__}: give data.video.Clip (see data.video.load_clip)")
      t, h, w, c = clip.frames.shape
      if h % (p * m) or w % (p * m):
        raise ProcessorError(f"video {k} frames are {h}x{w}: sides must be multiples of {p * m} (data.video sizes them)")
      x = (clip.frames.astype(np.float32) - _CLIP_MEAN) / _CLIP_STD  # [T, H, W, C]
      if t % tp:
        x = np.concatenate([x, np.repeat(x[-1:], tp - t % tp, axis=0)])
      gt, gh, gw = len(x) // tp, h // p, w // p
      x = x.transpose(0, 3, 1, 2).reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
      x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
      rows.append(x.reshape(gt * gh * gw, c * tp * p * p))
      grids.append((gt, gh, gw))
      seconds.append(tp / clip.fps)
    return (np.concatenate(rows).astype(np.float32), np.asarray(grids, np.int64).reshape(-1, 3),
            np.asarray(seconds, np.float32))

  def expand_image_tokens(self, texts: Sequence[str], image_grid_thw: np.ndarray | None) -> list[str]:
    """Replaces the k-th `<|image_pad|>` (counting across the batch) by t*h*w/merge**2 copies of it."""
    return self._expand(texts, IMAGE_TOKEN, image_grid_thw, "images")

  def expand_video_tokens(self, texts: Sequence[str], video_grid_thw: np.ndarray | None) -> list[str]:
    """Replaces the k-th `<|video_pad|>` (counting across the batch) by t*h*w/merge**2 copies of it."""
    return self._expand(texts, VIDEO_TOKEN, video_grid_thw, "videos")

  def _expand(self, texts: Sequence[str], token: str, grid_thw: np.ndarray | None, what: str) -> list[str]:
    grid = np.zeros((0, 3), np.int64) if grid_thw is None else np.asarray(grid_thw).reshape(-1, 3)
    counts = [int(g.prod()) // self.merge_length for g in grid]
    n_placeholders = sum(t.count(token) for t in texts)
    if n_placeholders != len(counts):
      raise ProcessorError(f"the text holds {n_placeholders} {token} placeholders but {len(counts)} "
                           f"{what} were given (one placeholder per {what[:-1]}, in order)")
    out, k = [], 0
    for text in texts:
      parts = text.split(token)
      pieces = [parts[0]]
      for part in parts[1:]:
        pieces.append(token * counts[k] + part)
        k += 1
      out.append("".join(pieces))
    return out

  def __call__(self, text: str | Sequence[str], images: Any = None, videos: Any = None, *,
               padding_side: str = "left") -> dict[str, np.ndarray]:
    """Tokenizes a batch of already formatted prompts (see `chat_prompt`) with their images and videos.

    `images` is a flat list in order of appearance (or one list per prompt); `videos` likewise, of
    `Clip`s, in order of the `<|video_pad|>` placeholders. Rows are padded to the longest with the
    tokenizer's pad token, on the left by default (what generation needs).
    """
    if padding_side not in ("left", "right"):
      raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    flat, clips = _flatten_images(images), _flatten_images(videos)
    out: dict[str, np.ndarray] = {}
    grid = vgrid = None
    if flat:
      out["pixel_values"], grid = self.process_images(flat)
      out["image_grid_thw"] = grid
    if clips:
      out["pixel_values_videos"], vgrid, out["second_per_grid_ts"] = self.process_videos(clips)
      out["video_grid_thw"] = vgrid
    expanded = self.expand_video_tokens(self.expand_image_tokens(texts, grid), vgrid)
    enc = self.tokenizer(expanded, padding="longest", padding_side=padding_side, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int64)
    mask = np.asarray(enc["attention_mask"], np.int64)
    for token_id, g, what in ((self.image_token_id, grid, "image"), (self.video_token_id, vgrid, "video")):
      n_tokens = int((ids == token_id).sum())
      expected = sum(int(x.prod()) // self.merge_length for x in (g if g is not None else []))
      if n_tokens != expected:  # the tokenizer merged or split the token: never silently misalign
        raise ProcessorError(f"tokenized prompts hold {n_tokens} {what} tokens, expected {expected}")
    types = np.zeros_like(ids)
    types[ids == self.image_token_id] = 1
    types[ids == self.video_token_id] = 2
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **out}

  def encode_chat(self, questions: str | Sequence[str], images: Any = None, *, videos: Any = None,
                  system: str | None = None, padding_side: str = "left") -> dict[str, np.ndarray]:
    """Formats each question as a user turn with its images, then its videos, placed first, then
    tokenizes the batch.

    `images`, `videos`: None, or one entry per question (None, one item, or a list of them).
    """
    qs = [questions] if isinstance(questions, str) else list(questions)
    per_q, per_v = _per_question(images, qs, "image"), _per_question(videos, qs, "video")
    texts = [self.chat_prompt(q, len(ims), system, len(vs)) for q, ims, vs in zip(qs, per_q, per_v)]
    return self(texts, [im for ims in per_q for im in ims] or None, [v for vs in per_v for v in vs] or None,
                padding_side=padding_side)

  def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
    return self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)
