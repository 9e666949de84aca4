"""Tiny random Hugging Face Qwen2.5-VL checkpoints and processor outputs, built locally for parity tests."""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

VOCAB = 320
IMAGE, VIDEO, V_START, V_END = 310, 311, 312, 313


def hf_config(tie: bool = False, layers: int = 2, depth: int = 3, fullatt=(1,), window_size: int = 112):
  return Qwen2_5_VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                       tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2),
      vision_config=dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                         fullatt_block_indexes=list(fullatt), window_size=window_size, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=V_START, vision_end_token_id=V_END,
      tie_word_embeddings=tie)


def hf_model(seed: int = 0, **kw) -> Qwen2_5_VLForConditionalGeneration:
  """A random model in float32 with every parameter (norms and biases too) perturbed."""
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(hf_config(**kw)).eval().float()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name:
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) * (0.05 if p.ndim > 1 else 0.02))
  return model


def save(model, path: str) -> str:
  os.makedirs(path, exist_ok=True)
  model.save_pretrained(path)
  return path


def saved_and_loaded(path: str, seed: int = 0, **kw):
  """A random model saved to `path` and loaded by ares_jax: (torch model, path, ModelConfig, params)."""
  from ares_jax import models  # pylint: disable=g-import-not-at-top
  model = hf_model(seed=seed, **kw)
  save(model, path)
  config, params = models.load_hf(path)
  return model, path, config, params


def image_processor(max_pixels: int = 28 * 28 * 64) -> Qwen2VLImageProcessorPil:
  return Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=max_pixels)


def random_images(sizes, seed=0):
  from PIL import Image
  rng = np.random.default_rng(seed)
  return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for (h, w) in sizes]


def build_batch(segments_per_row, images, padding_side="left", max_pixels=28 * 28 * 64, seed=0, videos=(),
                seconds=None):
  """Processor-style batch. Each row is a list of segments: an int n = n random text tokens,
  'img' = the next image (vision_start, n merged <|image_pad|> tokens, vision_end), 'vid' = the next
  video, of `videos`' grids (t, h, w) in patches with random pixel rows, `seconds` per temporal patch."""
  rng = np.random.default_rng(seed)
  out = {}
  grid = None
  if images:
    proc = image_processor(max_pixels)(images=images, return_tensors="np")
    out["pixel_values"] = np.asarray(proc["pixel_values"], np.float32)
    grid = np.asarray(proc["image_grid_thw"], np.int64)
    out["image_grid_thw"] = grid
  if videos:
    vgrid = np.asarray(videos, np.int64).reshape(-1, 3)
    out["pixel_values_videos"] = rng.normal(size=(int(vgrid.prod(-1).sum()), 3 * 2 * 14 * 14)).astype(np.float32)
    out["video_grid_thw"] = vgrid
    if seconds is not None:
      out["second_per_grid_ts"] = np.asarray(seconds, np.float32)
  rows, k, kv = [], 0, 0
  for segs in segments_per_row:
    ids = []
    for s in segs:
      if s == "img":
        n = int(np.prod(grid[k]) // 4)
        ids += [V_START] + [IMAGE] * n + [V_END]
        k += 1
      elif s == "vid":
        n = int(np.prod(vgrid[kv]) // 4)
        ids += [V_START] + [VIDEO] * n + [V_END]
        kv += 1
      else:
        ids += list(rng.integers(3, 300, size=s))
    rows.append(ids)
  t = max(map(len, rows))
  input_ids = np.full((len(rows), t), 2, np.int64)
  mask = np.zeros((len(rows), t), np.int64)
  for i, ids in enumerate(rows):
    sl = slice(t - len(ids), t) if padding_side == "left" else slice(0, len(ids))
    input_ids[i, sl] = ids
    mask[i, sl] = 1
  out["input_ids"], out["attention_mask"] = input_ids, mask
  return out


def hf_inputs(batch) -> dict:
  """transformers' keyword arguments for a processor-style batch; `mm_token_type_ids` (1 image, 2 video)
  whenever it has images or videos, so that its `get_rope_index` computes the M-RoPE ids."""
  ids = torch.tensor(batch["input_ids"])
  kw = dict(input_ids=ids, attention_mask=torch.tensor(batch["attention_mask"]))
  for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
    if key in batch:
      kw[key] = torch.tensor(batch[key])
  if "pixel_values" in batch or "pixel_values_videos" in batch:
    kw["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
  return kw


def hf_logits(model, batch) -> np.ndarray:
  """transformers' logits; M-RoPE ids via its own get_rope_index (mm_token_type_ids given)."""
  kw = hf_inputs(batch)
  if "mm_token_type_ids" not in kw:  # text only: transformers' generate convention, positions over attended tokens
    kw["position_ids"] = (kw["attention_mask"].cumsum(-1) - 1).clamp(min=0)
  with torch.no_grad():
    return model(**kw).logits.float().numpy()
