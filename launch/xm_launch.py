r"""XManager launcher for ares_jax: packages this checkout as a container and runs the entry point.

  pip install -e ".[launch]"
  xmanager launch launch/xm_launch.py -- --config=configs/aepo_7b.py \
      --executor=vertex --accelerator=tpu_v5p:8 --workdir_root=gs://my-bucket/runs \
      --override=model.hf_path=/gcs/my-bucket/Qwen2.5-VL-7B-Instruct --sweep=aepo.rho=0.25,0.5 --sweep=seed=0,1

  python launch/xm_launch.py --config=configs/tiny.py --sweep=seed=0,1 --dry_run   # print the jobs, launch nothing

Each job runs `python -m ares_jax.main --config=... --config.<field>=<value> ...`. `--sweep=field=v1,v2` adds one
job per value of one field; several `--sweep`s give one job per combination of their values. Every job writes to
a workdir of its own, passed as --config.workdir:

  <workdir_root>/<config name>/<experiment id>/<sweep values>   e.g. gs://my-bucket/runs/aepo_7b/42/aepo.rho=0.25,seed=1

so neither the jobs of one launch nor two launches of one config share a folder (a job restarted by its executor
keeps its arguments, so it resumes from its own checkpoints). A job's container disk is gone when the job ends:
with --executor=vertex, --workdir_root must be gs://; with --executor=local it defaults to ~/ares_jax_runs, mounted
into each container at the same path. Multi-host jobs (TPU pods) get --config.distributed=True.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from typing import Any

from absl import app, flags

try:  # XManager is an optional dependency of the launcher only (`pip install ares_jax[launch]`).
  from xmanager import xm
except ImportError:  # pragma: no cover - depends on the environment
  xm = None

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The jax the tests run with (tests/test_launch.py checks it), shared with launch/gcloud_tpu.sh.
with open(os.path.join(_ROOT, "launch", "jax_version.txt")) as f:
  JAX_VERSION = f.read().strip()

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Config file, relative to the repository root.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "field=value, passed as --config.field=value.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "field=v1,v2,...: one job per value; several --sweep flags: one job per combination.")
_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "vertex"], "Where the jobs run.")
_WORKDIR_ROOT = flags.DEFINE_string(
    "workdir_root", None, "Folder of the jobs' workdirs, <root>/<config name>/<experiment id>/<sweep values>: "
    "gs://bucket/path (required with --executor=vertex); --executor=local defaults to ~/ares_jax_runs.")
_ACCELERATOR = flags.DEFINE_string("accelerator", None, "name:count, e.g. a100:8, h100:8, tpu_v3:8, local_gpu:2.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11-slim", "Container base image.")
_JAX = flags.DEFINE_string(
    "jax", "jax", "jax requirement to install first: jax, 'jax[cuda12]' or 'jax[tpu]'; without a version "
    f"specifier it gets launch/jax_version.txt's ({JAX_VERSION}), the one the project is tested with.")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default: the config file name).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the job arguments and exit without launching.")

# What a path component keeps of a sweep value; anything else (slashes, quotes, spaces) becomes '_'.
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
# A path component stays under common file-name limits (255 bytes); longer names keep a digest of the whole.
_MAX_NAME = 120


def _parse_pairs(items: list[str], what: str) -> dict[str, str]:
  out = {}
  for item in items:
    field, sep, value = item.partition("=")
    if not sep or not field:
      raise app.UsageError(f"--{what}={item!r}: expected field=value")
    if field == "workdir":
      raise app.UsageError(f"--{what}={item!r}: each job's workdir is named by the launcher; set --workdir_root")
    out[f"config.{field}"] = value
  return out


def sweep_points(sweeps: list[str]) -> list[dict[str, str]]:
  """One {config.field: value} per job: every combination of the --sweep values ([{}] without a sweep)."""
  axes: dict[str, list[str]] = {}
  for sweep in sweeps:
    (field, values), = _parse_pairs([sweep], "sweep").items()
    if field in axes:
      raise app.UsageError(f"--sweep={sweep!r}: {field[len('config.'):]} is swept twice")
    axes[field] = values.split(",")
  return [dict(zip(axes, combination)) for combination in itertools.product(*axes.values())]


def path_component(text: str) -> str:
  """`text` as one folder name: unsafe characters replaced, long names shortened to a prefix and a digest."""
  safe = _UNSAFE.sub("_", text).lstrip(".")
  if len(safe) > _MAX_NAME:
    safe = f"{safe[:_MAX_NAME - 13]}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"
  return safe


def job_name(point: dict[str, str]) -> str:
  """A job's sweep values as one folder name, e.g. 'aepo.rho=0.25,seed=1' ('' for a launch without a sweep)."""
  return path_component(",".join(f"{field[len('config.'):]}={value}" for field, value in point.items()))


def job_args(config: str, overrides: list[str], sweeps: list[str],
             distributed: bool) -> list[tuple[str, dict[str, Any]]]:
  """(name, keyword arguments) of each job (XManager turns {'a.b': v} into --a.b=v); no two names are equal."""
  base: dict[str, Any] = {"config": config, **_parse_pairs(overrides, "override")}
  if distributed:
    base["config.distributed"] = "True"  # a string: XManager turns a bool into a bare --flag
  jobs = [(job_name(point), {**base, **point}) for point in sweep_points(sweeps)]
  names = [name for name, _ in jobs]
  if len(set(names)) != len(names):
    raise app.UsageError(f"--sweep values {names} name the same workdir twice once made safe for paths")
  return jobs


