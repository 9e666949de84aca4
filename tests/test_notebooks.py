"""Every notebook in notebooks/ runs top to bottom in a fresh kernel on short settings.

Papermill-style: a notebook's cell tagged `parameters` holds its full-size settings; the test inserts a cell
after it that overrides them with the short values below, then executes the notebook with nbclient and fails on
the first cell that raises. Kernels start in notebooks/ (Jupyter's default folder) or in the repository root, so
both ways of opening a notebook are exercised.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ares_jax import settings as settings_lib
from ares_jax import models
from ares_jax.data.tokenizer import tiny_tokenizer
from tiny_configs import load_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

# notebook -> (the kernel's working folder, the short parameters: {tmp} is a folder in the test's temporary folder,
# {policy} a random tiny policy the test writes first)
SHORT = {
    "01_window_entropy.ipynb": (NOTEBOOKS, "WARM_START_STEPS = 2\nNUM_PROMPTS = 4"),
    "02_tiny_ares.ipynb": (ROOT, """\
WORKDIR = {tmp!r}
OVERRIDES = {{
    "warm_start.steps": 3, "total_steps": 2, "checkpoint_every": 2, "grading_workers": 1,
    "eval.every": 1, "eval.prompts": 8, "eval.samples": 1,
    "rollout.n": 4, "rollout.prompts_per_step": 8, "rollout.max_response_length": 48,
    "aepo.global_batch_size": 8, "aepo.micro_batch_size": 8, "aepo.filter_low": 0.0,
    "adacs.synthetic_questions": 16, "adacs.pass_rate_samples": 1, "adacs.pass_rate_batch": 8,
    "adacs.budget": 8, "adacs.batch_size": 4, "adacs.micro_batch_size": 4, "adacs.eval_prompts": 8,
    "adacs.max_response_length": 64,
}}"""),
    # The GRPO variant on one seed, from a random policy instead of an AdaCS run (02 runs AdaCS).
    "03_ablation.ipynb": (ROOT, """\
ABLATION_DIR = {tmp!r}
ADACS_POLICY = {policy!r}
SEEDS = "0"
VARIANTS = "grpo"
OVERRIDES = {{
    "total_steps": 1, "grading_workers": 1, "eval.every": 1, "eval.prompts": 8, "eval.samples": 1,
    "rollout.n": 4, "rollout.prompts_per_step": 4, "rollout.max_response_length": 48,
    "aepo.global_batch_size": 8, "aepo.micro_batch_size": 8, "aepo.filter_low": 0.0,
}}"""),
    "04_real_checkpoint.ipynb": (NOTEBOOKS, "MAX_NEW_TOKENS = 24"),
}


def tiny_policy(folder: Path) -> str:
  """A random policy of configs/tiny.py as a Hugging Face folder with its tokenizer, what AdaCS exports."""
  mcfg = settings_lib.model(load_config("tiny.py").model)
  models.save_hf(str(folder), mcfg, models.init_params(mcfg, jax.random.key(0)), tokenizer=tiny_tokenizer())
  return str(folder)


def notebooks() -> list[str]:
  return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


def with_parameters(nb, source: str):
  """The notebook with a cell holding `source` inserted after its `parameters` cell."""
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, "a notebook needs exactly one cell tagged 'parameters'"
  cell = nbformat.v4.new_code_cell(source)
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(tagged[0] + 1, cell)
  return nb


def kernel_env() -> dict[str, str]:
  """The test process's environment without its 8 simulated devices (a notebook sees what a user's CPU runtime
  has), with this checkout importable whether or not it is installed."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def test_every_notebook_has_short_settings():
  assert notebooks(), f"no notebooks in {NOTEBOOKS}"
  assert sorted(SHORT) == notebooks(), "every notebook needs its short parameters in SHORT (and only those)"


@pytest.mark.slow
@pytest.mark.parametrize("name", notebooks())
def test_notebook_runs(name, tmp_path):
  if name not in SHORT:
    pytest.fail(f"{name} has no short parameters in SHORT")
  cwd, params = SHORT[name]
  policy = tiny_policy(tmp_path / "policy") if "{policy" in params else ""
  params = params.format(tmp=str(tmp_path / "run"), policy=policy)
  nb = with_parameters(nbformat.read(NOTEBOOKS / name, as_version=4), params)
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
  try:
    client.execute(env=kernel_env())
  except CellExecutionError as e:  # the failing cell's source and traceback
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the traceback without its terminal colours
    pytest.fail(f"{name} (kernel started in {cwd}):\n{plain}", pytrace=False)
