"""`generate`: a batch of prompts rolled out by either engine, fed in equally shaped chunks.

A rollout's device memory grows with the prompts decoded together, so a step's 512 prompts at 7B
cannot be one program. The paged engine (`refill.py`) keeps `prompts_in_flight` groups decoding and
prefills the waiting prompts `chunk_prompts` at a time as groups end; the dense engine runs one
compiled rollout per chunk of `chunk_prompts` (its KV cache is P x (n + branches) x (T + N) tokens, the
vision tower sees every image and video of the chunk). The memory planner (`ares_jax.plan`) finds the largest
size that fits. Every chunk has the same shapes (the prompt width of the whole batch, the vision slot
count of the largest chunk, the last chunk filled with copies of a prompt whose slots are dropped), so
a step compiles one program per engine part whatever its chunking.
Random streams are keyed by (prompt, slot, position), so chunking does not change what is sampled.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from ares_jax import sharding
from ares_jax.models import positions as pos_lib
from ares_jax.models.config import ModelConfig
from ares_jax.models.qwen25vl import ModelInputs, check_inputs, media_positions, media_vision
from ares_jax.models.vision import VisionInputs
from ares_jax.sampling.config import Rollouts, SamplingConfig
from ares_jax.sampling import refill
from ares_jax.sampling.sampler import decode_weight_layout, decode_weights, device_memory, rollout_chunk


def left_align(ids: np.ndarray, mask: np.ndarray, bucket: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Moves every row's tokens to the right end and pads on the left to a multiple of `bucket`."""
  p, t = ids.shape
  width = -(-t // bucket) * bucket
  out_ids = np.full((p, width), pad_id, np.int32)
  out_mask = np.zeros((p, width), np.int32)
  for i in range(p):
    row = ids[i][mask[i] > 0]
    if len(row) == 0:
      raise pos_lib.InputError(f"prompt {i} is empty (attention_mask all zero)")
    out_ids[i, width - len(row):] = row
    out_mask[i, width - len(row):] = 1
  return out_ids, out_mask


@dataclasses.dataclass(frozen=True)
class _Chunk:
  """The host arrays of one chunk: prompts `rows` of the batch (the last chunk repeats its first)."""

  rows: np.ndarray  # [P_chunk] batch rows; entries past `n_real` are filler copies
  n_real: int
  inputs: ModelInputs  # ids / mask [P_chunk, T], positions [3, P_chunk, T], vision


@dataclasses.dataclass(frozen=True)
class _Media:
  """The images or the videos of a batch (one kind): their pixel rows, grids, per-item extras and which
  items each prompt row holds (items are concatenated in prompt order, each taking t*h*w / merge_unit
  placeholder tokens of `token_id`)."""

  pixels: np.ndarray | jax.ShapeDtypeStruct  # [sum t*h*w, patch_dim]; abstract in memory plans
  grid: np.ndarray  # [I, 3]
  seconds: np.ndarray | None  # [I] second_per_grid_ts (videos)
  of_row: list[np.ndarray]  # per prompt row, the indices of its items
  start: np.ndarray  # [I + 1] each item's first pixel row (and the total)

  @classmethod
  def of(cls, config: ModelConfig, ids, mask, pixels, grid, token_id: int, seconds=None) -> "_Media | None":
    if pixels is None or grid is None:
      return None
    grid = np.asarray(grid).reshape(-1, 3)
    per_item = pos_lib.merged_token_counts(grid, config.vision)
    of_row, nxt = [], 0
    for n in ((ids == token_id) & (mask > 0)).sum(axis=1):
      first = nxt
      while n > 0:
        n -= per_item[nxt]
        nxt += 1
      of_row.append(np.arange(first, nxt))
    pixels = pixels if isinstance(pixels, jax.ShapeDtypeStruct) else np.asarray(pixels)
    seconds = None if seconds is None else np.asarray(seconds, np.float32).reshape(-1)
    return cls(pixels, grid, seconds, of_row, np.concatenate([[0], np.cumsum(grid.prod(-1))]))

  def select(self, rows: np.ndarray) -> tuple:
    """(pixel rows, grid, seconds) of the items of prompt `rows`, in their order; Nones when they hold none."""
    items = np.concatenate([self.of_row[r] for r in rows]).astype(np.int64)
    if not len(items):
      return None, None, None
    start = self.start
    if isinstance(self.pixels, jax.ShapeDtypeStruct):
      pixels = jax.ShapeDtypeStruct((int((start[items + 1] - start[items]).sum()), self.pixels.shape[1]),
                                    np.float32)
    else:
      pixels = np.concatenate([self.pixels[start[i]:start[i + 1]] for i in items])
    return pixels, self.grid[items], None if self.seconds is None else self.seconds[items]


def _host(a):
  """numpy, except None and a memory plan's abstract pixels."""
  return a if a is None or isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a)


