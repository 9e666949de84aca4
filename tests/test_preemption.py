"""Fault injection (issue 12): SIGTERM in the middle of an AEPO step, a kill during a checkpoint write, a
corrupt newest checkpoint, a different mesh on resume, SIGTERM to one of two processes, updates that keep
coming out non-finite, SIGTERM to a LoRA run; SIGTERM in AdaCS's SFT loop and in the warm start; how two
processes agree on the stop step with and without JAX's preemption service (and what that costs per step).
Each run that is interrupted is compared with an uninterrupted one where there is one to compare with.

The AEPO runs are subprocesses of `python -m ares_jax.main` on the tiny config (one simulated device each)
sharing one persistent compilation cache, so only the first run compiles. SIGTERM is sent by the process
to itself through the documented hook of train/run_control.py (ARES_TEST_SIGTERM_AT_STEP, right after
the step's rollout), so it takes the real path: the Python handler, or JAX's own notifier with two
processes. The kill during a checkpoint write is a SIGKILL from inside orbax's commit of that step (its
files written, the folder not yet renamed into place).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ares_jax import configs, models, sharding
from ares_jax.data.batching import Prompt
from ares_jax.train import aepo_update
from ares_jax.train import optimizer as optim_lib
from ares_jax.train.checkpoint import Checkpointer
from processes import free_port, run_together
from ares_jax.train.run_control import Preempted
from ares_jax.train.update import Updater
from tiny_configs import load_config

pytestmark = pytest.mark.slow  # whole AEPO runs in subprocesses, killed and resumed

ROOT = Path(__file__).resolve().parents[1]
# 4 AEPO steps of 4 prompts x (4 roots + 2 branches), 16 response tokens; checkpoints at 0, 2, 4, two kept.
MAIN = ["-m", "ares_jax.main"]
SMALL = ["--config=configs/tiny.py", "--config.stage=aepo", "--config.total_steps=4",
         "--config.checkpoint_every=2", "--config.checkpoint.keep=2", "--config.warm_start.steps=0",
         "--config.eval.every=0", "--config.rollout.n=4", "--config.rollout.max_branches=2",
         "--config.rollout.prompts_per_step=4", "--config.rollout.max_response_length=16",
         "--config.rollout.chunk_prompts=4", "--config.aepo.global_batch_size=8", "--config.aepo.micro_batch_size=8",
         "--config.aepo.filter_low=0.0", "--config.data.min_steps=1", "--config.data.max_steps=3", "--config.optim.lr=1e-3",
         "--config.log_compiles=False", "--config.grading_workers=1"]

# `python -c KILL_AT_COMMIT <flags>`: the stage, except that the process SIGKILLs itself when orbax is about
# to commit (rename into place) the checkpoint of step $KILL_AT_COMMIT_OF_STEP.
KILL_AT_COMMIT = """
import os, signal, sys
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self):
  if self.get_final().name == os.environ["KILL_AT_COMMIT_OF_STEP"]:
    os.kill(os.getpid(), signal.SIGKILL)
  return await _finalize(self)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from ares_jax import main
sys.argv[0] = "ares_jax.main"
main.cli()
"""

# `python -c NAN_ADVANTAGES <flags>`: the stage with every advantage NaN (host data: no new compile), so every
# loss is NaN and every update is skipped, as in a run that has diverged.
NAN_ADVANTAGES = """
import sys
import numpy as np
from ares_jax.train import aepo_update
_micro_batches = aepo_update.micro_batches
def micro_batches(*args, **kwargs):
  return [mb._replace(arrays=dict(mb.arrays, adv=np.full_like(mb.arrays["adv"], np.nan)))
          for mb in _micro_batches(*args, **kwargs)]
aepo_update.micro_batches = micro_batches
from ares_jax import main
sys.argv[0] = "ares_jax.main"
main.cli()
"""


# `python -c GROUP_SIGTERM_IN_GRADING <flags>`: the stage with a grader 0.05 s slower per item; 0.3 s into the
# grading of step $AT_STEP a timer sends SIGTERM to the whole process group (the run's own, see
# test_sigterm_to_the_process_group_during_grading_...), as a scheduler stopping a job does.
GROUP_SIGTERM_IN_GRADING = """
import os, signal, sys, threading
sys.path.insert(0, os.environ["TESTS_DIR"])
import test_grading
from ares_jax.data import grading
from ares_jax.stages import setup
setup.build_grader = lambda config: grading.Grader(workers=config.grading_workers,
                                                   timeout_s=config.aepo.grading_timeout_s,
                                                   fn=test_grading.slow_grade_one)
