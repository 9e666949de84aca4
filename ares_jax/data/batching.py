"""Encoded prompts and the processor-style batches the sampler and the trainers take."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt as the processor produced it, unpadded, with its own images and videos (or none); the
  array fields are named and laid out as the processor's keys."""

  ids: np.ndarray  # [T] int32
  pixel_values: np.ndarray | None = None  # [sum t*h*w, 1176]
  image_grid_thw: np.ndarray | None = None  # [I, 3]
  pixel_values_videos: np.ndarray | None = None  # [sum t*h*w, 1176]
  video_grid_thw: np.ndarray | None = None  # [V, 3]
  second_per_grid_ts: np.ndarray | None = None  # [V] float32: seconds one temporal patch spans

  @property
  def has_images(self) -> bool:
    return self.image_grid_thw is not None and len(self.image_grid_thw) > 0

  @property
  def has_videos(self) -> bool:
    return self.video_grid_thw is not None and len(self.video_grid_thw) > 0


def round_up(n: int, multiple: int) -> int:
  return -(-max(int(n), 1) // multiple) * multiple


def prompt_batch(prompts: Sequence[Prompt], pad_id: int, bucket: int = 64) -> dict:
  """Processor-style batch (left padding) of several prompts with their images and videos concatenated."""
  width = round_up(max(len(p.ids) for p in prompts), bucket)
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p.ids):] = p.ids
    mask[i, width - len(p.ids):] = 1
  out = {"input_ids": ids, "attention_mask": mask}
  out.update(media(prompts))
  return out


def media(prompts: Sequence[Prompt]) -> dict:
  """The images and videos of `prompts`, concatenated in order under the processor's keys (absent: none)."""
  out = {}
  imgs = [p for p in prompts if p.has_images]
  if imgs:
    out["pixel_values"] = np.concatenate([p.pixel_values for p in imgs]).astype(np.float32)
    out["image_grid_thw"] = np.concatenate([p.image_grid_thw for p in imgs]).astype(np.int64)
  vids = [p for p in prompts if p.has_videos]
  if vids:
    out["pixel_values_videos"] = np.concatenate([p.pixel_values_videos for p in vids]).astype(np.float32)
    out["video_grid_thw"] = np.concatenate([p.video_grid_thw for p in vids]).astype(np.int64)
    out["second_per_grid_ts"] = np.concatenate([p.second_per_grid_ts for p in vids]).astype(np.float32)
  return out
