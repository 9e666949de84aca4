r"""XManager launcher for ares_jax: packages this checkout as a container and runs the entry point.

  pip install xmanager
  xmanager launch launch/xm_launch.py -- --config=configs/aepo_7b.py \
      --executor=vertex --accelerator=tpu_v3:8 \
      --override=model.hf_path=/gcs/bucket/Qwen2.5-VL-7B-Instruct --sweep=aepo.rho=0.25,0.5

  python launch/xm_launch.py --config=configs/tiny.py --dry_run   # print the jobs, launch nothing

Each job runs `python -m ares_jax.main --config=... --config.<field>=<value> ...`; `--sweep` adds one
job per value of one field. Multi-host jobs (TPU pods) get --config.distributed=True.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags

try:  # XManager is an optional dependency of the launcher only (`pip install ares_jax[launch]`).
  from xmanager import xm
except ImportError:  # pragma: no cover - depends on the environment
  xm = None

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Config file, relative to the repository root.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "field=value, passed as --config.field=value.")
_SWEEP = flags.DEFINE_string("sweep", None, "field=v1,v2,...: one job per value.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where the jobs run.")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "name:count, e.g. a100:8, h100:8, tpu_v3:8, local_gpu:2.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11-slim", "Container base image.")
_JAX = flags.DEFINE_string("jax", "jax", "jax requirement to install first: jax, 'jax[cuda12]' or 'jax[tpu]'.")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default: the config file name).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job arguments and exit without launching.")


def _parse_pairs(items: list[str], what: str) -> dict[str, str]:
  out = {}
  for item in items:
    field, sep, value = item.partition("=")
    if not sep or not field:
      raise app.UsageError(f"--{what}={item!r}: expected field=value")
    out[f"config.{field}"] = value
  return out


def job_args(config: str, overrides: list[str], sweep: str | None, distributed: bool) -> list[dict[str, Any]]:
  """Keyword arguments of each job (XManager turns {'a.b': v} into --a.b=v)."""
  base: dict[str, Any] = {"config": config, **_parse_pairs(overrides, "override")}
  if distributed:
    base["config.distributed"] = "True"  # a string: XManager turns a bool into a bare --flag
  if not sweep:
    return [base]
  (field, values), = _parse_pairs([sweep], "sweep").items()
  return [{**base, field: v} for v in values.split(",")]


def requirements(accelerator: str | None) -> Any:
  if not accelerator:
    return xm.JobRequirements()
  name, _, count = accelerator.partition(":")
  return xm.JobRequirements(**{name.lower(): int(count or 1)})


def docker_instructions(directory: str, jax_requirement: str) -> list[str]:
  """Install the package from the copied checkout (the build context is the repository's parent)."""
  project = f"/workdir/{directory}"
  return [
      "ENV LANG=C.UTF-8",
      "RUN python -m pip install --upgrade pip setuptools",
      f"COPY {directory}/ {project}",
      f"WORKDIR {project}",
      f"RUN python -m pip install '{jax_requirement}' && python -m pip install -e .",
  ]


def add_jobs(experiment: Any, jobs: list[dict[str, Any]], executor: Any, spec: Any) -> None:
  """Packages the checkout once and adds one job per argument set to `experiment` (any xm.Experiment:
  xm_local's, or xm_mock's in tests)."""
  [executable] = experiment.package([xm.Packageable(executable_spec=spec, executor_spec=executor.Spec())])
  for args in jobs:
    experiment.add(xm.Job(executable=executable, executor=executor, args=args))


def container_spec(base_image: str, jax_requirement: str) -> Any:
  return xm.PythonContainer(
      path=_ROOT, base_image=base_image, docker_instructions=docker_instructions(os.path.basename(_ROOT),
                                                                                jax_requirement),
      entrypoint=xm.ModuleName("ares_jax.main"))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  multi_host = bool(_ACCELERATOR.value and _ACCELERATOR.value.lower().startswith("tpu"))
  jobs = job_args(_CONFIG.value, _OVERRIDES.value, _SWEEP.value, distributed=multi_host)
  if _DRY_RUN.value:
    for args in jobs:
      print("python -m ares_jax.main " + " ".join(f"--{k}={v}" for k, v in args.items()))
    return
  if xm is None:
    raise app.UsageError("launch/xm_launch.py needs XManager: pip install xmanager")
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top  (docker and cloud clients)

  title = _TITLE.value or os.path.splitext(os.path.basename(_CONFIG.value))[0]
  with xm_local.create_experiment(experiment_title=f"ares_jax-{title}") as experiment:
    if _EXECUTOR.value == "vertex":
      executor = xm_local.Vertex(requirements=requirements(_ACCELERATOR.value))
    else:
      executor = xm_local.Local(requirements=requirements(_ACCELERATOR.value), experimental_stream_output=True)
    add_jobs(experiment, jobs, executor, container_spec(_BASE_IMAGE.value, _JAX.value))


if __name__ == "__main__":
  app.run(main)