def config_name(config: str) -> str:
  return path_component(os.path.splitext(os.path.basename(config))[0])


def workdir_root(executor: str, root: str | None) -> str:
  """The checked root of the jobs' workdirs: gs:// for an executor whose containers do not outlive their job on
  this machine, else a gs:// or absolute local path (default ~/ares_jax_runs)."""
  if root and root.startswith("gs://"):
    return root.rstrip("/")
  if executor != "local":
    got = f" (got {root})" if root else ""
    raise app.UsageError(f"--executor={executor} needs --workdir_root=gs://bucket/path{got}: a job's own disk is "
                         "gone when it ends, and its outputs with it")
  return os.path.abspath(os.path.expanduser(root or "~/ares_jax_runs"))


def job_workdir(root: str, config: str, xid: int | str, name: str) -> str:
  return "/".join(part for part in (root, config_name(config), str(xid), name) if part)


def local_volumes(root: str) -> dict[str, str]:
  """Host folder -> container folder for the local executor: a local root at the same path inside each
  container, so the jobs' workdirs outlive their containers (a gs:// root needs no mount)."""
  return {} if root.startswith("gs://") else {root: root}


def command_lines(jobs: list[tuple[str, dict[str, Any]]], root: str, config: str, xid: int | str) -> list[str]:
  """Each job's command, with its workdir, as the container runs it."""
  lines = []
  for name, args in jobs:
    args = with_workdir(args, root, config, xid, name)
    lines.append("python -m ares_jax.main " + " ".join(f"--{k}={v}" for k, v in args.items()))
  return lines


def with_workdir(args: dict[str, Any], root: str, config: str, xid: int | str, name: str) -> dict[str, Any]:
  return {**args, "config.workdir": job_workdir(root, config, xid, name)}


def requirements(accelerator: str | None) -> Any:
  if not accelerator:
    return xm.JobRequirements()
  name, _, count = accelerator.partition(":")
  return xm.JobRequirements(**{name.lower(): int(count or 1)})


def pinned(jax_requirement: str) -> str:
  """`jax_requirement` at the tested version unless it names a version itself."""
  return jax_requirement if re.search(r"[=<>!~@]", jax_requirement) else f"{jax_requirement}=={JAX_VERSION}"


def docker_instructions(directory: str, jax_requirement: str) -> list[str]:
  """Install the package from the copied checkout (the build context is the repository's parent), with gcsfs
  for gs:// workdirs."""
  project = f"/workdir/{directory}"
  return [
      "ENV LANG=C.UTF-8",
      "RUN python -m pip install --upgrade pip setuptools",
      f"COPY {directory}/ {project}",
      f"WORKDIR {project}",
      f"RUN python -m pip install '{pinned(jax_requirement)}' && python -m pip install -e '.[gcs]'",
  ]


def add_jobs(experiment: Any, jobs: list[tuple[str, dict[str, Any]]], executor: Any, spec: Any, root: str,
             config: str) -> list[str]:
  """Packages the checkout once and adds one job per argument set to `experiment` (any xm.Experiment: xm_local's,
  or xm_mock's in tests), each with its own workdir under `root`; returns the workdirs."""
  [executable] = experiment.package([xm.Packageable(executable_spec=spec, executor_spec=executor.Spec())])
  workdirs = []
  for name, args in jobs:
    args = with_workdir(args, root, config, experiment.experiment_id, name)
    experiment.add(xm.Job(executable=executable, executor=executor, args=args))
    workdirs.append(args["config.workdir"])
  return workdirs


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
  root = workdir_root(_EXECUTOR.value, _WORKDIR_ROOT.value)
  if _DRY_RUN.value:
    print("# <xid>: the experiment id XManager gives the launch")
    print("\n".join(command_lines(jobs, root, _CONFIG.value, "<xid>")))
    return
  if xm is None:
    raise app.UsageError("launch/xm_launch.py needs XManager: pip install -e '.[launch]'")
  from xmanager import xm_local  # pylint: disable=g-import-not-at-top  (docker and cloud clients)

  title = _TITLE.value or config_name(_CONFIG.value)
  with xm_local.create_experiment(experiment_title=f"ares_jax-{title}") as experiment:
    if _EXECUTOR.value == "vertex":
      executor = xm_local.Vertex(requirements=requirements(_ACCELERATOR.value))
    else:
      if not root.startswith("gs://"):
        os.makedirs(root, exist_ok=True)  # mounted by the user, not by the docker daemon as root
      executor = xm_local.Local(requirements=requirements(_ACCELERATOR.value),
                                docker_options=xm_local.DockerOptions(volumes=local_volumes(root)),
                                experimental_stream_output=True)
    for workdir in add_jobs(experiment, jobs, executor, container_spec(_BASE_IMAGE.value, _JAX.value), root,
                            _CONFIG.value):
      print(f"workdir: {workdir}")


if __name__ == "__main__":
  app.run(main)
