"""Fault injection across processes and meshes: a checkpoint saved on 8 devices resumes on 4, SIGTERM to one
of two processes stops both at one step with one checkpoint, and how two processes agree on the stop step with
and without JAX's preemption service (and what that costs per step). Helpers and the small AEPO run of
test_preemption.py; the SIGTERM comes from outside, as there."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_preemption as tp
from ares_jax import sharding
from ares_jax import settings as settings_lib
from ares_jax.aepo import step as aepo_step
from ares_jax.train import optimizer as optim_lib
from ares_jax.train.checkpoint import Checkpointer
from ares_jax.train.update import Updater
from processes import free_port, run_together, sigterm_when
from tiny_configs import load_config

pytestmark = pytest.mark.slow  # several JAX processes, AEPO runs in subprocesses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory) -> str:
  """One persistent compilation cache for every run of this file: only the first run of a shape compiles."""
  return f"--config.compilation_cache_dir={tmp_path_factory.mktemp('xla_cache')}"


def _train_state(mesh):
  mcfg, params = tp._tiny_params(mesh)
  tx = optim_lib.make_optimizer(settings_lib.optim(load_config("tiny.py")), 10)
  updater = Updater(aepo_step.aepo_loss_fn(mcfg), tx, params)
  return updater.init_state(params, jax.random.key(0))


def _host_leaves(state) -> list[np.ndarray]:
  state = state.replace(rng=jax.random.key_data(state.rng))
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


# Restores the checkpoint in argv[1] onto a 4-device mesh; writes its leaves to argv[2].
RESTORE_ON_4 = """
import sys, jax, numpy as np
import test_preemption_multihost as t
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
  rc, log = tp._run(["-c", RESTORE_ON_4, str(tmp_path / "ck"), str(tmp_path / "leaves.npz")], tmp_path / "restore.log",
                 devices=4, PYTHONPATH=str(ROOT / "tests"))
  assert rc == 0 and "RESTORED 7 {'data_position': 28}" in log, log[-3000:]
  restored = np.load(tmp_path / "leaves.npz")
  want = _host_leaves(state)
  assert len(restored.files) == len(want)
  for i, x in enumerate(want):
    np.testing.assert_array_equal(restored[f"arr_{i}"], x)


def test_sigterm_to_one_of_two_processes_stops_both_with_one_checkpoint(tmp_path, xla_cache):
  work, port, total = tmp_path / "run", free_port(), 12
  args = tp.MAIN + tp.SMALL + [f"--config.total_steps={total}", "--config.checkpoint_every=100", "--config.mesh.fsdp=-1",
                  "--config.distributed=True", f"--config.workdir={work}", xla_cache]
  # SIGTERM to process 1 only, once step 1's metrics are written (by process 0).
  ran = run_together([[sys.executable, *args]] * 2,
                     [tp._env(1, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i)
                      for i in range(2)], tmp_path, timeout=900,
                     while_running=lambda procs: sigterm_when(
                         procs, 1, lambda: tp._last_step(work) >= 1, "step 1's metrics row",
                         [tmp_path / f"process_{i}.log" for i in range(2)]))
  logs = [log for _, log in ran]
  for rc, log in ran:
    assert rc == 0, log[-3000:]
    assert "preemption: JAX preemption sync point" in log
  stops = [re.findall(r"aepo: preempted; stopped after step (\d+) with a checkpoint at \S+/checkpoints/(\d+)", log)
           for log in logs]
  assert stops[0] == stops[1] and len(stops[0]) == 1, stops
  step = int(stops[0][0][0])
  # The step in progress when the notice had spread (JAX polls for it once a second), or one after it.
  assert 1 <= step < total, f"SIGTERM came too late: stopped after step {step} of {total}"
  assert tp._ckpt_dirs(work) == ["0", str(step), "reference"]
  assert [r["step"] for r in tp._rows(work)] == list(range(1, step + 1))



# Process argv[2] of 2 (coordinator port argv[1]) runs empty 0.5 s "steps" with StopRequests, JAX's preemption
# service on or off (argv[3]); prints the mode, each step as it begins, the step it stops after, and the cost of
# one should_stop.
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
  print("STEP", step, flush=True)
  time.sleep(0.5)
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
  port, files = free_port(), [tmp_path / f"process_{i}.log" for i in range(2)]
  # SIGTERM to process 1 only, as its step 3 begins (0.5 s before that step's check).
  ran = run_together([[sys.executable, "-c", STOP_LOOP, str(port), str(i), service] for i in range(2)],
                     [tp._env(1)] * 2, tmp_path, timeout=300,
                     while_running=lambda procs: sigterm_when(
                         procs, 1, lambda: "STEP 3\n" in files[1].read_text(), "process 1 began step 3", files))
  logs = [log for _, log in ran]
  for rc, log in ran:
    assert rc == 0 and f"MODE {mode}" in log, log[-3000:]
  stops = [re.findall(r"STOP (\d+)", log) for log in logs]
  # The step of the signal, or a later one with JAX's notifier (it polls for SIGTERM once a second).
  assert stops[0] == stops[1] and 3 <= int(stops[0][0]) <= (3 if mode == "allgather" else 6), stops
  cost_ms = float(re.search(r"COST_MS (\S+)", logs[0]).group(1))
  assert cost_ms < (1.0 if mode == "jax" else 100.0), cost_ms  # measured: ~0.0002 ms (jax), ~6 ms (allgather)