calls = [0]
_grade = grading.Grader.grade
def grade(self, *args, **kwargs):
  calls[0] += 1
  if calls[0] == int(os.environ["AT_STEP"]):
    threading.Timer(0.3, os.killpg, (os.getpgid(0), signal.SIGTERM)).start()
  return _grade(self, *args, **kwargs)
grading.Grader.grade = grade
from ares_jax import main
sys.argv[0] = "ares_jax.main"
main.cli()
"""


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1",
             JAX_PLATFORMS="cpu")
  for k in ("ARES_TEST_SIGTERM_AT_STEP", "ARES_TEST_SIGTERM_PROCESS"):
    env.pop(k, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _run(args: list[str], log: Path, devices: int = 1, **env) -> tuple[int, str]:
  """Runs `python <args>` with its output in `log` (a file, not a pipe); (exit code, output)."""
  with open(log, "w") as f:
    rc = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                        env=_env(devices, **env), timeout=900, check=False).returncode
  return rc, log.read_text()


def _rows(workdir) -> list[dict]:
  """metrics.jsonl of a local or gs:// workdir, without the wall-clock (time/) keys."""
  from ares_jax import storage  # pylint: disable=g-import-not-at-top
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in storage.read_jsonl(f"{workdir}/metrics.jsonl")]


def _ckpt_dirs(workdir: Path) -> list[str]:
  return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.is_dir())


