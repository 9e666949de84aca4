"""The Qwen2.5-VL processor, assembled from the PIL image processor and a tokenizer.

transformers' `Qwen2_5_VLProcessor` cannot be constructed without torchvision (its video
processor needs it), which is unusable on CPU-only machines here. This module reproduces what it
returns for text and still images, from its two numpy-only parts:
`Qwen2VLImageProcessorPil` (smart_resize, CLIP normalisation, patchify in 2x2 merge-block order)
and the tokenizer. Each `<|image_pad|>` in a prompt is expanded to t*h*w/merge_size**2 copies,
one per merged patch, exactly as the stock processor does, so `models.forward` gets the inputs it
is specified against.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_TOKEN + VISION_END

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


class QwenVLProcessor:
  """Text + images -> `input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`, `image_grid_thw`.

  Arrays are numpy, laid out as the stock Hugging Face processor returns them with
  `return_tensors="np", padding=True`: int64 ids and masks, float32 `pixel_values`
  [sum(t*h*w), 3*2*14*14], int64 `image_grid_thw` [num_images, 3].
  """

  def __init__(self, tokenizer: Any, image_processor: Qwen2VLImageProcessorPil):
    self.tokenizer = tokenizer
    self.image_processor = image_processor
    self.image_token_id = self._token_id(IMAGE_TOKEN)
    self.video_token_id = self._token_id(VIDEO_TOKEN)

  @classmethod
  def create(cls, tokenizer: Any, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS,
             patch_size: int = 14, temporal_patch_size: int = 2, merge_size: int = 2) -> "QwenVLProcessor":
    """A processor whose images are resized to [min_pixels, max_pixels] (multiples of 28 per side)."""
    if not 0 < min_pixels <= max_pixels:
      raise ProcessorError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels} max_pixels={max_pixels}")
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
        temporal_patch_size=temporal_patch_size, merge_size=merge_size)
    return cls(tokenizer, image_processor)

  def _token_id(self, token: str) -> int:
    i = self.tokenizer.convert_tokens_to_ids(token)
    if i is None or i == self.tokenizer.unk_token_id:
      raise ProcessorError(f"the tokenizer has no {token} token: it is not a Qwen2.5-VL tokenizer")
    return int(i)

  @property
  def merge_length(self) -> int:
    return int(self.image_processor.merge_size) ** 2

  @staticmethod
  def chat_prompt(question: str, num_images: int = 0, system: str | None = None) -> str:
    """One user turn in Qwen's chat format, images first, ending where the assistant starts.

    `<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>question<|im_end|>\\n<|im_start|>assistant\\n`.
    Qwen's own chat template also inserts a default system turn ("You are a helpful assistant.")
    when none is given; pass `system` to get a system turn.
    """
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return (f"{head}<|im_start|>user\n{IMAGE_PLACEHOLDER * num_images}{question}<|im_end|>\n"
            "<|im_start|>assistant\n")

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

  def expand_image_tokens(self, texts: Sequence[str], image_grid_thw: np.ndarray | None) -> list[str]:
    """Replaces the k-th `<|image_pad|>` (counting across the batch) by t*h*w/merge**2 copies of it."""
    grid = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    counts = [int(g.prod()) // self.merge_length for g in grid]
    n_placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
    if n_placeholders != len(counts):
      raise ProcessorError(f"the text holds {n_placeholders} {IMAGE_TOKEN} placeholders but {len(counts)} "
                           "images were given (one placeholder per image, in order)")
    out, k = [], 0
    for text in texts:
      parts = text.split(IMAGE_TOKEN)
      pieces = [parts[0]]
      for part in parts[1:]:
        pieces.append(IMAGE_TOKEN * counts[k] + part)
        k += 1
      out.append("".join(pieces))
    return out

  def __call__(self, text: str | Sequence[str], images: Any = None, videos: Any = None, *,
               padding_side: str = "left") -> dict[str, np.ndarray]:
    """Tokenizes a batch of already formatted prompts (see `chat_prompt`) with their images.

    `images` is a flat list in order of appearance (or one list per prompt). Rows are padded to
    the longest with the tokenizer's pad token, on the left by default (what generation needs).
    """
    if videos is not None or any(VIDEO_TOKEN in t for t in ([text] if isinstance(text, str) else text)):
      raise ProcessorError("videos are not supported: ares_jax handles text and still images only "
                           "(give frames as separate images if needed)")
    if padding_side not in ("left", "right"):
      raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    flat = _flatten_images(images)
    out: dict[str, np.ndarray] = {}
    grid = None
    if flat:
      out["pixel_values"], grid = self.process_images(flat)
      out["image_grid_thw"] = grid
    expanded = self.expand_image_tokens(texts, grid)
    enc = self.tokenizer(expanded, padding="longest", padding_side=padding_side, return_tensors="np")
    ids = np.asarray(enc["input_ids"], np.int64)
    mask = np.asarray(enc["attention_mask"], np.int64)
    n_tokens = int((ids == self.image_token_id).sum())
    expected = sum(int(g.prod()) // self.merge_length for g in (grid if grid is not None else []))
    if n_tokens != expected:  # the tokenizer merged or split the image token: never silently misalign
      raise ProcessorError(f"tokenized prompts hold {n_tokens} image tokens, expected {expected}")
    types = np.zeros_like(ids)
    types[ids == self.image_token_id] = 1
    types[ids == self.video_token_id] = 2
    return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types, **out}

  def encode_chat(self, questions: str | Sequence[str], images: Any = None, *, system: str | None = None,
                  padding_side: str = "left") -> dict[str, np.ndarray]:
    """Formats each question as a user turn with its images placed first, then tokenizes the batch.

    `images`: None, or one entry per question (None, an image, or a list of images).
    """
    qs = [questions] if isinstance(questions, str) else list(questions)
    per_q: list[list[Any]] = [[] for _ in qs]
    if images is not None:
      if len(images) != len(qs):
        raise ProcessorError(f"{len(qs)} questions but {len(images)} image entries (give one per question)")
      per_q = [[] if im is None else list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
    texts = [self.chat_prompt(q, len(ims), system) for q, ims in zip(qs, per_q)]
    return self(texts, [im for ims in per_q for im in ims] or None, padding_side=padding_side)

  def batch_decode(self, ids: Any, skip_special_tokens: bool = True) -> list[str]:
    return self.tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=skip_special_tokens)
