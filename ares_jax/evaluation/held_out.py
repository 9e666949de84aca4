"""Evaluation on the run's own held-out prompts: accuracy, response length, both per difficulty when the
rows know it, and the Spearman correlation of length with difficulty (what AdaCS should raise).

Greedy by default; `samples` > 0 scores that many samples per prompt at the rollout temperature (mean@n),
which is what RL optimises when greedy decoding is already right and sampling is not. The AEPO loop
(every `eval.every` steps), AdaCS (before and after SFT) and the `eval` stage without benchmarks run it.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import stats

from ares_jax import sampling
from ares_jax.data.batching import prompt_batch
from ares_jax.data.grading import Grader
from ares_jax.data.prompts import PromptStream


def spearman(x, y) -> float:
  """Spearman's rank correlation of two sequences (ties averaged); NaN when either is constant or short."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return float(stats.spearmanr(x, y).statistic)


def evaluate(mcfg, params, stream: PromptStream, grader: Grader, tokenizer, sc: sampling.SamplingConfig, *,
             prompts: int, key, samples: int = 0) -> dict[str, float]:
  """`eval/accuracy`, `eval/length`, and per difficulty d `eval/accuracy_d{d}`, `eval/length_d{d}`, plus
  `eval/spearman_length_vs_difficulty`, on the first `prompts` usable prompts of `stream` (fewer if it has
  fewer): greedy, or averaged over `samples` samples per prompt at `sc.temperature`."""
  exs = stream.first(prompts)
  if not exs:
    raise ValueError(f"held-out evaluation: {stream.describe()} has no usable prompt (skipped: "
                     f"{dict(stream.skipped)})")
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
