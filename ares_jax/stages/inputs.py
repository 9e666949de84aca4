"""The files a stage will read, checked before anything heavy: every data, pool and benchmark file the config
names is opened, its first rows are read as the reader reads them (`reader.head`: the layout its extension
says, which column each field comes from) and the columns its use needs are looked for. A wrong file or
column then costs a second at startup, not a model load; each input gets one line, fine or not.

What each stage reads: `aepo`, `adacs` and `ares` their prompts (`data.paths` and `data.eval_paths`, or
`data.tfds_dir`), `adacs` and `ares` the cold-start pool (`adacs.pool_paths`), `aepo`, `ares` and `eval`
the benchmarks of `eval.benchmarks`; `eval` without benchmarks the held-out prompts, and with
`eval.rescore` nothing but its own earlier records. Imports nothing heavy: `ares_jax.main` runs it before
JAX starts.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from ares_jax.data import reader, tfds_source
from ares_jax.evaluation import specs

HEAD_ROWS = 16  # rows read per file: enough to see its columns, few enough to be instant on any file
PROMPT_FIELDS = ("question", "answer")
POOL_FIELDS = ("question", "answer", "response")  # AdaCS chooses among teacher responses


@dataclasses.dataclass(frozen=True)
class Input:
  """One file or folder a stage reads, and what its rows must hold."""

  label: str  # how lines name it: "data", "held-out data", "AdaCS pool", "benchmark mathverse"
  field: str  # the config field that names it
  path: str
  needs: tuple[str, ...] = PROMPT_FIELDS  # `reader.Columns` fields every row needs
  group_column: str | None = None  # a benchmark's own `eval.group_by` column (name=column): it must exist


def inputs(config: ml_collections.ConfigDict) -> list[Input]:
  """The data, pool and benchmark files and folders the stage of `config` reads (`data.tfds_dir` apart)."""
  stage, d, e = config.stage, config.data, config.eval
  rescoring = stage == "eval" and bool(e.get("rescore"))
  benchmarks = list(e.get("benchmarks") or ()) if stage in ("aepo", "ares", "eval") and not rescoring else []
  out = []
  if reads_prompts(config) and d.kind == "files":
    out += [Input("data", "data.paths", str(p)) for p in d.paths]
    out += [Input("held-out data", "data.eval_paths", str(p)) for p in d.eval_paths]
  if stage in ("adacs", "ares"):
    out += [Input("AdaCS pool", "adacs.pool_paths", str(p), POOL_FIELDS) for p in config.adacs.pool_paths]
  for name, path in specs.parse_specs(benchmarks):
    column, explicit = specs.group_column(e.get("group_by", ""), name)
    out.append(Input(f"benchmark {name}", "eval.benchmarks", path, group_column=column if explicit else None))
  return out


def reads_prompts(config: ml_collections.ConfigDict) -> bool:
  """Whether the stage reads prompts of `config.data` (training or held-out)."""
  e = config.eval
  return config.stage in ("aepo", "adacs", "ares") or (
      config.stage == "eval" and not e.get("rescore") and not e.get("benchmarks"))


def check(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(one line per input that is fine, one line per problem), every input looked at."""
  try:
    columns = reader.Columns.with_overrides(**dict(config.data.columns))
    todo = inputs(config)
  except ValueError as e:  # an unknown config.data.columns field, a malformed eval.benchmarks entry
    return [], [str(e)]
  fine, problems = [], []
  if reads_prompts(config) and config.data.kind == "tfds":
    try:
      fine.append(check_tfds(config.data.tfds_dir))
    except (OSError, ValueError) as e:
      problems.append(str(e))
  for item in todo:
    try:
      fine.append(check_input(item, columns))
    except (OSError, ValueError) as e:  # missing, unreadable, or without the columns its use needs
      problems.append(f"config.{item.field}: {item.label} ({item.path}): {e}")
  return fine, problems


def check_input(item: Input, columns: reader.Columns) -> str:
  """The line for an input whose files are usable; raises ValueError (or OSError) saying what is wrong."""
  files = reader.data_files(item.path)
  heads = [reader.head(f, columns, HEAD_ROWS, need_response="response" in item.needs) for f in files]
  for h in heads:
    where = "" if h.path == os.path.expanduser(item.path) else f"{h.path}: "
    if not h.rows:
      raise ValueError(f"{where}{h.layout} without rows")
    missing = [f for f in item.needs if f not in h.fields]
    if missing:
      tried = ", ".join(getattr(columns, missing[0]))
      raise ValueError(f"{where}{h.layout} without {'an' if missing[0][0] in 'aeiou' else 'a'} {missing[0]} column "
                       f"(looked for: {tried}; --config.data.columns.{missing[0]}=NAME names another); "
                       f"its columns: {_listed(h.columns)}")
    if not h.usable:
      reasons = ", ".join(f"{k} {v}" for k, v in sorted(h.skipped.items()))
      raise ValueError(f"{where}none of its first {h.rows} rows is usable (skipped: {reasons})")
  if item.group_column and not any(item.group_column in h.columns for h in heads):
    raise ValueError(f"config.eval.group_by names column {item.group_column!r}, which it does not have; its "
                     f"columns: {_listed(heads[0].columns)}")
  layouts = sorted({h.layout for h in heads})
  single = files == [os.path.expanduser(item.path)]
  how = layouts[0] if single else f"{len(heads)} file{'s' * (len(heads) > 1)} ({', '.join(layouts)})"
  fields = ", ".join(f"{k}: {v}" for k, v in heads[0].fields.items() if k in (*item.needs, "image", "options"))
  return f"{item.label}: {item.path}, {how}, columns ok ({fields})"


def check_tfds(tfds_dir: str) -> str:
  """The line for a dataset folder written by `ares_jax.data.build` that has a training split."""
  path = tfds_source.resolve(tfds_dir)
  with open(os.path.join(path, "dataset_info.json")) as f:
    splits = [s.get("name") for s in json.load(f).get("splits", ())]
  if tfds_source.TRAIN not in splits:
    raise ValueError(f"config.data.tfds_dir={tfds_dir!r}: the dataset at {path} has no {tfds_source.TRAIN!r} split "
                     f"(splits: {splits})")
  return f"data: {path}, TFDS dataset, splits: {', '.join(splits)}"


def _listed(names: tuple[str, ...], most: int = 12) -> str:
  if not names:
    return "none"
  return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")
