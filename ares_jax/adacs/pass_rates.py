"""Pass rates p_q of the policy (docs/design.md §6.2): n samples per question, graded with the accuracy reward.

Large pools take hours, so the estimate is resumable: questions go in fixed batches (batch b holds
questions b*B..(b+1)*B-1 of the pool order, sampled with key fold_in(key, b)), and each finished batch is
appended to a JSONL progress file in one write (storage.append_lines: fsync locally, a whole-object rewrite
on `gs://`). A restarted run reads the file, keeps the batches whose every question is there (a last line
cut off by a kill is dropped, and its batch is redone) and samples only the rest, so a resumed estimate
equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from ares_jax import sampling, sharding, storage
from ares_jax.data.grading import Grader
from ares_jax.data.prompts import PromptStream
from ares_jax.models.config import ModelConfig
from ares_jax.data.batching import prompt_batch


def read_progress(path: str) -> dict[str, dict]:
  """id -> record of every complete line of the progress file (none if it does not exist)."""
  return {str(rec["id"]): rec for rec in storage.read_jsonl(path, missing_ok=True)}


def estimate_pass_rates(mcfg: ModelConfig, params: Any, stream: PromptStream, ids: Sequence[str],
                        todo: Sequence[int], tokenizer: Any, grader: Grader, sc: sampling.SamplingConfig, *,
                        key: jax.Array, progress_path: str, batch_size: int) -> dict[str, float | None]:
  """p_q = mean accuracy of `sc.n` samples for the pool rows `todo` (indices into `stream.source`).

  `ids[i]` names row i in the progress file. Returns id -> pass rate, or None for a row the stream
  skipped (unreadable image, prompt over the length limit; counted in `stream.skipped`).
  """
  sc = dataclasses.replace(sc, max_branches=0)
  done = read_progress(progress_path)
  batches = [list(todo[i:i + batch_size]) for i in range(0, len(todo), batch_size)]
  pending = [b for b, rows in enumerate(batches) if any(ids[i] not in done for i in rows)]
  logging.info("pass rates: %d questions in %d batches, %d batches already in %s", len(todo), len(batches),
               len(batches) - len(pending), progress_path)
  primary = sharding.is_primary()  # every process samples (a collective); process 0 writes
  for b in tqdm(pending, desc="pass rates", initial=len(batches) - len(pending), total=len(batches)):
    records = _estimate_batch(mcfg, params, stream, ids, batches[b], tokenizer, grader, sc=sc,
                              key=jax.random.fold_in(key, b))
    if primary:
      storage.append_lines(progress_path, [json.dumps(r) for r in records])
    done.update({r["id"]: r for r in records})
  return {ids[i]: done[ids[i]]["pass_rate"] for i in todo}


def _estimate_batch(mcfg, params, stream: PromptStream, ids, rows: list[int], tokenizer, grader: Grader, *,
                    sc: sampling.SamplingConfig, key) -> list[dict]:
  examples = dict(zip(rows, stream.encode_many(rows)))
  usable = [i for i in rows if examples[i] is not None]
  records = [{"id": ids[i], "pass_rate": None} for i in rows if examples[i] is None]
  if not usable:
    return records
  batch = prompt_batch([examples[i].prompt for i in usable], sc.pad_id)
  r = sampling.generate(mcfg, params, batch, sc, key)
  slots, texts = r.texts(tokenizer)
  of = r.prompt_index[slots]
  acc = grader.grade(texts, [examples[usable[q]].answer for q in of]).accuracy
  per_prompt = np.zeros(len(usable))
  np.add.at(per_prompt, of, acc)
  records += [{"id": ids[i], "pass_rate": float(per_prompt[q] / sc.n)} for q, i in enumerate(usable)]
  return records
