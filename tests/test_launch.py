"""The launchers, offline: the gcloud command lines of launch/gcloud_tpu.sh (its dry run) and the XManager
launcher's jobs."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gcloud(*args: str, **env: str) -> tuple[list[list[str]], str]:
  out = subprocess.run(["bash", "launch/gcloud_tpu.sh", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, DRY_RUN="1", TPU_NAME="ares", ZONE="us-east5-a", **env))
  assert out.returncode == 0, out.stderr
  commands = [shlex.split(line[2:]) for line in out.stdout.splitlines() if line.startswith("+ ")]
  return commands, out.stdout


def _remote(commands: list[list[str]]) -> list[str]:
  """The shell commands run on the workers (the --command= of each ssh)."""
  return [a.split("=", 1)[1] for c in commands if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
          for a in c if a.startswith("--command=")]


def test_spot_queued_launch_keeps_code_and_outputs_apart_and_deletes_nothing():
  commands, _ = _gcloud("--config=configs/aepo_7b.py", "--config.data.paths=('/d/ViRL39K',)", QUEUED="1",
                        SPOT="1", WORKDIR="gs://bucket/aepo_7b")
  create = commands[0]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert {"--spot", "--node-id=ares", "--accelerator-type=v5p-8", "--zone=us-east5-a"} <= set(create)
  assert any(c[4] == "scp" and "--worker=all" in c for c in commands)
  setup, run = _remote(commands)
  assert "rm " not in setup and "rm " not in run  # a relaunch never deletes code or outputs
  code = setup.split("mkdir -p ", 1)[1].split()[0]
  assert code.startswith("~/ares_jax_code/")
  argv = shlex.split(run.split("&&", 1)[1])
  assert argv[:3] == ["python3", "-m", "ares_jax.main"]
  assert "--config.workdir=gs://bucket/aepo_7b" in argv and argv[-1] == "--config.distributed=True"
  assert "--config.data.paths=('/d/ViRL39K',)" in argv  # arguments survive both shells intact


def test_default_workdir_is_outside_the_code_and_the_same_on_relaunch():
  first, _ = _gcloud("--config=configs/tiny.py")
  again, _ = _gcloud("--config=configs/tiny.py")
  run = _remote(first)[-1]
  assert "--config.workdir=$HOME/ares_jax_runs/tiny" in run and "ares_jax_code" not in run.split("--config.workdir")[1]
  assert first[0][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and "--spot" not in first[0]
  assert _remote(again)[-1].split("&&")[1] == run.split("&&")[1]  # same command, same workdir: it resumes
  named, _ = _gcloud("--config=configs/tiny.py", "--config.workdir=/mnt/runs/x")
  assert _remote(named)[-1].count("--config.workdir=") == 1


def test_xmanager_launcher_adds_one_job_per_sweep_value_to_an_experiment():
  """With XManager's own mock experiment and executor: nothing is built or launched."""
  import importlib.util

  from xmanager import xm, xm_mock

  from absl import flags

  # ares_jax.main's --config, when a test in this process imported it (tests/test_reproductions.py), is set
  # aside while the launcher defines its own, and put back after.
  aside = {name: flags.FLAGS[name] for name in ("config",) if name in flags.FLAGS}
  for name in aside:
    delattr(flags.FLAGS, name)
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location("xm_launch", ROOT / "launch" / "xm_launch.py")
  launcher = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(launcher)
  finally:  # the launcher's flags (--config, ...) would clash with ares_jax.main's in this process
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
    for name, flag in aside.items():
      flags.FLAGS[name] = flag
  jobs = launcher.job_args("configs/aepo_7b.py", ["model.hf_path=/gcs/b/policy"], "aepo.rho=0.25,0.5",
                           distributed=True)
  experiment = xm_mock.MockExperiment()
  with experiment:
    launcher.add_jobs(experiment, jobs, xm_mock.MockExecutor(), launcher.container_spec("python:3.11-slim", "jax[tpu]"))
  assert len(experiment.launched_jobs) == 2
  args = [job.args.to_dict() for job in experiment.launched_jobs]
  assert experiment.launched_jobs[0].args.to_list(str)[0] == "--config=configs/aepo_7b.py"  # the command line
  assert [a["config.aepo.rho"] for a in args] == ["0.25", "0.5"]
  assert all(a["config"] == "configs/aepo_7b.py" and a["config.model.hf_path"] == "/gcs/b/policy"
             and a["config.distributed"] == "True" for a in args)
  assert isinstance(launcher.requirements("tpu_v5p:8"), xm.JobRequirements)
  container = launcher.container_spec("python:3.11-slim", "jax[tpu]")
  assert container.entrypoint.module_name == "ares_jax.main" and Path(container.path) == ROOT
  assert "RUN python -m pip install 'jax[tpu]' && python -m pip install -e ." in container.docker_instructions
