"""Greedy evaluation on held-out prompts: accuracy, response length, both per difficulty when the
source knows it, and the Spearman correlation of length with difficulty (what AdaCS should raise)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ares_jax import sampling
from ares_jax.adacs.report import spearman
from ares_jax.data.grading import Grader
from ares_jax.data.pipeline import PromptStream
from ares_jax.train.sequences import prompt_batch


def evaluate(mcfg, params, stream: PromptStream, grader: Grader, tokenizer, sc: sampling.SamplingConfig,
             n: int, key) -> dict[str, float]:
  """`eval/accuracy`, `eval/length`, and per difficulty d `eval/accuracy_d{d}`, `eval/length_d{d}`, plus
  `eval/spearman_length_vs_difficulty`, on the first `n` prompts of `stream`."""
  exs, _ = stream.take(0, n)
  greedy = dataclasses.replace(sc, n=1, temperature=0.0, max_branches=0)
  r = sampling.generate(mcfg, params, prompt_batch([e.prompt for e in exs], sc.pad_id), greedy, key)
  texts = tokenizer.batch_decode([r.response(s).tolist() for s in range(len(exs))], skip_special_tokens=True)
  acc = grader.grade(texts, [e.answer for e in exs]).accuracy
  length = r.length[:len(exs)].astype(np.float64)
  out = {"eval/accuracy": float(acc.mean()), "eval/length": float(length.mean())}
  if any(e.difficulty is None for e in exs):
    return out
  diff = np.array([e.difficulty for e in exs])
  for d in np.unique(diff):
    out[f"eval/accuracy_d{d}"] = float(acc[diff == d].mean())
    out[f"eval/length_d{d}"] = float(length[diff == d].mean())
  out["eval/spearman_length_vs_difficulty"] = spearman(length, diff)
  return out
