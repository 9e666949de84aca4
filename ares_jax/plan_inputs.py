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
  """The shapes one step runs at: prompt and response widths, images per prompt and their grid."""

  prompt_width: int
  response_width: int
  images_per_prompt: int
  grid: tuple[int, int, int]  # (t, h, w) patches of one image
  note: str = ""

  @property
  def image_tokens(self) -> int:
    return self.images_per_prompt * math.prod(self.grid) // 4

  def describe(self, rows: int) -> str:
    img = f", {self.images_per_prompt} img {self.grid[1] * 14}x{self.grid[2] * 14} px" if self.images_per_prompt else ""
    return f"{rows} x ({self.prompt_width} + {self.response_width}){img}{self.note}"


def step_shapes(config: ml_collections.ConfigDict, mcfg: models.ModelConfig, response_width: int) -> Shapes:
  """Prompt width from `rollout.max_prompt_length`, image load from `config.plan`; a prompt width too
  small for the images is raised to hold them (said in the shapes column: such prompts would be
  skipped by the run's length check unless max_prompt_length is raised to match)."""
  p, vc = config.plan, mcfg.vision
  pixels = p.image_pixels or config.processor.max_pixels
  side = int(math.isqrt(int(pixels)))
  factor = vc.patch_size * vc.spatial_merge_size
  h, w = smart_resize(side, side, factor=factor, min_pixels=config.processor.min_pixels, max_pixels=pixels)
  grid = (1, h // vc.patch_size, w // vc.patch_size)
  width = int(config.rollout.max_prompt_length)
  shapes = Shapes(width, response_width, int(p.images_per_prompt), grid)
  need = shapes.image_tokens + 2 * shapes.images_per_prompt + 32
  if need > width:
    raised = sequences.round_up(need, 64)
    shapes = dataclasses.replace(shapes, prompt_width=raised, note=f" (prompt raised from {width} to hold the images)")
  return shapes


def synthetic_batch(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> dict:
  """A processor batch of n synthetic prompts whose pixel rows are abstract (a chunk of hundreds of
  max_pixels images would not fit in host memory; pixel values do not change device memory)."""
  batch = sequences.prompt_batch([sequences.Prompt(ids) for ids in _prompt_ids(mcfg, shapes, n)], 0)
  if shapes.images_per_prompt:
    grid = np.tile(np.asarray(shapes.grid, np.int64), (n * shapes.images_per_prompt, 1))
    batch["image_grid_thw"] = grid
    batch["pixel_values"] = jax.ShapeDtypeStruct((int(grid.prod(-1).sum()), mcfg.vision.patch_dim), jnp.float32)
  return batch


def _prompt_ids(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> list[np.ndarray]:
  per_image = math.prod(shapes.grid) // mcfg.vision.merge_unit
  image = [mcfg.vision_start_token_id] + [mcfg.image_token_id] * per_image + [mcfg.vision_end_token_id]
  ids = image * shapes.images_per_prompt
  return [np.asarray(ids + [1] * (shapes.prompt_width - len(ids)), np.int32)] * n


def synthetic_prompts(mcfg: models.ModelConfig, shapes: Shapes, n: int) -> list[sequences.Prompt]:
  """n prompts filling `shapes.prompt_width` tokens, with their images (zero pixels: values do not
  change memory)."""
  ids = _prompt_ids(mcfg, shapes, 1)[0]
  if not shapes.images_per_prompt:
    return [sequences.Prompt(ids) for _ in range(n)]
  grid = np.tile(np.asarray(shapes.grid, np.int64), (shapes.images_per_prompt, 1))
  pixels = np.zeros((int(grid.prod(-1).sum()), mcfg.vision.patch_dim), np.float32)
  return [sequences.Prompt(ids, pixels, grid) for _ in range(n)]


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
