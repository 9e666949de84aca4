"""Benchmark runs: a policy answers every item of `name=path` benchmarks (any layout `data.reader` reads:
JSONL, parquet, VLMEvalKit TSV), the judge scores the answers, and the records and reports are written;
or, with no model at all, the records of an earlier run are judged again (`rescore`).

Decisions, documented for users:
- Multiple-choice items (option columns A..H) show their options after the question, one per line as
  "A. text" under "Options:", as VLMEvalKit's prompts do; the prompt template (system turn, instruction)
  is the run's own, the same as in training.
- `group_by` (config `eval.group_by`, a string): "" = no groups; "qid" = every benchmark whose rows carry a
  `qid` value is scored by its worst case over qid groups; "dynamath=qid,mathverse=pid" = per benchmark (a
  bare column and name=column entries may be mixed; a name=column entry wins for its benchmark). A row
  without a value of the column stands alone. A benchmark is read so that its group column stays one of
  the row's extra columns even when the reader would take it as the row id or source (e.g. `qid`).
- WeMath's four-dimensional scores (strict and loose, scores.py) are added to any benchmark whose rows
  carry its `ID` and `key` columns; `accuracy` stays the item (or group) accuracy.
- Items the reader or the prompt stream cannot use are not scored and are counted in the report's
  `skipped`, by reason (they are not silently counted as right or wrong).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from ares_jax import sampling, sharding, storage
from ares_jax.data import reader as reader_lib
from ares_jax.data.batching import prompt_batch
from ares_jax.data.grading import Grader
from ares_jax.data.prompts import PromptStream, RowSource
from ares_jax.data.reader import Row
from ares_jax.evaluation import judge as judge_lib
from ares_jax.evaluation import reports, scores
from ares_jax.evaluation.specs import group_column, parse_specs


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One benchmark: its report name, the file or folder it is read from, and its rows."""

  name: str
  path: str
  rows: tuple[Row, ...]
  skipped: Mapping[str, int]  # rows the reader could not use, by reason


@dataclasses.dataclass(frozen=True)
class Settings:
  """How benchmarks are run: `samples` per item at `sc.temperature` (0: one greedy answer), `max_items`
  per benchmark (0: all), `batch_prompts` prompts encoded and sampled per `generate` call (bounds the
  host memory of decoded images), `group_by` as in the module docstring; larger images than
  `max_image_pixels` are skipped as decompression bombs."""

  samples: int = 0
  max_items: int = 0
  batch_prompts: int = 64
  group_by: str = ""
  max_image_pixels: int = 89_478_485


def lookup(extra: Mapping[str, Any], fields: Mapping[str, Any], column: str) -> Any:
  """The value of `column` for a row: its extra columns, else its `category` (the one named column the
  reader keeps as a field only). None when absent."""
  if extra.get(column) is not None:
    return extra[column]
  return fields.get(column) if column == "category" else None


def keeping(columns: reader_lib.Columns, column: str | None) -> reader_lib.Columns:
  """`columns` that leave `column` among a row's extra columns: not taken as its id or source."""
  if column is None:
    return columns
  return dataclasses.replace(columns, id=tuple(c for c in columns.id if c != column),
                             source=tuple(c for c in columns.source if c != column))


def groups_of(pairs: Sequence[tuple[Mapping, Mapping]], column: str | None, explicit: bool,
              name: str) -> list[Any] | None:
  """The group value of every (extra, fields) pair, or None when the benchmark is not grouped: no column,
  or a generic column that none of its rows carries. An explicit column no row carries is an error."""
  if column is None:
    return None
  values = [lookup(extra, fields, column) for extra, fields in pairs]
  if all(v is None for v in values):
    if explicit:
      raise ValueError(f"config.eval.group_by names column {column!r} for {name}, but no row of it has one")
    return None
  return [None if v is None else str(v) for v in values]


def load(specs: Sequence[str], columns: reader_lib.Columns = reader_lib.Columns(),
         image_root: str | None = None, max_items: int = 0, group_by: str = "") -> list[Benchmark]:
  """The rows of every benchmark (text and image references only), the first `max_items` when > 0; a
  benchmark's group column (`group_by`) is kept among its rows' extra columns."""
  out = []
  for name, path in parse_specs(specs):
    skipped: collections.Counter = collections.Counter()
    cols = keeping(columns, group_column(group_by, name)[0])
    rows = reader_lib.read_rows(path, columns=cols, image_root=image_root, skipped=skipped)
    if max_items > 0:
      rows = rows[:max_items]
    if not rows:
      raise ValueError(f"benchmark {name} ({path}) has no usable row (skipped: {dict(skipped)})")
    out.append(Benchmark(name, path, tuple(rows), dict(skipped)))
  return out


def _index(value: Any, item: int) -> Any:
  """The benchmark's own index (an integer when it is one: TSV cells are text), else the item's position."""
  if value is None:
    return item
  text = str(value).strip()
  return int(text) if text.lstrip("-").isdigit() else value


def with_options(row: Row) -> Row:
  """The row whose question lists its options (multiple choice), as the model is asked it."""
  if not row.options:
    return row
  listed = "\n".join(f"{k}. {v}" for k, v in row.options.items())
  if row.question.endswith(f"\nOptions:\n{listed}"):  # listed already (Video-R1 rows, data/video_r1.py)
    return row
  return dataclasses.replace(row, question=f"{row.question}\nOptions:\n{listed}")


