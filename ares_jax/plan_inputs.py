"""What memory plans compile with: the shapes of one step (`Shapes`) and synthetic inputs of those shapes,
made by the real run's host code, and the `Setting` every program of a plan shares (mesh, model, HBM,
abstract policy)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from ares_jax import models, sharding
from ares_jax import settings as settings_lib
from ares_jax.compiled_memory import Compiled, abstract_params, compile_program
from ares_jax.train import sequences
# --- synthetic inputs of the config's shapes -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
  """The shapes one step runs at: prompt and response widths, images and videos per prompt and their grids."""

  prompt_width: int
  response_width: int
  images_per_prompt: int
  grid: tuple[int, int, int]  # (t, h, w) patches of one image
  note: str = ""
  videos_per_prompt: int = 0
  video_grid: tuple[int, int, int] = (0, 0, 0)  # (t, h, w) patches of one video: t = frames / 2

  @property
  def image_tokens(self) -> int:
    return self.images_per_prompt * math.prod(self.grid) // 4

  @property
  def video_tokens(self) -> int:
    return self.videos_per_prompt * math.prod(self.video_grid) // 4

  def media(self, prompts: int = 1) -> str:
    """What `prompts` prompts hold, e.g. ", 8 img 1008x1008 px, 8 video 16 frames 308x308 px" ("" for text)."""
    out = ""
    if self.images_per_prompt:
      out += f", {prompts * self.images_per_prompt} img {self.grid[1] * 14}x{self.grid[2] * 14} px"
    if self.videos_per_prompt:
      t, h, w = self.video_grid
      out += f", {prompts * self.videos_per_prompt} video {2 * t} frames {h * 14}x{w * 14} px"
    return out

  def describe(self, rows: int) -> str:
    return f"{rows} x ({self.prompt_width} + {self.response_width}){self.media()}{self.note}"


def step_shapes(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, response_width: int) -> Shapes:
  """Prompt width from `rollout.max_prompt_length`, image and video load from `config.plan` (square frames
  of `image_pixels` / `video_pixels`, `video_frames` frames a video); a prompt width too small for them is
  raised to hold them (said in the shapes column: such prompts would be skipped by the run's length check
  unless max_prompt_length is raised to match)."""
  p = config.plan
  grid = _square_grid(mcfg, p.image_pixels or config.processor.max_pixels, config.processor.min_pixels)
  video_grid = (0, 0, 0)
  if p.videos_per_prompt:
    frames = sequences.round_up(int(p.video_frames), 2)  # temporal patches of 2 frames
    video_grid = (frames // 2,) + _square_grid(mcfg, p.video_pixels, min(p.video_pixels, 128 * 28 * 28))[1:]
  width = int(config.rollout.max_prompt_length)
  shapes = Shapes(width, response_width, int(p.images_per_prompt), grid, videos_per_prompt=int(p.videos_per_prompt),
                  video_grid=video_grid)
  need = shapes.image_tokens + shapes.video_tokens + 2 * (shapes.images_per_prompt + shapes.videos_per_prompt) + 32
  if need > width:
    raised = sequences.round_up(need, 64)
    media = " and ".join(k for k, n in (("images", shapes.images_per_prompt), ("videos", shapes.videos_per_prompt))
                         if n)
    shapes = dataclasses.replace(shapes, prompt_width=raised, note=f" (prompt raised from {width} to hold the {media})")
  return shapes


def _square_grid(mcfg: models.ModelConfig, pixels: int, min_pixels: int) -> tuple[int, int, int]:
  """The (1, h, w) patch grid of a square frame of `pixels` pixels after the processor's `smart_resize`."""
  vc = mcfg.vision
  side = int(math.isqrt(int(pixels)))
  h, w = smart_resize(side, side, factor=vc.patch_size * vc.spatial_merge_size, min_pixels=min_pixels,
                      max_pixels=pixels)
  return (1, h // vc.patch_size, w // vc.patch_size)


def synthetic_batch(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> dict:
  """A processor batch of n synthetic prompts whose pixel rows are abstract (a chunk of hundreds of
  max_pixels images would not fit in host memory; pixel values do not change device memory)."""
  batch = sequences.prompt_batch([sequences.Prompt(ids) for ids in _prompt_ids(mcfg, shapes, n)], 0)
  abstract = lambda g: jax.ShapeDtypeStruct((int(g.prod(-1).sum()), mcfg.vision.patch_dim), jnp.float32)
  if shapes.images_per_prompt:
    batch["image_grid_thw"] = np.tile(np.asarray(shapes.grid, np.int64), (n * shapes.images_per_prompt, 1))
    batch["pixel_values"] = abstract(batch["image_grid_thw"])
  if shapes.videos_per_prompt:
    batch["video_grid_thw"] = np.tile(np.asarray(shapes.video_grid, np.int64), (n * shapes.videos_per_prompt, 1))
    batch["pixel_values_videos"] = abstract(batch["video_grid_thw"])
    batch["second_per_grid_ts"] = np.ones((n * shapes.videos_per_prompt,), np.float32)
  return batch


def _prompt_ids(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> list[np.ndarray]:
  run = lambda token, grid: ([mcfg.vision_start_token_id] + [token] * (math.prod(grid) // mcfg.vision.merge_unit)
                             + [mcfg.vision_end_token_id])
  ids = (run(mcfg.image_token_id, shapes.grid) * shapes.images_per_prompt
         + run(mcfg.video_token_id, shapes.video_grid) * shapes.videos_per_prompt)
  return [np.asarray(ids + [1] * (shapes.prompt_width - len(ids)), np.int32)] * n


def synthetic_prompts(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> list[sequences.Prompt]:
  """n prompts filling `shapes.prompt_width` tokens, with their images and videos (zero pixels: values do not
  change memory)."""
  ids = _prompt_ids(mcfg, shapes, 1)[0]
  zeros = lambda g: np.zeros((int(g.prod(-1).sum()), mcfg.vision.patch_dim), np.float32)
  media = {}
  if shapes.images_per_prompt:
    media["image_grid_thw"] = np.tile(np.asarray(shapes.grid, np.int64), (shapes.images_per_prompt, 1))
    media["pixel_values"] = zeros(media["image_grid_thw"])
  if shapes.videos_per_prompt:
    media["video_grid_thw"] = np.tile(np.asarray(shapes.video_grid, np.int64), (shapes.videos_per_prompt, 1))
    media["pixel_values_videos"] = zeros(media["video_grid_thw"])
    media["second_per_grid_ts"] = np.ones((shapes.videos_per_prompt,), np.float32)
  return [sequences.Prompt(ids, **media) for _ in range(n)]


# --- the programs of a step ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Setting:
  """What every program of a plan shares: the devices' mesh, the model, HBM, the abstract policy."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  mcfg: models.ModelConfig
  hbm_gib: float
  params: Any  # abstract policy parameters

  @classmethod
  def create(cls, config: ml_collections.ConfigDict, devices: list[Any], hbm_gib: float) -> "Setting":
    m = config.mesh
    mesh = sharding.make_mesh(data=m.data, fsdp=m.fsdp, tensor=m.tensor, devices=devices)
    mcfg = settings_lib.model(config.model)
    return cls(config, mesh, mcfg, hbm_gib, abstract_params(mcfg, mesh))

  def compile(self, fn: Callable, *args, **kwargs) -> Compiled:
    return compile_program(fn, *args, mesh=self.mesh, **kwargs)
