"""Stage `inspect`: build the mesh and the model from a config, show what was built, run one forward.

It is the first thing to run on a new machine or checkpoint: it exercises the whole path a training
stage depends on (mesh, logical-axis shardings, checkpoint import or sharded random init, tokenizer,
image processor, M-RoPE positions, the jitted forward) and prints what a person needs to check it:
parameter counts, the mesh, every parameter's shape/dtype/PartitionSpec, a video prompt's token layout, and
the model's top next tokens for a prompt with a procedurally drawn image, a text prompt and a video prompt
(a drawn clip, `data/motion.py`).
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
from ares_jax.data import motion
from ares_jax.data import video as video_lib
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


KINDS = ("image prompt", "text prompt", "video prompt")


def sample_batch(config: ml_collections.ConfigDict, proc: processor_lib.QwenVLProcessor,
                 rows: int) -> dict[str, np.ndarray]:
  """`rows` prompts, cycling over the configured prompt with a drawn image, a text-only one and a question
  about a drawn clip (`data.motion`, decoded as a video row's frames are: `settings.video`).

  Three kinds of row exercise left padding and image- and video-token placement in one batch; the row
  count is a multiple of the batch-sharding axes so the batch dimension splits evenly over the mesh.
  """
  h, w = config.inspect.image_size
  texts, imgs, clips = [], [], []
  for i in range(rows):
    kind = KINDS[i % len(KINDS)]
    if kind == "image prompt":
      texts.append(proc.chat_prompt(config.inspect.prompt, 1))
      imgs.append(images_lib.draw_polygon_image(h, w, sides=3 + (i // 3) % 4, seed=config.seed + i))
    elif kind == "text prompt":
      texts.append(proc.chat_prompt("What is 12 + 7? Put the answer in \\boxed{}."))
    else:
      frames = motion.frames(config.seed, i, n_frames=8, height=h, width=w, task="fade")
      clips.append(video_lib.load_clip(list(frames), settings_lib.video(config)))
      texts.append(proc.chat_prompt(motion.TASKS["fade"].question.replace(motion.PLACEHOLDER, ""), num_videos=1))
  return proc(texts, imgs or None, clips or None)


def token_layout(ids: np.ndarray, mcfg: models.ModelConfig, tok: Any, batch: dict[str, np.ndarray],
                 video: int = 0) -> str:
  """One prompt's tokens as runs: text (decoded, shortened), and each vision run with its grid, e.g.
  `<|video_pad|> x 16 (video 0: grid t=2 h=4 w=4, 2.0 s per temporal patch)`."""
  names = {mcfg.image_token_id: "image", mcfg.video_token_id: "video"}
  grids = {"image": batch.get("image_grid_thw"), "video": batch.get("video_grid_thw")}
  seen = {"image": 0, "video": video}
  parts, i = [], 0
  while i < len(ids):
    j = i + 1
    kind = names.get(int(ids[i]))
    while j < len(ids) and (names.get(int(ids[j])) == kind if kind else int(ids[j]) not in names):
      j += 1
    if kind:
      t, gh, gw = (int(v) for v in grids[kind][seen[kind]])
      extra = ""
      if kind == "video" and batch.get("second_per_grid_ts") is not None:
        extra = f", {float(batch['second_per_grid_ts'][seen[kind]]):g} s per temporal patch"
      parts.append(f"{tok.decode([int(ids[i])])} x {j - i} ({kind} {seen[kind]}: grid t={t} h={gh} w={gw}{extra})")
      seen[kind] += 1
    else:
      text = tok.decode([int(v) for v in ids[i:j]])
      parts.append(repr(text if len(text) <= 60 else text[:28] + " ... " + text[-28:]))
    i = j
  return "\n".join("  " + p for p in parts)


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
  rows = len(KINDS) * batch_axes // np.gcd(len(KINDS), batch_axes)  # a multiple of the kinds and batch_axes
  batch = sample_batch(config, proc, rows)
  video_row = KINDS.index("video prompt")
  _say("a video prompt's tokens:\n" + token_layout(batch["input_ids"][video_row][batch["attention_mask"][video_row] > 0],
                                                   mcfg, tok, batch))
  t1 = time.time()
  logits = models.forward(mcfg, params, batch["input_ids"], batch["attention_mask"],
                          **{k: batch[k] for k in models.MEDIA_KEYS if k in batch})
  # Only the last position comes to the host (the full [B, T, V] is ~1 GB for 7B on a real prompt).
  last = _to_host(logits[:, -1])  # left padding: the last column is every row's last prompt token
  finite = bool(_to_host(jnp.isfinite(logits).all()))
  logging.info("forward (with compilation) took %.1fs", time.time() - t1)

  probs = np.exp(last - last.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  k = int(config.inspect.top_k)
  top = np.argsort(-last, axis=-1)[:, :k]
  _say(f"input_ids {batch['input_ids'].shape}  pixel_values {batch['pixel_values'].shape}  "
       f"image_grid_thw {batch['image_grid_thw'].tolist()}  pixel_values_videos {batch['pixel_values_videos'].shape}  "
       f"video_grid_thw {batch['video_grid_thw'].tolist()}")
  _say(f"logits: shape {logits.shape} dtype {logits.dtype}  finite {finite}")
  decoded = []
  for row in range(min(len(KINDS), rows)):
    words = [(_token_text(tok, int(i)), float(probs[row, i])) for i in top[row]]
    decoded.append(words)
    kind = KINDS[row]
    _say(f"top-{k} next tokens ({kind}): " + ", ".join(f"{w!r} {p:.3f}" for w, p in words))
  _say(f"inspect finished in {time.time() - t0:.1f}s")
  summary.update(logits_shape=tuple(logits.shape), finite=finite, top_tokens=decoded, batch_shape=batch["input_ids"].shape)
  return summary
