"""What JAX, libtpu and transformers are told before they start: nothing about TPUs on a machine without one.

The `test` and `plan` extras install libtpu (the memory planner compiles for TPU topologies on a CPU). With
it installed and `JAX_PLATFORMS` unset, JAX tries a TPU backend on every machine: libtpu loads, cannot learn
its accelerator type or worker hostnames (there is no TPU VM metadata), prints "Failed to find host bounds
for accelerator type" and an `E0000 ... TPU_WORKER_HOSTNAMES` error, and when another process holds its
lockfile JAX logs "Unable to initialize backend 'tpu'" with libtpu's advice to `sudo rm` that file. So
where no TPU is attached (no /dev/accel*, no /dev/vfio/<group>, no TPU variable set by the user):

- `JAX_PLATFORMS` names the platforms that exist (cpu, and cuda / rocm where their device files and JAX
  plugin are both present), unless the user set it or an unknown JAX plugin is installed;
- libtpu's worker hostname and host bounds are given (a single host: `localhost`, `1,1,1`) and the
  metadata query is skipped, so the planner's `jax.experimental.topologies` still loads libtpu and
  compiles for any TPU topology (the topology's own shape comes from its name), quietly;
- several processes may load libtpu (there is no TPU for its lockfile to guard).

Each variable is only set when unset (`JAX_PLATFORMS`: or empty). On a TPU VM nothing is set. `apply` runs
when `ares_jax` is imported (its `__init__`), so before JAX is imported by any entry point (`main`, `plan`,
the notebooks, the reproductions); JAX reads `JAX_PLATFORMS` when it is imported, libtpu its variables
when it loads.

Two log lines are changed wherever they are logged: transformers' "PyTorch was not found" is dropped (this
project uses transformers only for tokenizers and image processors, which need no PyTorch), and libtpu's
advice to `sudo rm` its lockfile is cut from JAX's "Unable to initialize backend 'tpu'" (on a TPU VM whose
TPU another process holds).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os
import pkgutil
import re
from typing import Iterable, Mapping

# Variables a user (or a TPU VM image) sets for libtpu: their presence means libtpu is configured on purpose.
TPU_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_VISIBLE_CHIPS", "TPU_CHIPS_PER_PROCESS_BOUNDS", "TPU_PROCESS_BOUNDS",
                 "TPU_PROCESS_ADDRESSES", "JAX_FORCE_TPU_INIT")
# What libtpu is told without a TPU. Measured with libtpu 0.0.52: without TPU_WORKER_HOSTNAMES it prints the
# E0000 error, without TPU_HOST_BOUNDS "Failed to find host bounds"; with both, topologies (v4:2x2x1,
# v5e:2x4, v5p:2x2x1, v5p:4x4x4, v6e:2x4) describe the same devices, process indices and coordinates.
LIBTPU_WITHOUT_TPU = (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                      ("TPU_HOST_BOUNDS", "1,1,1"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"))
# device files -> the JAX platform they serve (with its plugin installed)
GPU_FILES = {"/dev/nvidia0": "cuda", "/dev/nvidiactl": "cuda", "/dev/dxg": "cuda", "/dev/kfd": "rocm"}
_TPU_FILE = re.compile(r"^/dev/(accel[0-9]+|vfio/[0-9]+)$")  # TPU v2-v4 chips; v5e, v5p, v6e (IOMMU groups)


def tpu_attached(env: Mapping[str, str], device_files: Iterable[str]) -> bool:
  """A TPU chip's device file is present, or the user configured libtpu (`TPU_VARIABLES`)."""
  return any(_TPU_FILE.match(f) for f in device_files) or any(env.get(v) for v in TPU_VARIABLES)


def platforms(device_files: Iterable[str], plugins: Iterable[str]) -> str | None:
  """JAX platforms to use without a TPU: a GPU platform where its device file and JAX plugin are both
  present, then cpu. None where a plugin of an unknown kind is installed (JAX is left to choose)."""
  kinds = set()
  for p in plugins:
    kind = "cuda" if "cuda" in p else "rocm" if "rocm" in p else None
    if kind is None:
      return None
    kinds.add(kind)
  present = {GPU_FILES[f] for f in device_files if f in GPU_FILES}
  return ",".join([k for k in ("cuda", "rocm") if k in kinds and k in present] + ["cpu"])


def decide(env: Mapping[str, str], device_files: Iterable[str], plugins: Iterable[str] = ()) -> dict[str, str]:
  """The variables to set before JAX starts, given the environment, the device files present (paths under
  /dev) and the installed JAX plugins' names: none on a machine with a TPU; else libtpu's single-host
  answers and `JAX_PLATFORMS` (`platforms`), each only where `env` does not have it already."""
  device_files = list(device_files)
  if tpu_attached(env, device_files):
    return {}
  out = {k: v for k, v in LIBTPU_WITHOUT_TPU if k not in env}
  if not env.get("JAX_PLATFORMS"):
    chosen = platforms(device_files, plugins)
    if chosen:
      out["JAX_PLATFORMS"] = chosen
  return out


def device_files() -> list[str]:
  """The device files `decide` looks at that exist on this machine."""
  return [*glob.glob("/dev/accel*"), *glob.glob("/dev/vfio/*"), *(f for f in GPU_FILES if os.path.exists(f))]


def jax_plugins() -> list[str]:
  """Names of installed JAX PJRT plugins (entry points and `jax_plugins.*` modules), without importing JAX."""
  names = {e.name for e in importlib.metadata.entry_points(group="jax_plugins")}
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    names |= {m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)}
  return sorted(names)


# libtpu's advice when another process holds its lockfile, which JAX logs with "Unable to initialize backend
# 'tpu'": deleting a file in /tmp under sudo is never the fix we want read (find the process instead).
_DELETE_ADVICE = re.compile(r'\s*(If you still get this message, run|Run) "\$ sudo rm [^"]*"\.?')


def without_delete_advice(message: str) -> str:
  """`message` without libtpu's advice to `sudo rm` its lockfile."""
  return _DELETE_ADVICE.sub("", message)


class _NoDeleteAdvice(logging.Filter):
  """Rewrites JAX's backend-initialisation log lines that carry libtpu's `sudo rm` advice."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "sudo rm" in message:
      record.msg, record.args = without_delete_advice(message), ()
    return True


class _NoTorchAdvice(logging.Filter):
  """Drops transformers' "PyTorch was not found" warning (the tokenizers and processors need no PyTorch)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("PyTorch was not found")


def apply() -> dict[str, str]:
  """Sets `decide`'s variables in this process (and so in the processes it starts); returns them."""
  # the plugin scan reads every installed package's entry points: skipped where it cannot change the answer
  plugins = () if os.environ.get("JAX_PLATFORMS") else jax_plugins()
  chosen = decide(os.environ, device_files(), plugins)
  os.environ.update(chosen)
  # loggers are configured later by their libraries; a filter added now stays
  for name, kind in (("transformers", _NoTorchAdvice), ("jax._src.xla_bridge", _NoDeleteAdvice)):
    logger = logging.getLogger(name)
    if not any(isinstance(f, kind) for f in logger.filters):
      logger.addFilter(kind())
  return chosen
