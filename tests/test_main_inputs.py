"""The entry point before anything heavy: every input file checked at startup (its first rows, layout and
columns), config and input errors as one line with exit code 2 and no workdir, and `--help` (CPU, seconds)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data_layouts
from ares_jax.data import reader
from ares_jax.stages import inputs
from tiny_configs import load_config

ROOT = Path(__file__).resolve().parents[1]

# Runs the entry point in a fresh process, then says which heavy modules it imported: none means that no
# model, tokenizer or checkpoint can have been loaded (they all need JAX and stages/setup.py).
_PROBE = """
import sys
from ares_jax import main
sys.argv[0] = "ares_jax.main"
try:
  main.cli()
finally:
  print("imported:", sorted(m for m in ("jax", "ares_jax.stages.setup", "ares_jax.models") if m in sys.modules))
"""


def _main(*args: str, probe: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  head = ["-c", _PROBE] if probe else ["-m", "ares_jax.main"]
  return subprocess.run([sys.executable, *head, "--config=configs/tiny.py", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _tsv(path: Path, rows: list[dict]) -> Path:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
    w.writeheader()
    w.writerows(rows)
  return path


def _one_fatal_line(r: subprocess.CompletedProcess) -> str:
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  [line] = r.stderr.strip().splitlines()  # no config dump, no usage text, nothing else
  assert line.startswith("FATAL: ")
  return line


def test_a_benchmark_without_an_answer_column_stops_before_anything_heavy(tmp_path):
  noans = _tsv(tmp_path / "noans.tsv", [{"index": i, "question": f"What is {i}+1?", "A": str(i + 1), "B": "0"}
                                        for i in range(4)])
  workdir = tmp_path / "run"
  r = _main("--config.stage=eval", f"--config.eval.benchmarks=('noans={noans}',)", f"--config.workdir={workdir}",
            probe=True)
  line = _one_fatal_line(r)
  assert line.startswith(f"FATAL: config.eval.benchmarks: benchmark noans ({noans}): VLMEvalKit TSV without an "
                         "answer column (looked for: answer, solution;"), line
  assert "its columns: index, question, A, B" in line
  assert "imported: []" in r.stdout  # no JAX, no stage setup: no model, tokenizer or checkpoint was loaded
  assert not workdir.exists()


def test_a_missing_benchmark_path_is_one_line_at_once(tmp_path):
  workdir = tmp_path / "run"
  r = _main("--config.stage=eval", f"--config.eval.benchmarks=('gone={tmp_path}/gone.tsv',)",
            f"--config.workdir={workdir}", probe=True)
  assert _one_fatal_line(r) == f"FATAL: config.eval.benchmarks: '{tmp_path}/gone.tsv' (gone) does not exist"
  assert "imported: []" in r.stdout and not workdir.exists()


@pytest.mark.parametrize("override, message", [
    ("--config.mesh.fsdpp=2", "FATAL: --config.mesh.fsdpp=2: config.mesh has no field 'fsdpp' (Did you mean \"fsdp\""),
    ("--config.total_steps=ten", "FATAL: flag --config.total_steps=ten: invalid literal for int()"),
    ("--config.rollout.top_p=2.0", "FATAL: config.rollout.top_p=2.0: expected a value in (0, 1]"),
])
def test_config_errors_exit_2_with_one_line_and_no_workdir(tmp_path, override, message):
  workdir = tmp_path / "run"
  r = _main(override, f"--config.workdir={workdir}")
  assert _one_fatal_line(r).startswith(message)
  assert not workdir.exists()


def test_a_missing_config_file_is_one_line():
  r = subprocess.run([sys.executable, "-m", "ares_jax.main", "--config=configs/nope.py"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert _one_fatal_line(r) == "FATAL: --config=configs/nope.py: no such file (--help lists the configs)"


def test_a_mesh_larger_than_the_devices_leaves_no_workdir_and_no_config_dump(tmp_path):
  """The mesh is built after JAX starts; the workdir only once mesh, tokenizer and parameters are built."""
  workdir = tmp_path / "run"
  r = _main("--config.stage=eval", "--config.mesh.fsdp=64", f"--config.workdir={workdir}", timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  fatal = [line for line in r.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and fatal[0].startswith("FATAL: config.mesh: data*fsdp*tensor = 64 but 1 devices")
  assert "max_response_length" not in r.stderr  # the config is not dumped (it is with --verbose)
  assert not workdir.exists()


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_exits_0_and_lists_every_stage_and_config(flag):
  from ares_jax import main

  r = subprocess.run([sys.executable, "-m", "ares_jax.main", flag], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  lines = r.stdout.splitlines()
  for stage in main.STAGES:
    [line] = [x for x in lines if x.split()[:1] == [stage]]
    assert len(line.split()) > 3  # the stage's own one-line description
  for path in sorted((ROOT / "configs").glob("*.py")):
    [line] = [x for x in lines if x.split()[:1] == [f"configs/{path.name}"]]
    assert main.summary_line(path) in line and main.summary_line(path)
  assert "--config:" in r.stdout and "--verbose:" in r.stdout


def test_summary_line_is_the_first_sentence_of_the_docstring(tmp_path):
  from ares_jax import main

  f = tmp_path / "c.py"
  f.write_text('"""Stage `x`: does one thing (docs/design.md §5), for\nsmall slices. More text.\n  python -m it\n"""\n')
  assert main.summary_line(f) == "does one thing (docs/design.md §5), for small slices."


# --- the checks themselves (in-process) ------------------------------------------------------------


def _eval_config(*benchmarks: str, group_by: str = ""):
  c = load_config("tiny.py")
  c.stage = "eval"
  c.eval.benchmarks = benchmarks
  c.eval.group_by = group_by
  return c


def test_every_layout_passes_with_one_line_naming_its_columns(tmp_path):
  tsv = data_layouts.vlmevalkit_tsv(tmp_path)
  parquet = data_layouts.easyr1(tmp_path)
  fine, problems = inputs.check(_eval_config(f"mb={tsv}", f"geo={parquet}"))
  assert problems == []
  assert fine == [f"benchmark mb: {tsv}, VLMEvalKit TSV, columns ok (question: question, answer: answer, "
                  "image: image, options: A..D)",
                  f"benchmark geo: {parquet}, parquet, columns ok (question: problem, answer: answer, image: images)"]


def test_a_pool_needs_responses_and_data_folders_are_checked_file_by_file(tmp_path):
  pool = data_layouts.ares_jsonl(tmp_path)
  virl = data_layouts.virl39k(tmp_path)
  c = load_config("tiny.py")
  c.stage = "ares"
  c.data.kind = "files"
  c.data.paths = (str(virl),)
  c.adacs.pool_paths = (str(pool),)
  fine, problems = inputs.check(c)
  assert problems == [] and len(fine) == 2
  assert fine == [f"data: {virl}, 1 file (parquet), columns ok (question: question, answer: answer, image: image)",
                  f"AdaCS pool: {pool}, JSONL, columns ok (question: question, answer: answer, image: image, "
                  "response: response)"]
  c.adacs.pool_paths = (str(virl),)  # prompts, not a pool: no teacher responses
  _, problems = inputs.check(c)
  [msg] = problems
  assert msg.startswith(f"config.adacs.pool_paths: AdaCS pool ({virl}): {virl}/39Krelease.parquet: parquet without a "
                        "response column (looked for: response;")


def test_explicit_group_columns_and_unusable_first_rows_are_named(tmp_path):
  tsv = data_layouts.vlmevalkit_tsv(tmp_path)
  _, problems = inputs.check(_eval_config(f"mb={tsv}", group_by="mb=qid"))
  assert problems == [f"config.eval.benchmarks: benchmark mb ({tsv}): config.eval.group_by names column 'qid', "
                      "which it does not have; its columns: index, image, question, A, B, C, D, answer, category"]
  assert inputs.check(_eval_config(f"mb={tsv}", group_by="qid"))[1] == []  # a generic column may be absent
  empty = _tsv(tmp_path / "empty.tsv", [{"question": "q", "answer": ""}] * 3)
  _, [msg] = inputs.check(_eval_config(f"e={empty}"))
  assert msg.endswith("none of its first 3 rows is usable (skipped: missing_answer 3)")


def test_head_reads_only_the_first_rows(tmp_path):
  jsonl = tmp_path / "big.jsonl"
  good = "".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(20))
  jsonl.write_text(good + "not json\n" * 1000)  # past the first rows: never read
  h = reader.head(str(jsonl), rows=16)
  assert (h.rows, h.usable, h.skipped, h.layout) == (16, 16, {}, "JSONL")
  rows = [{"problem": f"p{i}", "answer": str(i), "images": [{"bytes": data_layouts.png("red"), "path": None}]}
          for i in range(40)]
  data_layouts.write_parquet(tmp_path / "big.parquet", rows, row_group_size=8)
  h = reader.head(str(tmp_path / "big.parquet"), rows=5)
  assert (h.rows, h.usable, h.columns) == (5, 5, ("problem", "answer", "images"))
  assert h.fields == {"question": "problem", "answer": "answer", "image": "images"}


def test_a_tfds_dataset_needs_its_training_split(tmp_path):
  version = tmp_path / "ares_prompts" / "1.0.0"
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text(json.dumps({"splits": [{"name": "eval"}]}))
  c = load_config("tiny.py")
  c.stage = "aepo"
  c.data.kind = "tfds"
  c.data.tfds_dir = str(tmp_path)
  fine, [msg] = inputs.check(c)
  assert fine == [] and msg.startswith(f"config.data.tfds_dir={str(tmp_path)!r}: the dataset at {version} has no "
                                       "'train' split")
  (version / "dataset_info.json").write_text(json.dumps({"splits": [{"name": "train"}, {"name": "eval"}]}))
  assert inputs.check(c) == ([f"data: {version}, TFDS dataset, splits: train, eval"], [])
  c.data.tfds_dir = str(tmp_path / "elsewhere")
  assert inputs.check(c)[1][0].startswith(f"config.data.tfds_dir={tmp_path / 'elsewhere'}: no dataset here")


def test_an_empty_file_is_named(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  _, [msg] = inputs.check(_eval_config(f"e={tmp_path / 'empty.jsonl'}"))
  assert msg == f"config.eval.benchmarks: benchmark e ({tmp_path / 'empty.jsonl'}): JSONL without rows"