def _pad_vision(v: VisionInputs, n: int, m: int) -> VisionInputs:
  """Pads the slot layout to n slots and the merged index to m entries (pad slots are segment -1,
  extra merged entries are never read), so every chunk's vision inputs have one shape."""
  extra = n - v.patches.shape[0]
  if isinstance(v.patches, jax.ShapeDtypeStruct):  # a memory plan's abstract pixels
    patches = jax.ShapeDtypeStruct((n, v.patches.shape[1]), v.patches.dtype)
  else:
    patches = np.pad(v.patches, ((0, extra), (0, 0)))
  return v.replace(
      patches=patches, slot_segment=np.pad(v.slot_segment, (0, extra), constant_values=-1),
      pos_hw=np.pad(v.pos_hw, ((0, extra), (0, 0))),
      merged_index=np.pad(v.merged_index, (0, m - v.merged_index.shape[0])))


def make_chunks(config: ModelConfig, batch: dict, sc: SamplingConfig) -> list[_Chunk]:
  """Checks the processor batch and splits it into equally shaped chunks of `sc.chunk_prompts`."""
  ids = np.asarray(batch["input_ids"])
  mask = np.asarray(batch["attention_mask"])
  get = lambda key: _host(batch.get(key))
  check_inputs(config, ids, mask, get("pixel_values"), get("image_grid_thw"), get("pixel_values_videos"),
               get("video_grid_thw"), get("second_per_grid_ts"))
  ids, mask = left_align(ids, mask, sc.prompt_bucket, sc.pad_id)
  n_prompts = ids.shape[0]
  size = min(sc.chunk_prompts or n_prompts, n_prompts)
  images = _Media.of(config, ids, mask, get("pixel_values"), get("image_grid_thw"), config.image_token_id)
  videos = _Media.of(config, ids, mask, get("pixel_values_videos"), get("video_grid_thw"), config.video_token_id,
                     get("second_per_grid_ts"))
  chunks = []
  for lo in range(0, n_prompts, size):
    real = np.arange(lo, min(lo + size, n_prompts))
    rows = np.concatenate([real, np.full(size - len(real), real[0])])
    c_ids, c_mask, media = ids[rows], mask[rows], {}
    if images is not None:
      media["pixel_values"], media["image_grid_thw"], _ = images.select(rows)
    if videos is not None:
      media["pixel_values_videos"], media["video_grid_thw"], media["second_per_grid_ts"] = videos.select(rows)
    vision = media_vision(config, media)
    positions = media_positions(config, c_ids, c_mask, media)
    chunks.append(_Chunk(rows, len(real), ModelInputs(c_ids, positions, c_mask, vision)))
  visions = [c.inputs.vision for c in chunks if c.inputs.vision is not None]
  if visions:  # one vision shape for all chunks; a chunk without images gets an all-padding layout
    n = max(v.patches.shape[0] for v in visions)
    m = max(v.merged_index.shape[0] for v in visions)
    empty = visions[0].replace(patches=np.zeros((0, visions[0].patches.shape[1]), np.float32),
                               slot_segment=np.zeros((0,), np.int32), pos_hw=np.zeros((0, 2), np.int32),
                               merged_index=np.zeros((0,), np.int32))
    chunks = [dataclasses.replace(c, inputs=c.inputs.replace(
        vision=_pad_vision(c.inputs.vision if c.inputs.vision is not None else empty, n, m))) for c in chunks]
  return chunks


