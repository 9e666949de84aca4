"""The launchers, offline: the gcloud command lines of launch/gcloud_tpu.sh (its dry run) and the XManager
launcher's jobs."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gcloud_run(*args: str, **env: str) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", "launch/gcloud_tpu.sh", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, DRY_RUN="1", TPU_NAME="ares", ZONE="us-east5-a", **env))


def _gcloud(*args: str, **env: str) -> tuple[list[list[str]], str]:
  out = _gcloud_run(*args, **env)
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


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e")])
def test_each_accelerator_family_gets_its_tpu_software_version(accelerator, runtime):
  out = _gcloud_run("--print-runtime", ACCELERATOR=accelerator)
  assert (out.returncode, out.stdout) == (0, runtime + "\n"), out.stderr
  commands, _ = _gcloud("--config=configs/tiny.py", ACCELERATOR=accelerator)
  assert {f"--accelerator-type={accelerator}", f"--version={runtime}"} <= set(commands[0])
  commands, _ = _gcloud("--config=configs/tiny.py", ACCELERATOR=accelerator, QUEUED="1")
  assert f"--runtime-version={runtime}" in commands[0]
  # RUNTIME_VERSION still overrides the family's default
  out = _gcloud_run("--print-runtime", ACCELERATOR=accelerator, RUNTIME_VERSION="tpu-vm-custom")
  assert out.stdout == "tpu-vm-custom\n"


def test_an_unknown_accelerator_family_stops_before_any_gcloud_command():
  out = _gcloud_run("--config=configs/tiny.py", ACCELERATOR="v9x-8")
  assert out.returncode == 2 and "+ gcloud" not in out.stdout
  assert "ACCELERATOR=v9x-8" in out.stderr and "RUNTIME_VERSION" in out.stderr
  assert _gcloud_run("--print-runtime", ACCELERATOR="v9x-8").returncode == 2
  commands, _ = _gcloud("--config=configs/tiny.py", ACCELERATOR="v9x-8", RUNTIME_VERSION="v2-alpha-future")
  assert "--version=v2-alpha-future" in commands[0]


def test_the_workers_install_the_jax_the_tests_run_with():
  pin = (ROOT / "launch" / "jax_version.txt").read_text().strip()
  assert pin == jax.__version__, "launch/jax_version.txt must name the jax the project is tested with"
  setup = _remote(_gcloud("--config=configs/tiny.py")[0])[0]
  assert f"python3 -m pip install -q 'jax[tpu]=={pin}'" in setup and "-U" not in setup
  launcher = _xm_launcher()
  assert launcher.pinned("jax[tpu]") == f"jax[tpu]=={pin}" and launcher.pinned("jax[tpu]==0.9.0") == "jax[tpu]==0.9.0"


def _xm_launcher():
  """launch/xm_launch.py as a module, its flags defined and then removed again."""
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
  return launcher


def test_xmanager_launcher_gives_every_job_of_a_sweep_its_own_workdir():
  """With XManager's own mock experiment and executor: nothing is built or launched."""
  from absl import app
  from xmanager import xm, xm_mock

  launcher = _xm_launcher()
  jobs = launcher.job_args("configs/aepo_7b.py", ["model.hf_path=/gcs/b/policy"],
                           ["optim.lr=1e-6,2e-6", "seed=0,1"], distributed=True)
  root = launcher.workdir_root("vertex", "gs://bucket/runs/")
  experiment = xm_mock.MockExperiment()
  with experiment:
    workdirs = launcher.add_jobs(experiment, jobs, xm_mock.MockExecutor(),
                                 launcher.container_spec("python:3.11-slim", "jax[tpu]"), root, "configs/aepo_7b.py")
  xid = experiment.experiment_id
  assert workdirs == [f"gs://bucket/runs/aepo_7b/{xid}/optim.lr={lr},seed={seed}"
                      for lr in ("1e-6", "2e-6") for seed in ("0", "1")]
  assert len(experiment.launched_jobs) == 4
  args = [job.args.to_dict() for job in experiment.launched_jobs]
  assert experiment.launched_jobs[0].args.to_list(str)[0] == "--config=configs/aepo_7b.py"  # the command line
  assert [a["config.workdir"] for a in args] == workdirs
  assert [(a["config.optim.lr"], a["config.seed"]) for a in args] == [("1e-6", "0"), ("1e-6", "1"), ("2e-6", "0"),
                                                                     ("2e-6", "1")]
  assert all(a["config"] == "configs/aepo_7b.py" and a["config.model.hf_path"] == "/gcs/b/policy"
             and a["config.distributed"] == "True" for a in args)
  assert isinstance(launcher.requirements("tpu_v5p:8"), xm.JobRequirements)
  container = launcher.container_spec("python:3.11-slim", "jax[tpu]")
  assert container.entrypoint.module_name == "ares_jax.main" and Path(container.path) == ROOT
  assert (f"RUN python -m pip install 'jax[tpu]=={jax.__version__}' && python -m pip install -e '.[gcs]'"
          in container.docker_instructions)

  # A job's disk is gone when it ends: a remote executor needs gs://; a local root is mounted into the containers.
  for bad in (None, "/tmp/runs"):
    with pytest.raises(app.UsageError, match="--workdir_root=gs://"):
      launcher.workdir_root("vertex", bad)
  local = launcher.workdir_root("local", None)
  assert os.path.isabs(local) and local == os.path.expanduser("~/ares_jax_runs")
  assert launcher.local_volumes(local) == {local: local} and launcher.local_volumes(root) == {}
  assert launcher.workdir_root("local", "runs") == os.path.join(os.getcwd(), "runs")
  # The launcher names the workdirs: an explicit one would put every job of a sweep in it again.
  with pytest.raises(app.UsageError, match="workdir_root"):
    launcher.job_args("configs/tiny.py", ["workdir=/tmp/x"], ["seed=0,1"], distributed=False)


