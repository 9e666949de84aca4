"""Encoded prompts and the processor-style batches the sampler and the trainers take."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt as the processor produced it, unpadded, with its own images (or none)."""

  ids: np.ndarray  # [T] int32
  pixel_values: np.ndarray | None = None  # [sum t*h*w, 1176]
  image_grid_thw: np.ndarray | None = None  # [I, 3]


def round_up(n: int, multiple: int) -> int:
  return -(-max(int(n), 1) // multiple) * multiple


def prompt_batch(prompts: Sequence[Prompt], pad_id: int, bucket: int = 64) -> dict:
  """Processor-style batch (left padding) of several prompts with their images concatenated."""
  width = round_up(max(len(p.ids) for p in prompts), bucket)
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    ids[i, width - len(p.ids):] = p.ids
    mask[i, width - len(p.ids):] = 1
  out = {"input_ids": ids, "attention_mask": mask}
  imgs = [p for p in prompts if p.image_grid_thw is not None and len(p.image_grid_thw)]
  if imgs:
    out["pixel_values"] = np.concatenate([p.pixel_values for p in imgs]).astype(np.float32)
    out["image_grid_thw"] = np.concatenate([p.image_grid_thw for p in imgs]).astype(np.int64)
  return out