def _mtimes(folder: Path) -> dict[str, int]:
  return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def _corrupt(step_dir: Path) -> None:
  """Truncates every array data file of a checkpoint to half its size."""
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for p in files:
    os.truncate(p, p.stat().st_size // 2)


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> str:
  """One persistent compilation cache for every run of this file: only the first run of a shape compiles."""
  return f"--config.compilation_cache_dir={tmp_path_factory.mktemp('xla_cache')}"


@pytest.fixture(scope="module")
def chain(tmp_path_factory, xla_cache, small_straight) -> types.SimpleNamespace:
  """An uninterrupted run (conftest's `small_straight`), and one run interrupted three ways in turn: SIGTERM
  during step 3; resumed, then SIGKILLed while committing the checkpoint of step 4; its newest checkpoint (3)
  corrupted; resumed again."""
  root = tmp_path_factory.mktemp("preemption")
  common = MAIN + SMALL + [xla_cache]
  out = types.SimpleNamespace(straight=small_straight, work=root / "work")
  args = common + [f"--config.workdir={out.work}"]
  out.rc1, out.log1 = _run(args, root / "sigterm.log", ARES_TEST_SIGTERM_AT_STEP="aepo:3")
  out.dirs1, out.rows1 = _ckpt_dirs(out.work), _rows(out.work)
  out.reference1 = _mtimes(out.work / "checkpoints" / "reference")
  out.rc2, out.log2 = _run(["-c", KILL_AT_COMMIT, *args[len(MAIN):]], root / "kill.log", KILL_AT_COMMIT_OF_STEP=4)
  out.dirs2, out.rows2 = _ckpt_dirs(out.work), _rows(out.work)
  _corrupt(out.work / "checkpoints" / "3")
  out.rc3, out.log3 = _run(args, root / "corrupt.log")
  out.dirs3, out.rows3 = _ckpt_dirs(out.work), _rows(out.work)
  return out


@pytest.mark.xdist_group("preemption_chain")
def test_sigterm_in_the_middle_of_a_step_exits_0_with_a_checkpoint_at_that_step(chain):
  assert chain.rc1 == 0, chain.log1[-3000:]
  assert re.search(r"preemption requested \(signal, SIGTERM [\d.]+ s ago on this process\): stopping after step 3",
                   chain.log1)
  assert re.search(r"aepo: preempted; stopped after step 3 with a checkpoint at \S+/checkpoints/3; rerun the same "
                   r"command", chain.log1)
  assert chain.dirs1 == ["2", "3", "reference"]  # keep=2: step 0 pruned; the reference is not a step
  assert chain.rows1 == _rows(chain.straight)[:3]


@pytest.mark.xdist_group("preemption_chain")
def test_the_resumed_run_matches_the_uninterrupted_run(chain):
  assert re.search(r"resumed from \S+/checkpoints/3 \(data position 12\)", chain.log2), chain.log2[-3000:]
  assert chain.rows2 == _rows(chain.straight)  # step 4's metrics were written before its checkpoint write


@pytest.mark.xdist_group("preemption_chain")
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoints(chain):
  assert chain.rc2 == -9, chain.log2[-3000:]
  assert [d for d in chain.dirs2 if not d.startswith("4.orbax-checkpoint-tmp")] == ["2", "3", "reference"]
  assert any(d.startswith("4.orbax-checkpoint-tmp") for d in chain.dirs2)  # the write was under way


@pytest.mark.xdist_group("preemption_chain")
def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(chain):
  assert chain.rc3 == 0, chain.log3[-3000:]
  # 4 never completed, so 3 is the newest; it is unreadable, so the run goes back to 2 and redoes 3 and 4.
  assert re.search(r"checkpoint \S+/checkpoints/3 is unreadable \(ValueError: .*\); falling back", chain.log3)
  assert re.search(r"resumed from \S+/checkpoints/2 \(data position 8\)", chain.log3)
  assert chain.rows3 == _rows(chain.straight)
  assert chain.dirs3 == ["2", "4", "reference", "unreadable-3"]  # orbax's leftover temporary folder is gone


@pytest.mark.xdist_group("preemption_chain")
def test_sigterm_to_the_process_group_during_grading_checkpoints_the_uninterrupted_rewards(chain, tmp_path,
                                                                                           xla_cache, bucket):
  """The grader's workers ignore the SIGTERM that reaches the whole group; the step in flight is graded in
  full, so the checkpointed step's rewards and metrics are the uninterrupted run's; no worker outlives it.
  The run's workdir is a bucket on the GCS emulator (a pod's case)."""
  import test_grading  # pylint: disable=g-import-not-at-top
  log = tmp_path / "run.log"
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, "-c", GROUP_SIGTERM_IN_GRADING, *SMALL, xla_cache,
                             f"--config.workdir={bucket}/run"], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=_env(1, AT_STEP=2, TESTS_DIR=str(ROOT / "tests")), start_new_session=True)
    rc = proc.wait(timeout=900)
  out = log.read_text()
  assert rc == 0, out[-3000:]
  assert re.search(r"aepo: preempted; stopped after step 2 with a checkpoint at gs://\S+/run/checkpoints/2", out), \
      out[-3000:]
  rows = _rows(f"{bucket}/run")
  assert rows == _rows(chain.straight)[:2]
  assert all(r["grading/timeouts"] == 0 for r in rows)
  assert not test_grading._running_in_group(proc.pid)


@pytest.mark.xdist_group("preemption_chain")
def test_a_missing_reference_is_rebuilt_from_the_starting_policy_or_named(chain, tmp_path, xla_cache):
  import shutil  # pylint: disable=g-import-not-at-top
  work = tmp_path / "work"
  shutil.copytree(chain.work, work)
  shutil.rmtree(work / "checkpoints" / "reference")
  # Warm-started: the reference (the warm start's result) cannot be rebuilt: one line, exit 2.
  rc, log = _run(MAIN + SMALL + [xla_cache, f"--config.workdir={work}", "--config.warm_start.steps=5"],
                 tmp_path / "warm.log")
  assert rc == 2 and re.search(r"FATAL: \S+/checkpoints/reference is missing: the reference policy \(this run's "
                               r"warm-started policy of step 0\) cannot be rebuilt", log), log[-3000:]
  # Started from the seed's initialisation (as model.hf_path would be): rebuilt, saved, the run goes on.
  rc, log = _run(MAIN + SMALL + [xla_cache, f"--config.workdir={work}", "--config.total_steps=5"],
                 tmp_path / "rebuild.log")
  assert rc == 0 and re.search(r"checkpoints/reference is missing: rebuilt from the starting policy "
                               r"\(initialisation from seed 0\)", log), log[-3000:]
  assert (work / "checkpoints" / "reference").is_dir() and [r["step"] for r in _rows(work)] == [1, 2, 3, 4, 5]


