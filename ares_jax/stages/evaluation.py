"""Evaluation on held-out prompts: accuracy, response length, both per difficulty when the source
knows it, and the Spearman correlation of length with difficulty (what AdaCS should raise).
Greedy by default; `samples` > 0 scores that many samples per prompt at the rollout temperature
(mean@n), which is what RL optimises when greedy decoding is already right and sampling is not."""

from __future__ import annotations

import dataclasses

import numpy as np

from ares_jax import sampling
from ares_jax.adacs.report import spearman
from ares_jax.data.grading import Grader
from ares_jax.data.pipeline import PromptStream
from ares_jax.train.sequences import prompt_batch


def evaluate(mcfg, params, stream: PromptStream, grader: Grader, tokenizer, sc: sampling.SamplingConfig,
             n: int, key, samples: int = 0) -> dict[str, float]:
  """`eval/accuracy`, `eval/length`, and per difficulty d `eval/accuracy_d{d}`, `eval/length_d{d}`, plus
  `eval/spearman_length_vs_difficulty`, on the first `n` prompts of `stream`: greedy, or averaged over
  `samples` samples per prompt at `sc.temperature`."""
  exs, _ = stream.take(0, n)
  if samples > 0:
    decode = dataclasses.replace(sc, n=samples, max_branches=0)
  else:
    decode = dataclasses.replace(sc, n=1, temperature=0.0, max_branches=0)
  r = sampling.generate(mcfg, params, prompt_batch([e.prompt for e in exs], sc.pad_id), decode, key)
  slots, texts = r.texts(tokenizer)
  of = r.prompt_index[slots]
  acc = grader.grade(texts, [exs[i].answer for i in of]).accuracy
  length = r.length[slots].astype(np.float64)
  out = {"eval/accuracy": float(acc.mean()), "eval/length": float(length.mean())}
  if any(e.difficulty is None for e in exs):
    return out
  diff = np.array([exs[i].difficulty for i in of])
  for d in np.unique(diff):
    out[f"eval/accuracy_d{d}"] = float(acc[diff == d].mean())
    out[f"eval/length_d{d}"] = float(length[diff == d].mean())
  out["eval/spearman_length_vs_difficulty"] = spearman(length, diff)
  return out
