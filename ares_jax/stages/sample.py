"""Stage `sample`: roll out the policy on a few prompts and show where it is uncertain.

Prompts come from `config.sample.prompts` (with `config.sample.videos`, one video each: a file or a folder
of frames, "" for none) or, when empty, from the synthetic task. A warm-up batch
without branching sets tau_high (docs/design.md §5.2) unless `config.sample.tau_high` is given; the
second batch marks high-window-entropy (HWE) windows and forks there. Each answer is printed with
the HWE window starts marked as `⟦token⟧` and its entropy statistics.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from ares_jax import aepo, sampling
from ares_jax import settings as settings_lib
from ares_jax.data import synthetic
from ares_jax.data import video as video_lib
from ares_jax.stages import setup


def prompts(config: ml_collections.ConfigDict) -> tuple[list[str], list[Any]]:
  """Questions and their images (None for text-only)."""
  s = config.sample
  if s.prompts:
    return list(s.prompts), [None] * len(s.prompts)
  probs = [synthetic.problem(config.seed, i) for i in range(s.num_prompts)]
  imgs = [synthetic.render(p) if s.images and i % 2 == 0 else None for i, p in enumerate(probs)]
  return [p.question for p in probs], imgs


def videos(config: ml_collections.ConfigDict, n_prompts: int) -> list[Any]:
  """`config.sample.videos` decoded (`data.video.load_clip` with the config's processor settings), None where
  a prompt has none; a video that cannot be used stops the stage naming it."""
  paths = list(config.sample.videos)
  if paths and len(paths) != n_prompts:
    raise ValueError(f"config.sample.videos has {len(paths)} entries for {n_prompts} prompts (one each; '' = none)")
  out = []
  for p in paths or [""] * n_prompts:
    try:
      out.append(video_lib.load_clip(p, settings_lib.video(config)) if p else None)
    except video_lib.VideoError as e:
      raise ValueError(f"config.sample.videos: {p}: {e}") from e
  return out


def marked_text(tokenizer: Any, tokens: np.ndarray, hwe: np.ndarray) -> str:
  pieces = []
  for t, (tok, mark) in enumerate(zip(tokens, hwe)):
    text = tokenizer.decode([int(tok)])
    pieces.append(f"⟦{text}⟧" if mark else text)
  return "".join(pieces)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
  t0 = time.time()
  b = setup.build(config)
  mcfg, tok, proc, params = b.mcfg, b.tokenizer, b.processor, b.params
  questions, imgs = prompts(config)
  clips = videos(config, len(questions))
  template = setup.prompt_template(config, tok)  # the prompts RL and evaluation use
  texts = [template.render(q, int(im is not None), int(c is not None)) for q, im, c in zip(questions, imgs, clips)]
  batch = proc(texts, [im for im in imgs if im is not None] or None, [c for c in clips if c is not None] or None)
  key = jax.random.key(config.seed)
  tau = config.sample.tau_high
  if tau is None:
    warm = sampling.generate(mcfg, params, batch, settings_lib.sampling(config, mcfg, b.pad_id), key)
    tau = float(aepo.entropy_threshold(warm.entropy, warm.mask, config.aepo.entropy_quantile))
    print(f"tau_high from a warm-up batch (quantile {config.aepo.entropy_quantile}): {tau:.3f}")
  r = sampling.generate(mcfg, params, batch, settings_lib.sampling(config, mcfg, b.pad_id), jax.random.fold_in(key, 1),
                        tau_high=tau)
  n_he = np.asarray(aepo.hwe_counts(r.window_entropy, r.window_valid, tau))
  rows = []
  for s in np.flatnonzero(r.used):
    n = int(r.length[s])
    kind = "root" if r.parent[s] < 0 else f"branch of {int(r.parent[s])} at {int(r.fork_pos[s])}"
    stats = dict(slot=int(s), prompt=int(r.prompt_index[s]), kind=kind, length=n,
                 mean_entropy=float(r.entropy[s, :n].mean()),
                 max_window_entropy=float(r.window_entropy[s][r.window_valid[s]].max(initial=0.0)),
                 n_he=int(n_he[s]))
    rows.append(stats)
    print(f"\n[prompt {stats['prompt']} slot {s} {kind}] length {n}  mean H {stats['mean_entropy']:.3f}  "
          f"max window H {stats['max_window_entropy']:.3f}  N_HE {stats['n_he']}")
    print("  " + marked_text(tok, r.response(s), r.hwe[s, :n]).replace("\n", "\n  "))
  logging.info("sample stage finished in %.1fs", time.time() - t0)
  return {"tau_high": tau, "answers": rows, "branches": int((r.parent >= 0).sum())}