@pytest.mark.xdist_group("preemption_chain")
def test_the_reference_policy_is_saved_once_and_not_in_step_checkpoints(chain):
  assert _mtimes(chain.work / "checkpoints" / "reference") == chain.reference1  # two resumes rewrote nothing
  metadata = json.loads((chain.work / "checkpoints" / "4" / "state" / "_METADATA").read_text())
  top = {ast.literal_eval(k)[0] for k in metadata["tree_metadata"]}
  assert top == {"step", "params", "opt_state", "rng", "stats", "skipped"}


def test_a_lora_run_stopped_by_sigterm_resumes_to_the_uninterrupted_run(tmp_path, xla_cache):
  """LoRA's checkpoints hold the adapters and their optimizer state only (the base is rebuilt from its
  source), so resuming must land on the uninterrupted run's metrics step for step."""
  common = MAIN + ["--config=configs/tiny_lora.py", *SMALL[1:], xla_cache]
  rc, log = _run(common + [f"--config.workdir={tmp_path / 'straight'}"], tmp_path / "straight.log")
  assert rc == 0, log[-3000:]
  args = common + [f"--config.workdir={tmp_path / 'work'}"]
  rc, log = _run(args, tmp_path / "sigterm.log", ARES_TEST_SIGTERM_AT_STEP="aepo:3")
  assert rc == 0 and "stopped after step 3" in log, log[-3000:]
  assert _rows(tmp_path / "work") == _rows(tmp_path / "straight")[:3]
  rc, log = _run(args, tmp_path / "resume.log")
  assert rc == 0 and re.search(r"resumed from \S+/checkpoints/3", log), log[-3000:]
  assert _rows(tmp_path / "work") == _rows(tmp_path / "straight")
  metadata = json.loads((tmp_path / "work" / "checkpoints" / "4" / "state" / "_METADATA").read_text())
  saved = [ast.literal_eval(k) for k in metadata["tree_metadata"]]
  params = [k for k in saved if k[0] == "params"]
  assert params and all(k[1] == "lora" and k[-1] in ("lora_a", "lora_b") for k in params)


def _tiny_params(mesh):
  """The tiny model's config and random parameters sharded by the project's rules over `mesh` (placed from
  the host: no compiled initialiser)."""
  mcfg = configs.to_model_config(load_config("tiny.py").model)
  boxed = models.abstract_params(mcfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s, sh: jax.device_put((0.05 * rng.standard_normal(s.shape)).astype(s.dtype), sh),
                        nn.unbox(boxed), sharding.param_shardings(boxed, mesh))
  return mcfg, params


def _train_state(mesh):
  mcfg, params = _tiny_params(mesh)
  updater = Updater(aepo_update.aepo_loss_fn(mcfg), optim_lib.make_optimizer(load_config("tiny.py").optim, 10),
                    params)
  return updater.init_state(params, jax.random.key(0))


def _host_leaves(state) -> list[np.ndarray]:
  state = state.replace(rng=jax.random.key_data(state.rng))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


# Restores the checkpoint in argv[1] onto a 4-device mesh; writes its leaves to argv[2].
RESTORE_ON_4 = """
import sys, jax, numpy as np
import test_preemption as t
from ares_jax import sharding
from ares_jax.train.checkpoint import Checkpointer
assert jax.device_count() == 4
mesh = sharding.make_mesh(fsdp=-1)
template = t._train_state(mesh)
ck = Checkpointer(sys.argv[1])
step, state, meta = ck.restore_latest(template)
spec = lambda tree: [(x.sharding.spec, x.sharding.mesh.devices.size) for x in jax.tree.leaves(tree)]
assert spec(state.params) == spec(template.params), "restored onto other shardings than the template's"
assert {n for _, n in spec(state)} == {4}
np.savez(sys.argv[2], *t._host_leaves(state))
print("RESTORED", step, meta)
"""