def test_sweep_values_become_safe_distinct_folder_names():
  from absl import app

  launcher = _xm_launcher()
  [(name, args)] = launcher.job_args("configs/tiny.py", [], ["model.hf_path=/ckpt/policy 'v2'"], distributed=False)
  assert name == "model.hf_path=_ckpt_policy__v2_"
  assert args["config.model.hf_path"] == "/ckpt/policy 'v2'"  # the value itself is passed on intact
  [(name, _)] = launcher.job_args("configs/tiny.py", [], [], distributed=False)
  assert name == "" and launcher.job_workdir("/r", "configs/tiny.py", 3, name) == "/r/tiny/3"
  long = launcher.path_component("x" * 300)
  assert len(long) <= 120 and long != launcher.path_component("x" * 301)
  with pytest.raises(app.UsageError, match="same workdir"):
    launcher.job_args("configs/tiny.py", [], ["tokenizer.path=a/b,a_b"], distributed=False)
  with pytest.raises(app.UsageError, match="swept twice"):
    launcher.job_args("configs/tiny.py", [], ["seed=0,1", "seed=2"], distributed=False)


def test_xmanager_dry_run_prints_a_workdir_per_job():
  out = subprocess.run([sys.executable, "launch/xm_launch.py", "--config=configs/aepo_7b.py",
                        "--sweep=aepo.rho=0.25,0.5", "--workdir_root=gs://bucket/runs", "--dry_run"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  commands = [shlex.split(line) for line in out.stdout.splitlines() if line.startswith("python -m ares_jax.main")]
  workdirs = [a.split("=", 1)[1] for c in commands for a in c if a.startswith("--config.workdir=")]
  assert workdirs == ["gs://bucket/runs/aepo_7b/<xid>/aepo.rho=0.25", "gs://bucket/runs/aepo_7b/<xid>/aepo.rho=0.5"]
  refused = subprocess.run([sys.executable, "launch/xm_launch.py", "--executor=vertex", "--dry_run"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
  assert refused.returncode != 0 and "--workdir_root=gs://" in refused.stderr
