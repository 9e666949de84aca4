"""Stage `inspect`: build the mesh and the model from a config, show what was built, run one forward.

It is the first thing to run on a new machine or checkpoint: it exercises the whole path a training
stage depends on (mesh, logical-axis shardings, checkpoint import or sharded random init, tokenizer,
image processor, M-RoPE positions, the jitted forward) and prints what a person needs to check it:
parameter counts, the mesh, every parameter's shape/dtype/PartitionSpec, and the model's top next
tokens for a prompt with a procedurally drawn image.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from flax import linen as nn
from flax import traverse_util

from ares_jax import models, sharding
from ares_jax import settings as settings_lib
from ares_jax.data import images as images_lib
from ares_jax.data import processor as processor_lib
from ares_jax.stages.setup import build_mesh, build_params, build_processor, build_tokenizer, check_tokenizer


def _say(text: str = "") -> None:
  """Prints on the first process only: every host runs the stage, one report is enough."""
  if sharding.is_primary():
    print(text, flush=True)


def param_table(boxed: Any, mesh: jax.sharding.Mesh) -> list[tuple[str, tuple[int, ...], str, str]]:
  """(path, shape, dtype, PartitionSpec) per parameter, from abstract boxed parameters."""
  specs = traverse_util.flatten_dict(sharding.param_shardings(boxed, mesh), sep="/")
  leaves = traverse_util.flatten_dict(nn.unbox(boxed), sep="/")
  return [(path, tuple(leaf.shape), jnp.dtype(leaf.dtype).name, str(specs[path].spec))
          for path, leaf in sorted(leaves.items())]


def param_counts(table: list[tuple[str, tuple[int, ...], str, str]]) -> dict[str, int]:
  """Total, text (embeddings, decoder, LM head) and vision-tower parameter counts."""
  vision = sum(int(np.prod(shape)) for path, shape, _, _ in table if path.startswith("visual/"))
  total = sum(int(np.prod(shape)) for _, shape, _, _ in table)
  return {"total": total, "text": total - vision, "vision": vision}


def format_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
  widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
  line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
  return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def sample_batch(config: ml_collections.ConfigDict, proc: processor_lib.QwenVLProcessor,
                 rows: int) -> dict[str, np.ndarray]:
  """`rows` prompts, alternating the configured prompt with a drawn image and a text-only one.

  Two kinds of row exercise left padding and image-token placement in one batch; the row count is
  a multiple of the batch-sharding axes so the batch dimension splits evenly over the mesh.
  """
  h, w = config.inspect.image_size
  questions, imgs = [], []
  for i in range(rows):
    if i % 2 == 0:
      questions.append(config.inspect.prompt)
      imgs.append(images_lib.draw_polygon_image(h, w, sides=3 + (i // 2) % 4, seed=config.seed + i))
    else:
      questions.append("What is 12 + 7? Put the answer in \\boxed{}.")
      imgs.append(None)
  return proc.encode_chat(questions, imgs)


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on every host (multi-process meshes hold only local shards per host)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.sharding.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _token_text(tok: Any, i: int) -> str:
  """The decoded token, or its raw byte-level form when it is a fragment of a UTF-8 character."""
  text = tok.decode([i])
  return tok.convert_ids_to_tokens(i) if "\ufffd" in text else text


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs the stage; returns a summary (counts, shapes, top tokens) for tests and notebooks."""
  t0 = time.time()
  mesh = build_mesh(config)
  mcfg = settings_lib.model(config.model)
  _say(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.process_count()} process(es))")
  _say(f"mesh: {dict(mesh.shape)}")

  boxed = models.abstract_params(mcfg)
  table = param_table(boxed, mesh)
  counts = param_counts(table)
  _say(format_table([(p, str(s), d, spec) for p, s, d, spec in table], ("parameter", "shape", "dtype", "spec")))
  _say(f"parameters: total {counts['total']:,}  text {counts['text']:,}  vision {counts['vision']:,}")
  summary: dict[str, Any] = {"mesh": dict(mesh.shape), "counts": counts, "table": table}
  if not config.inspect.forward:
    return summary

  tok = build_tokenizer(config)
  check_tokenizer(tok, mcfg)
  mcfg, params = build_params(config, mcfg, boxed, mesh)
  jax.block_until_ready(params)
  logging.info("parameters ready after %.1fs", time.time() - t0)

  proc = build_processor(config, tok, mcfg)
  batch_axes = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = 2 * batch_axes // np.gcd(2, batch_axes)  # a multiple of both 2 (the two prompt kinds) and batch_axes
  batch = sample_batch(config, proc, rows)
  t1 = time.time()
  logits = models.forward(mcfg, params, batch["input_ids"], batch["attention_mask"],
                          batch["pixel_values"], batch["image_grid_thw"])
  # Only the last position comes to the host (the full [B, T, V] is ~1 GB for 7B on a real prompt).
  last = _to_host(logits[:, -1])  # left padding: the last column is every row's last prompt token
  finite = bool(_to_host(jnp.isfinite(logits).all()))
  logging.info("forward (with compilation) took %.1fs", time.time() - t1)

  probs = np.exp(last - last.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  k = int(config.inspect.top_k)
  top = np.argsort(-last, axis=-1)[:, :k]
  _say(f"input_ids {batch['input_ids'].shape}  pixel_values {batch['pixel_values'].shape}  "
       f"image_grid_thw {batch['image_grid_thw'].tolist()}")
  _say(f"logits: shape {logits.shape} dtype {logits.dtype}  finite {finite}")
  decoded = []
  for row in range(min(2, rows)):
    words = [(_token_text(tok, int(i)), float(probs[row, i])) for i in top[row]]
    decoded.append(words)
    kind = "image prompt" if row % 2 == 0 else "text prompt"
    _say(f"top-{k} next tokens ({kind}): " + ", ".join(f"{w!r} {p:.3f}" for w, p in words))
  _say(f"inspect finished in {time.time() - t0:.1f}s")
  summary.update(logits_shape=tuple(logits.shape), finite=finite, top_tokens=decoded, batch_shape=batch["input_ids"].shape)
  return summary
