"""How `config.eval.benchmarks` and `config.eval.group_by` name benchmarks and their group columns.

Plain text handling, no JAX: the startup check of a run's inputs (stages/inputs.py) reads them before any
device starts, and benchmarks.py runs what they name (its docstring describes `group_by`).
"""

from __future__ import annotations

import os
import re
from typing import Sequence

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def parse_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
  """`("mathverse=/data/MathVerse.tsv", ...)` -> [(name, path)]; names are file names of the reports."""
  out, seen = [], set()
  for spec in specs:
    name, sep, path = str(spec).partition("=")
    name, path = name.strip(), path.strip()
    if not sep or not path or not _NAME.fullmatch(name):
      raise ValueError(f"config.eval.benchmarks entry {spec!r}: expected NAME=PATH with NAME of letters, digits, "
                       "'_', '.', '+', '-'")
    if name in seen:
      raise ValueError(f"config.eval.benchmarks names {name!r} twice")
    seen.add(name)
    out.append((name, os.path.expanduser(path)))
  return out


def group_column(group_by: str, name: str) -> tuple[str | None, bool]:
  """(column, explicit) for benchmark `name` under `group_by` (see benchmarks.py's docstring); explicit when a
  `name=column` entry names this benchmark."""
  generic = None
  for entry in filter(None, (e.strip() for e in group_by.split(","))):
    bench, sep, column = entry.partition("=")
    if not sep:
      generic = bench
    elif bench.strip() == name:
      return column.strip(), True
  return generic, False