def _renumbered(part: dict, n_prompts: int, group: int) -> Rollouts:
  """The record of `n_prompts` groups read back together, slots and parents numbered from 0."""
  local = np.repeat(np.arange(n_prompts), group)
  parent = np.where(part["parent"] >= 0, part["parent"] % group + local * group, -1)
  return Rollouts(**{**part, "parent": parent}, prompt_index=local.astype(np.int32))


def generate(config: ModelConfig, params, batch: dict, sampling_config: SamplingConfig, key: jax.Array,
             tau_high: float | None = None, *, budgets=None,
             on_done: Callable[[np.ndarray, Rollouts], None] | None = None) -> Rollouts:
  """Samples `n` trajectories per prompt (plus HWE branches when `tau_high` is given).

  `batch` is the processor output: input_ids, attention_mask (left or right padding), and
  optionally pixel_values / image_grid_thw and pixel_values_videos / video_grid_thw / second_per_grid_ts. Deterministic for a given `key`, and the same for every
  `chunk_prompts`, `kv_cache`, `page_size` and `prompts_in_flight`. Slots are numbered over the whole
  batch: slot g * (n + branches) + i. `budgets` [B]: each prompt's response budget (at most, and by
  default, `max_new_tokens`). `on_done(prompt rows, their rollouts)` is called as groups of prompts end
  (every group exactly once; their slots numbered from 0 in that partial record), e.g. to grade them
  while the rest decode.
  """
  sc = sampling_config.for_platform(sharding.platform_of(params))
  if sc.suppress_ids is None:
    sc = dataclasses.replace(sc, suppress_ids=(config.image_token_id, config.video_token_id,
                                               config.vision_start_token_id, config.vision_end_token_id))
  if sc.kv_cache == "paged":  # chunks are the prefill calls
    sc = dataclasses.replace(sc, chunk_prompts=refill.layout(sc, len(batch["input_ids"]))[1])
  chunks = make_chunks(config, batch, sc)
  n_prompts = sum(c.n_real for c in chunks)
  budgets = np.full(n_prompts, sc.max_new_tokens) if budgets is None else np.asarray(budgets).reshape(-1)
  if budgets.shape != (n_prompts,) or np.any(budgets < 1):
    raise ValueError(f"budgets must hold one positive response budget per prompt ({n_prompts}); got {budgets}")
  budgets = np.minimum(budgets, sc.max_new_tokens).astype(np.int32)
  group = sc.n + sc.branches(tau_high is not None)
  tau = None if tau_high is None else np.float32(tau_high)
  report = None if on_done is None else lambda rows, part: on_done(rows, _renumbered(part, len(rows), group))
  with sharding.mesh_context_of(params):
    weights = decode_weights(config, params, sc.lora_merged)
    # a compiled identity reshards by collectives, which also crosses processes (a device_put may not)
    weights = jax.jit(lambda w: w, out_shardings=decode_weight_layout(weights, device_memory()))(weights)
  if sc.kv_cache == "paged":
    out = refill.run(config, params, weights, chunks, sc, key, tau, budgets=budgets, on_done=report)
  else:
    parts = []
    for c in chunks:
      lo = int(c.rows[0])
      with sharding.mesh_context_of(params):
        part = rollout_chunk(config, sc, params, weights, c.inputs, key, tau, prompt_offset=np.int32(lo),
                             budget=budgets[c.rows])
      part = {k: np.asarray(v)[:c.n_real * group] for k, v in sharding.to_host(part).items()}
      if report is not None:
        report(c.rows[:c.n_real], part)
      part["parent"] = np.where(part["parent"] >= 0, part["parent"] + lo * group, -1)
      parts.append(part)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  return Rollouts(prompt_index=np.repeat(np.arange(n_prompts), group).astype(np.int32), **out)
