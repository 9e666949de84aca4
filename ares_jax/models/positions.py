"""Host-side (numpy) index computations that depend on concrete image and video sizes.

Nothing here runs under jit: M-RoPE position ids, the window-ordered slot layout of the vision
tower, rotary patch coordinates and the shape buckets that keep the compiled programs few.
"""

from __future__ import annotations

import numpy as np

from ares_jax.models.config import ModelConfig, VisionConfig


class InputError(ValueError):
  """Inputs that do not fit the model; the message says what was found and what was expected."""


def bucket(n: int, minimum: int = 1) -> int:
  """Rounds n up to a shape bucket: powers of two up to 16, then steps of 1/8 of the power of two.

  At most 12.5% padding above 16 while keeping the number of distinct shapes logarithmic.
  """
  n = max(int(n), minimum, 1)
  if n <= 16:
    return 1 << (n - 1).bit_length()
  step = 1 << ((n - 1).bit_length() - 3)
  return -(-n // step) * step


def merged_token_counts(image_grid_thw: np.ndarray, vc: VisionConfig) -> np.ndarray:
  """Number of <|image_pad|> tokens each image expands to: t * h * w / merge_size**2."""
  grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  return grid.prod(-1) // vc.merge_unit


def mrope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, image_grid_thw: np.ndarray | None,
                    config: ModelConfig, video_grid_thw: np.ndarray | None = None,
                    second_per_grid_ts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """3-D rotary position ids [3, B, T] and rope deltas [B] (transformers' `get_rope_index`).

  Text tokens get equal ids on the three axes; an image's or video's merged tokens get (t, row, column)
  ids offset by the position where it starts, and the text after it continues from that start plus
  max(rows, columns). A video's temporal id is floor(t x `second_per_grid_ts` x `tokens_per_second`) (its
  temporal patches are seconds apart, not 1; 1 second when not given, as transformers assumes). Only
  attended tokens are counted (left padding is skipped); padding gets 0. The delta is what the next
  generated token's position exceeds its index by: max + 1 - length.
  """
  ids = np.asarray(input_ids)
  mask = np.asarray(attention_mask).astype(bool)
  b, t = ids.shape
  merge = config.vision.spatial_merge_size
  grids = {
      config.image_token_id: iter(_grid_list(image_grid_thw)),
      config.video_token_id: iter(_grid_list(video_grid_thw)),
  }
  n_videos = len(_grid_list(video_grid_thw))
  seconds = iter(np.ones(n_videos) if second_per_grid_ts is None
                 else np.asarray(second_per_grid_ts, np.float64).reshape(-1))
  positions = np.zeros((3, b, t), dtype=np.int32)
  deltas = np.zeros((b,), dtype=np.int32)
  for row in range(b):
    seq = ids[row][mask[row]]
    is_media = (seq == config.image_token_id) | (seq == config.video_token_id)
    chunks, cur, i = [], 0, 0
    while i < len(seq):
      if is_media[i]:
        token = int(seq[i])
        kind = "image" if token == config.image_token_id else "video"
        grid = next(grids[token], None)
        if grid is None:
          raise InputError(f"row {row}: more runs of {kind} tokens than {kind}s in {kind}_grid_thw")
        gt, gh, gw = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
        n = gt * gh * gw
        if len(seq) < i + n or not (seq[i:i + n] == token).all():
          run = int(np.argmin(np.append(seq[i:] == token, False)))
          raise InputError(
              f"row {row}: a {kind} of grid {grid.tolist()} needs {n} consecutive {kind} tokens but the prompt "
              f"has a run of {run}; likely causes: the prompt was truncated (max_prompt_length), or the "
              f"<|{kind}_pad|> expansion used a different max_pixels/min_pixels than the pixel values")
        interval = 1.0
        if kind == "video":
          interval = config.vision.tokens_per_second * float(next(seconds, 1.0))
        t_ids = (np.arange(gt) * interval).astype(np.int64)  # truncated as transformers' .long()
        tt, hh, ww = np.meshgrid(t_ids, np.arange(gh), np.arange(gw), indexing="ij")
        chunks.append(np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur)
        cur += max(gh, gw)
        i += n
      else:
        j = i + int(np.argmax(np.append(is_media[i:], True)))
        chunks.append(np.broadcast_to(np.arange(j - i) + cur, (3, j - i)))
        cur += j - i
        i = j
    pos = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
    positions[:, row, mask[row]] = pos
    deltas[row] = (pos.max() + 1 - len(seq)) if len(seq) else 0
  for token, it in grids.items():
    if next(it, None) is not None:
      kind = "image" if token == config.image_token_id else "video"
      raise InputError(f"{kind}_grid_thw lists more {kind}s than the prompts hold runs of {kind} tokens")
  return positions, deltas


def _grid_list(grid: np.ndarray | None) -> list[np.ndarray]:
  return [] if grid is None else list(np.asarray(grid, dtype=np.int64).reshape(-1, 3))


def vision_layout(image_grid_thw: np.ndarray, vc: VisionConfig, min_windows: int = 1) -> dict[str, np.ndarray]:
  """Window-ordered slot layout of all patches of a batch of images.

  Mirrors transformers' `get_vision_window_index`: per image frame, merged tokens are grouped into
  windows of `window_merged` x `window_merged` (row-major over windows, row-major inside), windows
  at the right/bottom edge holding fewer. Each window gets `window_merged**2 * merge_unit` slots.

  Returns int32 arrays: `patch_src` [N] (row of pixel_values, -1 = pad), `slot_segment` [N]
  (frame id, -1 = pad), `pos_hw` [N, 2], `merged_index` [M] (merged slot of each merged token in
  Hugging Face order). N is bucketed through the window count.
  """
  grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  ws, mu, merge = vc.window_merged, vc.merge_unit, vc.spatial_merge_size
  slots_per_window = ws * ws * mu
  src, seg, pos, merged = [], [], [], []  # per window
  patch_base, segment = 0, 0
  for gt, gh, gw in grid.tolist():
    lh, lw = gh // merge, gw // merge
    # patch coordinates in merge-block order, as transformers' get_vision_position_ids
    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    block = (lh, merge, lw, merge)
    coords = np.stack([hh.reshape(block).transpose(0, 2, 1, 3).ravel(),
                       ww.reshape(block).transpose(0, 2, 1, 3).ravel()], -1)  # [gh*gw, 2]
    for f in range(gt):
      frame_base = patch_base + f * gh * gw
      for wr in range(0, lh, ws):
        for wc in range(0, lw, ws):
          r, c = np.meshgrid(np.arange(wr, min(wr + ws, lh)), np.arange(wc, min(wc + ws, lw)), indexing="ij")
          m = (r * lw + c).ravel()  # merged index within the frame
          patches = (m[:, None] * mu + np.arange(mu)).ravel()  # patch index within the frame
          src.append(frame_base + patches)
          seg.append(np.full(len(patches), segment))
          pos.append(coords[patches])
          merged.append((frame_base // mu) + m)
      segment += 1
    patch_base += gt * gh * gw
  nw = bucket(len(src), min_windows)
  patch_src = np.full((nw, slots_per_window), -1, np.int32)
  slot_segment = np.full((nw, slots_per_window), -1, np.int32)
  pos_hw = np.zeros((nw, slots_per_window, 2), np.int32)
  n_merged = sum(len(m) for m in merged)
  merged_index = np.zeros((bucket(n_merged),), np.int32)
  for w, (s, g, p, m) in enumerate(zip(src, seg, pos, merged)):
    patch_src[w, :len(s)] = s
    slot_segment[w, :len(s)] = g
    pos_hw[w, :len(s)] = p
    merged_index[m] = w * (ws * ws) + np.arange(len(m))
  return {"patch_src": patch_src.ravel(), "slot_segment": slot_segment.ravel(),
          "pos_hw": pos_hw.reshape(-1, 2), "merged_index": merged_index, "n_merged": np.int32(n_merged)}
