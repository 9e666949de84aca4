"""Real-data runs with the tiny model: AEPO on a ViRL39K folder, AdaCS on a parquet pool, real configs that
name no data stop at startup, and two processes that decode their own share of a batch see the batch one
process sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data_layouts as layouts
from processes import free_port, run_together
from ares_jax import config_checks
from ares_jax.data.prompts import PromptStream
from ares_jax.stages import adacs as adacs_stage
from ares_jax.stages import aepo as aepo_stage
from tiny_configs import load_config, small_rl

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_aepo_steps_on_a_virl39k_folder_train_only_on_training_rows(tmp_path, monkeypatch):
  folder = layouts.virl39k(tmp_path)
  c = small_rl(load_config("tiny.py"))
  c.stage, c.workdir, c.total_steps, c.checkpoint_every = "aepo", str(tmp_path / "run"), 2, 2
  c.mesh.fsdp = 1
  c.warm_start.steps = 0
  c.rollout.max_response_length = 16
  c.rollout.max_prompt_length = 600
  c.data.kind, c.data.paths, c.data.eval_fraction = "files", (str(folder),), 0.25
  c.data.system_prompt, c.data.instruction = None, "Please reason step by step."  # the chat template's system turn
  c.data.max_image_pixels = 10_000_000
  taken = []
  original = PromptStream.take

  def record(self, position, count):
    out, nxt = original(self, position, count)
    taken.append([e.row.id for e in out])
    return out, nxt

  monkeypatch.setattr(PromptStream, "take", record)
  out = aepo_stage.run(c)
  rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
  from ares_jax.data.prompts import in_eval_split  # pylint: disable=import-outside-toplevel
  good = {r[0] for r in layouts.VIRL_GOOD}
  held = {i for i in good | set(layouts.VIRL_BAD) if in_eval_split(i, 0.25)}
  used = {i for ids in taken for i in ids}
  assert used and used <= good - held  # only usable training rows, never a held-out one
  bad_in_train = {i: reason for i, (_, reason) in layouts.VIRL_BAD.items() if i not in held and reason != "missing_answer"}
  assert {k: v for k, v in out["skipped_rows"].items()} == {r: list(bad_in_train.values()).count(r)
                                                             for r in set(bad_in_train.values())}
  assert rows[-1]["data/skipped"] == sum(out["skipped_rows"].values())


def test_adacs_on_a_parquet_pool_with_embedded_images(tmp_path):
  rows = []
  for i in range(6):
    for k, resp in enumerate([f"{i}+{i}={2 * i}. \\boxed{{{2 * i}}}", f"So \\boxed{{{2 * i}}}", "\\boxed{0}"]):
      rows.append({"id": f"q{i}", "question": f"<image>What is {i}+{i}?", "answer": f"\\boxed{{{2 * i}}}",
                   "images": [{"bytes": layouts.png("red"), "path": None}], "response": resp,
                   "source": "arith", "pass_rate": [0.0, 0.5, 1.0][i % 3] if i % 2 else None})
  rows.append({"id": "bad", "question": "<image>?", "answer": "1", "images": [{"bytes": b"junk", "path": None}],
               "response": "\\boxed{1}", "source": "arith"})
  pool = tmp_path / "pool.parquet"
  layouts.write_parquet(pool, rows, row_group_size=5)
  c = load_config("tiny.py")
  c.stage, c.workdir = "adacs", str(tmp_path / "adacs")
  c.mesh.fsdp = 1
  c.warm_start.steps = 0
  c.data.kind, c.data.paths = "files", ()
  c.data.system_prompt, c.data.instruction = None, "Think briefly."
  c.adacs.pool_paths = (str(pool),)
  c.adacs.pass_rate_samples, c.adacs.pass_rate_batch = 2, 4
  c.adacs.budget, c.adacs.batch_size, c.adacs.micro_batch_size, c.adacs.epochs = 4, 2, 2, 1
  c.rollout.max_response_length = 8
  report = adacs_stage.run(c)
  assert report["questions"] == 7 and 0 < report["selected"] <= 4
  assert report["prompts_skipped"] == {"unreadable_image": 1}
  rates = [json.loads(line) for line in (tmp_path / "adacs" / "pass_rates.jsonl").read_text().splitlines()]
  # Only questions without a supplied pass rate are sampled; the unreadable one gets none and is not selected.
  assert {r["id"]: r["pass_rate"] is None for r in rates} == {"q0": False, "q2": False, "q4": False, "bad": True}
  assert "bad" not in (tmp_path / "adacs" / "selection.jsonl").read_text()
  assert (tmp_path / "adacs" / "policy" / "model.safetensors").exists()


@pytest.mark.parametrize("name, field", [("aepo_7b.py", "config.data.paths"), ("aepo_3b.py", "config.data.paths"),
                                         ("adacs_7b.py", "config.adacs.pool_paths")])
def test_real_model_configs_name_the_data_field_to_set(name, field, tmp_path):
  c = load_config(name)
  assert [p.split(" is empty")[0] for p in config_checks.problems(c)] == [field]
  with c.unlocked():
    c.data.paths = (str(tmp_path),)
    c.adacs.pool_paths = (str(tmp_path),)
  assert config_checks.problems(c) == []


@pytest.mark.slow
def test_a_real_config_without_data_stops_at_startup_with_one_line():
  out = subprocess.run([sys.executable, "-m", "ares_jax.main", "--config=configs/aepo_7b.py"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith("FATAL: config.data.paths is empty: set --config.data.paths=")
  assert "Traceback" not in out.stderr


_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
if len(sys.argv) > 3:
  jax.distributed.initialize(coordinator_address=sys.argv[3], num_processes=2, process_id=int(sys.argv[2]))
from ares_jax.data.processor import QwenVLProcessor
from ares_jax.data.prompts import PromptStream, RowSource
from ares_jax.data.reader import read_rows
from ares_jax.data.template import PromptTemplate, ensure_chat_template
from ares_jax.data.tokenizer import tiny_tokenizer
tok = ensure_chat_template(tiny_tokenizer())
proc = QwenVLProcessor.create(tok, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16)
stream = PromptStream(RowSource(read_rows(sys.argv[1])), proc, PromptTemplate(tok), 600, 10_000_000, shuffle=True)
exs, pos = stream.take(0, 10)
print("RESULT " + json.dumps({"ids": [e.row.id for e in exs], "pos": pos, "skipped": dict(stream.skipped),
      "tokens": [e.prompt.ids.tolist() for e in exs],
      "pixels": [float(e.prompt.pixel_values.sum()) if e.prompt.pixel_values is not None else 0 for e in exs]}))
"""


@pytest.mark.slow
def test_two_processes_decode_their_share_and_see_the_single_process_batch(tmp_path):
  folder = layouts.virl39k(tmp_path)
  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  ran = run_together([[sys.executable, "-c", _SCRIPT, str(folder), str(i), f"localhost:{port}"] for i in range(2)],
                     [env] * 2, tmp_path, timeout=300)
  single = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
  results = []
  for rc, text in ran:
    assert rc == 0, text[-3000:]
    results.append(json.loads(text.split("RESULT ", 1)[1].splitlines()[0]))
  one = json.loads(single.stdout.split("RESULT ", 1)[1].splitlines()[0])
  assert results[0] == results[1] == one
  assert len(one["ids"]) == 10 and sorted(one["skipped"]) == sorted(  # every kind, each decoded on one process or the other
      r for _, r in layouts.VIRL_BAD.values() if r != "missing_answer")
