"""Fault injection (issue 12): SIGTERM in the middle of an AEPO step, a kill during a checkpoint write, a
corrupt newest checkpoint, updates that keep coming out non-finite, SIGTERM to a LoRA run; SIGTERM in AdaCS's
SFT loop and in the warm start (several processes and meshes: test_preemption_multihost.py).
Each run that is interrupted is compared with an uninterrupted one where there is one to compare with.

The AEPO runs are subprocesses of `python -m ares_jax.main` on the tiny config (one simulated device each)
sharing one persistent compilation cache, so only the first run compiles. The test sends SIGTERM as a
scheduler would, from outside: once the run's metrics.jsonl has the row of step k (`sigterm_when`), to
the process (to process 1 of two). The run stops after the step it is in by then, k or a later one, which
the tests read from its `preempted; stopped after step N` line (`_stop_step`; they fail if the signal came
too late to leave a step to the relaunch). The signal takes the real path: the Python handler, or JAX's
own notifier with two processes. The loops run in the test's own process (AdaCS's SFT, the warm start) get
a real SIGTERM from `os.kill` at the step wanted (`_sigterm_in_process`). The kill during a checkpoint
write is a SIGKILL from inside orbax's commit of that step (its files written, the folder not yet renamed
into place).
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ares_jax import settings as settings_lib
from ares_jax import models, sharding
from ares_jax.data.batching import Prompt
from ares_jax.train import run_control
from ares_jax.train.checkpoint import Checkpointer
from processes import sigterm_when
from ares_jax.train.run_control import Preempted
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
from ares_jax.aepo import step as aepo_step
_micro_batches = aepo_step.micro_batches
def micro_batches(*args, **kwargs):
  return [mb._replace(batch=mb.batch.replace(adv=np.full_like(mb.batch.adv, np.nan)))
          for mb in _micro_batches(*args, **kwargs)]
aepo_step.micro_batches = micro_batches
from ares_jax import main
sys.argv[0] = "ares_jax.main"
main.cli()
"""


# `python -c GROUP_SIGTERM_IN_GRADING <flags>`: the stage with a grader 0.05 s slower per item; 0.3 s into the
# grading of step $AT_STEP (after its first group was put to the grader, while the rest decode or are graded)
# a timer sends SIGTERM to the whole process group (the run's own, see
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
batches = []
_put = grading.GradingBatch.put
def put(self, *args, **kwargs):
  if not any(b is self for b in batches):  # a step's first group
    batches.append(self)
    if len(batches) == int(os.environ["AT_STEP"]):
      threading.Timer(0.3, os.killpg, (os.getpgid(0), signal.SIGTERM)).start()
  return _put(self, *args, **kwargs)
grading.GradingBatch.put = put
from ares_jax import main
sys.argv[0] = "ares_jax.main"
main.cli()
"""


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1",
             JAX_PLATFORMS="cpu")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _run(args: list[str], log: Path, devices: int = 1, sigterm_after: tuple | None = None,
         **env) -> tuple[int, str]:
  """Runs `python <args>` with its output in `log` (a file, not a pipe); (exit code, output).
  `sigterm_after=(workdir, k)`: SIGTERM once the run's metrics have step k's row (processes.sigterm_when)."""
  with open(log, "w") as f:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                            env=_env(devices, **env))
    try:
      if sigterm_after is not None:
        work, k = sigterm_after
        sigterm_when([proc], 0, lambda: _last_step(work) >= k, f"{work}/metrics.jsonl had step {k}'s row", [log])
      rc = proc.wait(timeout=900)
    finally:
      if proc.poll() is None:  # a failure above, or a time-out
        proc.kill()
        proc.wait()
  return rc, log.read_text()


def _last_step(workdir) -> int:
  """The step of the last row of `workdir`'s metrics.jsonl (local or gs://) so far; 0 before the first."""
  rows = _rows(workdir, missing_ok=True)
  return rows[-1]["step"] if rows else 0


def _stop_step(log: str, total: int = 4) -> int:
  """The step an AEPO run stopped after on SIGTERM (its `preempted; stopped after step N` line). The tests
  need it before the last (`total`): otherwise fails, saying the signal came too late."""
  found = re.findall(r"aepo: preempted; stopped after step (\d+)", log)
  assert len(found) == 1, f"not one preemption line ({found}) in the log:\n{log[-3000:]}"
  step = int(found[0])
  assert step < total, (f"SIGTERM came too late: the run stopped after step {step} of {total}, leaving the "
                        f"relaunch nothing to resume; send it at an earlier step\n{log[-3000:]}")
  return step