def test_a_checkpoint_saved_on_8_devices_resumes_on_4(tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py
  state = _train_state(sharding.make_mesh(fsdp=-1))
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))  # really sharded over 8
  state = state.replace(step=jnp.asarray(7, jnp.int32))
  ck = Checkpointer(str(tmp_path / "ck"))
  ck.save(7, state, {"data_position": 28})
  ck.close()
  rc, log = _run(["-c", RESTORE_ON_4, str(tmp_path / "ck"), str(tmp_path / "leaves.npz")], tmp_path / "restore.log",
                 devices=4, PYTHONPATH=str(ROOT / "tests"))
  assert rc == 0 and "RESTORED 7 {'data_position': 28}" in log, log[-3000:]
  restored = np.load(tmp_path / "leaves.npz")
  want = _host_leaves(state)
  assert len(restored.files) == len(want)
  for i, x in enumerate(want):
    np.testing.assert_array_equal(restored[f"arr_{i}"], x)


def test_sigterm_to_one_of_two_processes_stops_both_with_one_checkpoint(tmp_path, xla_cache):
  work, port = tmp_path / "run", free_port()
  args = MAIN + SMALL + ["--config.total_steps=4", "--config.checkpoint_every=100", "--config.mesh.fsdp=-1",
                  "--config.distributed=True", f"--config.workdir={work}", xla_cache]
  ran = run_together([[sys.executable, *args]] * 2,
                     [_env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i,
                           ARES_TEST_SIGTERM_AT_STEP="aepo:1", ARES_TEST_SIGTERM_PROCESS=1) for i in range(2)],
                     tmp_path, timeout=900)
  logs = [log for _, log in ran]
  for rc, log in ran:
    assert rc == 0, log[-3000:]
    assert "preemption: JAX preemption sync point" in log
  assert "sending SIGTERM" in logs[1] and "sending SIGTERM" not in logs[0]
  stops = [re.findall(r"aepo: preempted; stopped after step (\d+) with a checkpoint at \S+/checkpoints/(\d+)", log)
           for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  step = int(stops[0][0][0])
  assert step in (1, 2, 3)  # the step in progress when the notice arrived (JAX polls for it once a second)
  assert _ckpt_dirs(work) == ["0", str(step), "reference"]
  assert [r["step"] for r in _rows(work)] == list(range(1, step + 1))


def test_updates_skipped_max_skipped_updates_times_in_a_row_stop_the_run(tmp_path, xla_cache):
  rc, log = _run(["-c", NAN_ADVANTAGES, *SMALL, "--config.aepo.max_skipped_updates=3", "--config.total_steps=20",
                  f"--config.workdir={tmp_path / 'run'}", xla_cache], tmp_path / "run.log")
  assert rc == 2, log[-3000:]
  # One line (no traceback): the updates skipped in a row are counted at the end of a step, so 3 or more.
  assert re.search(r"\nFATAL: step \d+: the last [3-9] optimizer updates were all skipped because the loss or "
                   r"gradient norm was not finite .* config\.aepo\.max_skipped_updates \(0 = never stop\)\. Last "
                   r"checkpoint: step 0\n", log), log[-3000:]
  assert "Traceback" not in log
  rows = _rows(tmp_path / "run")
  assert 1 <= len(rows) < 20 and all(r["update_skipped"] == 1.0 for r in rows)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_sft_loop_stops_on_sigterm_and_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch, where, request):
  """AdaCS's SFT loop, in this process: the handler catches the SIGTERM the process sends itself. Locally
  and with its workdir and checkpoints on gs:// (the GCS emulator)."""
  base = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
  from ares_jax.stages import adacs as adacs_stage  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(fsdp=1)
  c = load_config("tiny.py")
  c.adacs.update(epochs=1, batch_size=2, micro_batch_size=2, lr=1e-3)
  c.checkpoint_every = 100
  mcfg, params = _tiny_params(mesh)
  rng = np.random.default_rng(0)
  examples = [(Prompt(rng.integers(5, 400, 12).astype(np.int32)), rng.integers(5, 400, 8).astype(np.int32))
              for _ in range(8)]  # 4 steps

  def train(name: str):
    c.workdir = f"{base}/{name}"
    ck = Checkpointer(f"{base}/{name}/checkpoints")
    try:
      return adacs_stage.train_sft(c, mcfg, jax.tree.map(jnp.copy, params), examples, ck, mesh, 0)
    finally:
      ck.close()

  straight = train("straight")
  monkeypatch.setenv("ARES_TEST_SIGTERM_AT_STEP", "adacs sft:2")
  with pytest.raises(Preempted) as stopped:
    train("cut")
  assert stopped.value.code == 0 and stopped.value.step == 2
  assert Checkpointer(f"{base}/cut/checkpoints").steps() == [2]
  monkeypatch.delenv("ARES_TEST_SIGTERM_AT_STEP")
  resumed = train("cut")
  assert _rows(f"{base}/cut") == _rows(f"{base}/straight")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(straight.params))


