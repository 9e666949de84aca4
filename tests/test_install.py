"""What the README's install and test commands give: the CPU torch the parity tests take as their reference, the
command CI runs, and extras for what the docs tell users to run."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
EXTRAS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _readme_test_command() -> str:
  """The one line of the README's code block after "Tests" (the install and the full suite)."""
  readme = (ROOT / "README.md").read_text()
  block = re.search(r"\nTests\b.*?:\n\n```bash\n(.*?)\n```", readme, re.S)
  assert block, "README.md has no 'Tests ...:' code block"
  [line] = block.group(1).splitlines()
  return line


def test_ci_runs_the_readme_test_command_verbatim():
  command = _readme_test_command()
  assert "python -m pytest" in command and 'pip install -e ".[test]"' in command
  ci = (ROOT / ".ci" / "run").read_text()
  assert f"{command} || status=$?" in ci.splitlines(), ".ci/run must run the README's test command as written"


def test_torch_and_torchvision_are_the_pinned_pair():
  """The parity references: torch at its pin, and the torchvision built against it (transformers' video
  processor imports it; a torchvision of another build fails to load its operators). Either the CPU builds
  (PyTorch's CPU index) or PyPI's CUDA builds, which run on the CPU too (README, tests section)."""
  import torch
  import torchvision
  from torchvision.transforms.v2 import functional  # loads the compiled operators

  pins = {r.split("==")[0]: r.split("==")[1] for r in EXTRAS["test"] if r.startswith(("torch==", "torchvision=="))}
  assert torch.__version__.split("+")[0] == pins["torch"]
  assert torchvision.__version__.split("+")[0] == pins["torchvision"]
  assert functional.resize(torch.zeros(1, 3, 4, 4), [2, 2]).shape == (1, 3, 2, 2)


def _documented_text() -> str:
  parts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")))]
  for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
    parts += ["".join(cell["source"]) for cell in json.loads(notebook.read_text())["cells"]]
  return "\n".join(parts)


def test_every_extra_the_docs_name_exists():
  named = {extra for group in re.findall(r'-e "?\.\[([\w,-]+)\]', _documented_text()) for extra in group.split(",")}
  assert {"test", "notebooks"} <= named and named <= set(EXTRAS), sorted(named - set(EXTRAS))


def test_the_notebooks_extra_installs_the_jupyter_commands_the_docs_use():
  commands = set(re.findall(r"\bjupyter[ -](\w+)", (ROOT / "docs" / "notebooks.md").read_text()))
  assert commands, "docs/notebooks.md tells users no jupyter command to run the notebooks with"
  packages = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in EXTRAS["notebooks"]}
  for command in commands:  # `jupyter lab` is jupyterlab's, `jupyter nbconvert` nbconvert's
    assert {f"jupyter{command}", command, f"jupyter-{command}"} & packages, (command, packages)