def _kept(*steps: int) -> list[int]:
  """The checkpoints kept of those saved at `steps` (checkpoint.keep=2 in SMALL)."""
  return sorted(set(steps))[-2:]


def _dirs(*steps: int, extra: tuple[str, ...] = ()) -> list[str]:
  """What `_ckpt_dirs` lists when the checkpoints saved were those of `steps` (plus the reference, `extra`)."""
  return sorted([str(k) for k in _kept(*steps)] + ["reference", *extra])


def _sigterm_in_process(monkeypatch, loop: str, step: int) -> None:
  """A real SIGTERM (os.kill) to this process when the loop named `loop` asks `StopRequests.should_stop`
  about `step`, just before its check: the signal takes the real path (the handler, then the check)."""
  should_stop = run_control.StopRequests.should_stop

  def sigterm_then_check(self, at: int) -> bool:
    if self.loop == loop and at == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return should_stop(self, at)

  monkeypatch.setattr(run_control.StopRequests, "should_stop", sigterm_then_check)


def _rows(workdir, missing_ok: bool = False) -> list[dict]:
  """metrics.jsonl of a local or gs:// workdir, without the wall-clock (time/) keys."""
  from ares_jax import storage  # pylint: disable=g-import-not-at-top
  return [{k: v for k, v in r.items() if not k.startswith("time/")}
          for r in storage.read_jsonl(f"{workdir}/metrics.jsonl", missing_ok=missing_ok)]


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
  once step 1's metrics are written (it stops after step `stop`, 1 to 3, usually 2); resumed, then SIGKILLed
  while committing the checkpoint of step 4; its newest checkpoint (`corrupted`) corrupted; resumed again."""
  root = tmp_path_factory.mktemp("preemption")
  common = MAIN + SMALL + [xla_cache]
  out = types.SimpleNamespace(straight=small_straight, work=root / "work")
  args = common + [f"--config.workdir={out.work}"]
  out.rc1, out.log1 = _run(args, root / "sigterm.log", sigterm_after=(out.work, 1))
  out.stop = _stop_step(out.log1)
  out.dirs1, out.rows1 = _ckpt_dirs(out.work), _rows(out.work)
  out.reference1 = _mtimes(out.work / "checkpoints" / "reference")
  out.rc2, out.log2 = _run(["-c", KILL_AT_COMMIT, *args[len(MAIN):]], root / "kill.log", KILL_AT_COMMIT_OF_STEP=4)
  out.dirs2, out.rows2 = _ckpt_dirs(out.work), _rows(out.work)
  out.previous, out.corrupted = _kept(0, 2, out.stop)  # the two newest complete checkpoints: 4 never completed
  _corrupt(out.work / "checkpoints" / str(out.corrupted))
  out.rc3, out.log3 = _run(args, root / "corrupt.log")
  out.dirs3, out.rows3 = _ckpt_dirs(out.work), _rows(out.work)
  return out


@pytest.mark.xdist_group("preemption_chain")
def test_sigterm_in_the_middle_of_a_step_exits_0_with_a_checkpoint_at_that_step(chain):
  s = chain.stop
  assert chain.rc1 == 0, chain.log1[-3000:]
  assert re.search(rf"aepo: preemption requested \(signal, SIGTERM [\d.]+ s ago on this process\): stopping after "
                   rf"step {s}(?!\d)", chain.log1)
  assert re.search(rf"aepo: preempted; stopped after step {s} with a checkpoint at \S+/checkpoints/{s}; rerun the "
                   r"same command", chain.log1)
  # Saved: 0, every second step, the stop step; keep=2 prunes the oldest; the reference is not a step.
  assert chain.dirs1 == _dirs(0, *range(2, s + 1, 2), s)
  assert chain.rows1 == _rows(chain.straight)[:s]


@pytest.mark.xdist_group("preemption_chain")
def test_the_resumed_run_matches_the_uninterrupted_run(chain):
  s = chain.stop
  assert re.search(rf"resumed from \S+/checkpoints/{s} \(data position {4 * s}\)", chain.log2), chain.log2[-3000:]
  assert chain.rows2 == _rows(chain.straight)  # step 4's metrics were written before its checkpoint write


@pytest.mark.xdist_group("preemption_chain")
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoints(chain):
  assert chain.rc2 == -9, chain.log2[-3000:]
  assert [d for d in chain.dirs2 if not d.startswith("4.orbax-checkpoint-tmp")] == _dirs(0, 2, chain.stop)
  assert any(d.startswith("4.orbax-checkpoint-tmp") for d in chain.dirs2)  # the write was under way


@pytest.mark.xdist_group("preemption_chain")
def test_a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(chain):
  new, prev = chain.corrupted, chain.previous
  assert chain.rc3 == 0, chain.log3[-3000:]
  # 4 never completed, so `new` is the newest; it is unreadable, so the run goes back to `prev` and redoes the rest.
  assert re.search(rf"checkpoint \S+/checkpoints/{new} is unreadable \(ValueError: .*\); falling back", chain.log3)
  assert re.search(rf"resumed from \S+/checkpoints/{prev} \(data position {4 * prev}\)", chain.log3)
  assert chain.rows3 == _rows(chain.straight)
  # orbax's leftover temporary folder is gone
  assert chain.dirs3 == _dirs(prev, 2, 4, extra=(f"unreadable-{new}",))


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
  rc, log = _run(args, tmp_path / "sigterm.log", sigterm_after=(tmp_path / "work", 1))
  stop = _stop_step(log)
  assert rc == 0, log[-3000:]
  assert _rows(tmp_path / "work") == _rows(tmp_path / "straight")[:stop]
  rc, log = _run(args, tmp_path / "resume.log")
  assert rc == 0 and re.search(rf"resumed from \S+/checkpoints/{stop} ", log), log[-3000:]
  assert _rows(tmp_path / "work") == _rows(tmp_path / "straight")
  metadata = json.loads((tmp_path / "work" / "checkpoints" / "4" / "state" / "_METADATA").read_text())
  saved = [ast.literal_eval(k) for k in metadata["tree_metadata"]]
  params = [k for k in saved if k[0] == "params"]
  assert params and all(k[1] == "lora" and k[-1] in ("lora_a", "lora_b") for k in params)


def _tiny_params(mesh):
  """The tiny model's config and random parameters sharded by the project's rules over `mesh` (placed from
  the host: no compiled initialiser)."""
  mcfg = settings_lib.model(load_config("tiny.py").model)
  boxed = models.abstract_params(mcfg)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s, sh: jax.device_put((0.05 * rng.standard_normal(s.shape)).astype(s.dtype), sh),
                        nn.unbox(boxed), sharding.param_shardings(boxed, mesh))
  return mcfg, params


def test_updates_skipped_max_skipped_updates_times_in_a_row_stop_the_run(tmp_path, xla_cache):
  rc, log = _run(["-c", NAN_ADVANTAGES, *SMALL, "--config.aepo.max_skipped_updates=3", "--config.total_steps=20",
                  f"--config.workdir={tmp_path / 'run'}", xla_cache], tmp_path / "run.log")
  assert rc == 2, log[-3000:]
  # One line (no traceback): the updates skipped in a row are counted at the end of a step, so 3 or more.
  assert re.search(r"\nFATAL: step \d+: the last [3-9] optimizer updates were all skipped because the loss or "
                   r"gradient norm was not finite .* config\.aepo\.max_skipped_updates \(0 = never stop\)\. Last "
                   r"checkpoint: step 0 \(--verbose shows the traceback\)\n", log), log[-3000:]
  assert "Traceback" not in log
  rows = _rows(tmp_path / "run")
  assert 1 <= len(rows) < 20 and all(r["update_skipped"] == 1.0 for r in rows)


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_sft_loop_stops_on_sigterm_and_resumes_to_the_uninterrupted_state(tmp_path, monkeypatch, where, request):
  """AdaCS's SFT loop, in this process: the handler catches a SIGTERM sent to the process at the end of step 2.
  Locally and with its workdir and checkpoints on gs:// (the GCS emulator)."""
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
  with monkeypatch.context() as m:
    _sigterm_in_process(m, "adacs sft", 2)
    with pytest.raises(Preempted) as stopped:
      train("cut")
  assert stopped.value.code == 0 and stopped.value.step == 2
  assert Checkpointer(f"{base}/cut/checkpoints").steps() == [2]
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
  _sigterm_in_process(monkeypatch, "warm start", 2)
  with pytest.raises(Preempted) as stopped:
    setup.warm_start(c, mcfg, params, stream, 0, tok)
  assert stopped.value.code == 0 and stopped.value.step == 2
  assert "warm start: preempted; stopped after step 2 (it keeps no checkpoint); rerun the same command" in caplog.text