def answer(mcfg, params, bench: Benchmark, processor, template, tokenizer, sc: sampling.SamplingConfig,
           key: jax.Array, *, settings: Settings, max_prompt_length: int) -> tuple[list[dict], collections.Counter]:
  """One record per item and sample (see `reports.ROW_FIELDS`), unjudged, and the prompts skipped by
  reason. Every process runs it (generation is collective) and gets the same records."""
  decode = dataclasses.replace(sc, n=max(settings.samples, 1), max_branches=0, track_entropy=False,
                               temperature=sc.temperature if settings.samples > 0 else 0.0)
  skipped: collections.Counter = collections.Counter()
  records = []
  starts = range(0, len(bench.rows), settings.batch_prompts)
  for b, start in enumerate(tqdm(starts, desc=f"eval {bench.name}", unit="batch", leave=False)):
    rows = bench.rows[start:start + settings.batch_prompts]
    stream = PromptStream(RowSource([with_options(r) for r in rows]), processor, template, max_prompt_length,
                          settings.max_image_pixels)
    exs = stream.first(len(rows))
    skipped.update(stream.skipped)
    if not exs:
      continue
    r = sampling.generate(mcfg, params, prompt_batch([e.prompt for e in exs], decode.pad_id), decode,
                          jax.random.fold_in(key, b))
    slots, texts = r.texts(tokenizer)
    for slot, text in zip(slots, texts):
      local = exs[r.prompt_index[slot]].index  # the row's place in this batch
      row, item = rows[local], start + local
      records.append({
          "index": _index(row.index, item), "question": row.question, "answer": row.answer,
          "options": dict(row.options), "prediction": text, "extracted": None, "correct": None,
          "tokens": int(r.length[slot]), "group": None, "item": item, "sample": int(slot % decode.n),
          "id": row.id, "source": row.source, "category": row.category, "extra": dict(row.extra)})
  return records, skipped


def judge(records: list[dict], grader: Grader, bench_name: str, group_by: str) -> list[dict]:
  """`records` with `extracted`, `correct` and `group` (re)computed: the judge runs in `grader`'s pool
  (which must be built with `fn=judge.judge`), the extraction here."""
  correct = np.zeros(len(records), bool)
  if records:
    grades = grader.grade([r["prediction"] for r in records], [r["answer"] for r in records],
                          extra=[(r["options"],) for r in records], desc=f"judge {bench_name}")
    if grades.timeouts or grades.errors:
      logging.warning("%s: %d judge timeouts and %d errors (scored wrong)", bench_name, grades.timeouts,
                      grades.errors)
    correct = grades.accuracy > 0.5
  column, explicit = group_column(group_by, bench_name)
  groups = groups_of([(r.get("extra") or {}, r) for r in records], column, explicit, bench_name)
  out = []
  for k, r in enumerate(records):
    out.append(dict(r, extracted=judge_lib.extract(r["prediction"], r["options"]),
                    correct=bool(correct[k]), group=None if groups is None else groups[k]))
  return out


def summary(records: Sequence[dict], group_by: str, name: str, skipped: Mapping[str, int]) -> dict[str, Any]:
  """The report entry of one judged benchmark (`scores.summarize`), with its group column and skips."""
  column, _ = group_column(group_by, name)
  grouped = column is not None and any(r["group"] is not None for r in records)
  out = scores.summarize(records, grouped)
  if grouped:
    out["group_by"] = column
  out["skipped"] = dict(skipped)
  return out


def evaluate(mcfg, params, benches: Sequence[Benchmark], processor, template, tokenizer,
             sc: sampling.SamplingConfig, *, key: jax.Array, grader: Grader, settings: Settings,
             max_prompt_length: int, out_dir: str | None = None) -> dict[str, dict[str, Any]]:
  """Every benchmark answered, judged and summarised: {name: report entry}. With `out_dir`, process 0
  writes `<name>.jsonl` per benchmark and the reports there."""
  report = {}
  for k, bench in enumerate(tqdm(benches, desc="benchmarks", unit="benchmark")):
    records, skipped = answer(mcfg, params, bench, processor, template, tokenizer, sc,
                              jax.random.fold_in(key, k), settings=settings, max_prompt_length=max_prompt_length)
    records = judge(records, grader, bench.name, settings.group_by)
    report[bench.name] = summary(records, settings.group_by, bench.name,
                                 collections.Counter(bench.skipped) + skipped)
    if out_dir is not None and sharding.is_primary():
      storage.makedirs(out_dir)
      reports.write_records(os.path.join(out_dir, f"{bench.name}.jsonl"), records)
  if out_dir is not None and sharding.is_primary():
    reports.write_reports(out_dir, report)
  return report


def rescore(out_dir: str, names: Sequence[str], grader: Grader, group_by: str) -> dict[str, dict[str, Any]]:
  """Judges the `prediction` of every record in `out_dir/<name>.jsonl` again (no model), rewriting
  `extracted`, `correct`, `group` and the reports. `names` empty: every `*.jsonl` in `out_dir`."""
  if not names:
    names = sorted(f[:-len(".jsonl")] for f in storage.listdir(out_dir) if f.endswith(".jsonl"))
  if not names:
    raise ValueError(f"eval.rescore: no <name>.jsonl files in {out_dir}")
  previous = {}
  path = os.path.join(out_dir, "report.json")
  if storage.exists(path):
    previous = reports.read_json(path)
  report = {}
  for name in tqdm(names, desc="rescore", unit="benchmark"):
    records = judge(reports.read_records(os.path.join(out_dir, f"{name}.jsonl")), grader, name, group_by)
    report[name] = summary(records, group_by, name, previous.get(name, {}).get("skipped", {}))
    if sharding.is_primary():
      reports.write_records(os.path.join(out_dir, f"{name}.jsonl"), records)
  if sharding.is_primary():
    reports.write_reports(out_dir, report)
  return report
