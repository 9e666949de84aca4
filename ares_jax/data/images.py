"""Procedurally drawn test images: deterministic pictures with a known answer, no files or downloads."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


def draw_polygon_image(height: int = 96, width: int = 128, sides: int = 3, seed: int = 0) -> Image.Image:
  """An RGB image of one filled regular polygon with `sides` sides on a noisy gradient background.

  The answer to "how many sides does the shape have?" is `sides`, which makes the image usable as a
  smoke-test prompt and as a toy verifiable task.
  """
  if sides < 3:
    raise ValueError(f"a polygon needs at least 3 sides, got {sides}")
  rng = np.random.default_rng(seed)
  y = np.linspace(0.0, 1.0, height)[:, None, None]
  x = np.linspace(0.0, 1.0, width)[None, :, None]
  base = 60 + 120 * (0.6 * y + 0.4 * x) * np.array([0.9, 1.0, 1.2])
  pixels = np.clip(base + rng.normal(0.0, 6.0, (height, width, 3)), 0, 255).astype(np.uint8)
  img = Image.fromarray(pixels, "RGB")
  draw = ImageDraw.Draw(img)
  cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
  r = 0.35 * min(height, width)
  phase = rng.uniform(0, 2 * math.pi)
  points = [(cx + r * math.cos(phase + 2 * math.pi * k / sides), cy + r * math.sin(phase + 2 * math.pi * k / sides))
            for k in range(sides)]
  color = tuple(int(c) for c in rng.integers(150, 256, 3))
  draw.polygon(points, fill=color, outline=(20, 20, 20))
  return img