def test_sigterm_during_the_warm_start_stops_it(monkeypatch, caplog):
  """The warm start keeps no checkpoint (a rerun redoes it): SIGTERM stops it after the step, exit code 0."""
  from ares_jax.stages import setup  # pylint: disable=g-import-not-at-top
  c = load_config("tiny.py")
  c.warm_start.update(steps=4, batch_size=2)
  c.aepo.micro_batch_size = 2
  c.data.min_steps = c.data.max_steps = 1
  mesh = sharding.make_mesh(fsdp=1)
  mcfg, params = _tiny_params(mesh)
  tok = setup.build_tokenizer(c)
  stream = setup.prompt_stream(c, setup.build_processor(c, tok, mcfg), 0)
  monkeypatch.setenv("ARES_TEST_SIGTERM_AT_STEP", "warm start:2")
  with pytest.raises(Preempted) as stopped:
    setup.warm_start(c, mcfg, params, stream, 0, tok)
  assert stopped.value.code == 0 and stopped.value.step == 2
  assert "warm start: preempted; stopped after step 2 (it keeps no checkpoint); rerun the same command" in caplog.text


# Process argv[2] of 2 (coordinator port argv[1]) runs empty 0.5 s "steps" with StopRequests, JAX's preemption
# service on or off (argv[3]); prints the mode, the step it stops after, and the cost of one should_stop.
STOP_LOOP = """
import sys, time
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_enable_preemption_service", sys.argv[3] == "on")
jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from ares_jax.train.run_control import StopRequests
stop = StopRequests()
print("MODE", stop.mode, flush=True)
for step in range(1, 13):
  time.sleep(0.5)
  stop.during_step(step)
  if stop.should_stop(step):
    print("STOP", step, flush=True)
    break
t = time.perf_counter()
for i in range(20):
  stop.should_stop(100 + i)
print(f"COST_MS {(time.perf_counter() - t) / 20 * 1e3:.4f}", flush=True)
"""


@pytest.mark.parametrize("service,mode", [("on", "jax"), ("off", "allgather")])
def test_two_processes_agree_on_the_stop_step_with_or_without_jax_preemption_service(tmp_path, service, mode):
  port = free_port()
  ran = run_together([[sys.executable, "-c", STOP_LOOP, str(port), str(i), service] for i in range(2)],
                     [_env(1, ARES_TEST_SIGTERM_AT_STEP=3, ARES_TEST_SIGTERM_PROCESS=1)] * 2, tmp_path, timeout=300)
  logs = [log for _, log in ran]
  for rc, log in ran:
    assert rc == 0 and f"MODE {mode}" in log, log[-3000:]
  stops = [re.findall(r"STOP (\d+)", log) for log in logs]
  # The step of the signal, or a later one with JAX's notifier (it polls for SIGTERM once a second).
  assert stops[0] == stops[1] and 3 <= int(stops[0][0]) <= (3 if mode == "allgather" else 6), stops
  cost_ms = float(re.search(r"COST_MS (\S+)", logs[0]).group(1))
  assert cost_ms < (1.0 if mode == "jax" else 100.0), cost_ms  # measured: ~0.0002 ms (jax), ~6 ms (allgather)
