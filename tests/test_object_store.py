"""Whole runs on `gs://` against a GCS API on loopback (fake-gcs-server, conftest's `gcs` fixture): gcsfs
carries the run's own files, tensorstore (orbax) the checkpoints' arrays, both to the emulator.

- an AEPO run with a gs:// workdir keeps everything in the bucket; SIGTERM mid-run (sent by the test once
  step 1's metrics are in the bucket) exits 0 with its checkpoint there; the relaunch continues step for step
  as an uninterrupted (local) run; a corrupt newest checkpoint in the bucket is moved aside and the one before
  used; the exported policy (written in place, config.json last) is the uninterrupted run's, byte for byte,
  and loads in transformers from a local copy;
- the object store refusing connections for 3 s in the middle of a checkpoint save and of a file write:
  both are retried (tensorstore's and gcsfs's own retries) and complete.
"""

from __future__ import annotations

import os
import re
import types

import numpy as np
import pytest

from ares_jax import models, storage
from ares_jax.train.checkpoint import Checkpointer
import test_preemption as tp
from test_preemption import _rows

pytestmark = pytest.mark.slow  # whole runs on gs://, killed and resumed


def _objects(prefix: str) -> list[str]:
  """Every object under `prefix`, as paths relative to it."""
  out, todo = [], [""]
  while todo:
    rel = todo.pop()
    for name in storage.listdir(f"{prefix}/{rel}" if rel else prefix):
      child = f"{rel}/{name}" if rel else name
      (todo if storage.isdir(f"{prefix}/{child}") else out).append(child)
  return sorted(out)


def _corrupt(step_dir: str) -> None:
  """Truncates every array data object of a checkpoint in the bucket to half its size."""
  data = [o for o in _objects(f"{step_dir}/state") if "/d/" in f"/{o}"]
  assert data
  for o in data:
    blob = storage.read_bytes(f"{step_dir}/state/{o}")
    storage.write_bytes(f"{step_dir}/state/{o}", blob[:len(blob) // 2])


@pytest.fixture(scope="module")
def gs_chain(gcs, tmp_path_factory, small_straight) -> types.SimpleNamespace:
  """The uninterrupted local run (conftest's `small_straight`); then on gs://: SIGTERM once step 1's metrics
  are written (it stops after step `stop`, 1 to 3, usually 2); the relaunch (to the end, policy exported); its
  newest checkpoint (4) corrupted in the bucket; the same command once more."""
  root = tmp_path_factory.mktemp("gs_chain")
  gcs.create_bucket("ares-chain")
  # The session's compilation cache (conftest.py): test_preemption's runs have the same shapes.
  common = tp.MAIN + tp.SMALL + [f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"]
  out = types.SimpleNamespace(straight=str(small_straight), work="gs://ares-chain/aepo", root=root)
  args = common + [f"--config.workdir={out.work}"]
  ckpts = f"{out.work}/checkpoints"
  out.rc1, out.log1 = tp._run(args, root / "sigterm.log", sigterm_after=(out.work, 1))
  out.stop = tp._stop_step(out.log1)
  out.steps1, out.rows1 = Checkpointer(ckpts).steps(), _rows(out.work)
  out.rc2, out.log2 = tp._run(args, root / "resume.log")
  out.rows2, out.policy2 = _rows(out.work), {o: storage.read_bytes(f"{out.work}/policy/{o}")
                                             for o in storage.listdir(f"{out.work}/policy")}
  _corrupt(f"{ckpts}/4")
  out.rc3, out.log3 = tp._run(args, root / "corrupt.log")
  out.rows3, out.listing3 = _rows(out.work), storage.listdir(ckpts)
  return out


@pytest.mark.xdist_group("gs_chain")
def test_sigterm_on_gs_exits_0_with_the_checkpoint_in_the_bucket(gs_chain):
  c = gs_chain
  s = c.stop
  assert c.rc1 == 0, c.log1[-3000:]
  assert re.search(rf"aepo: preempted; stopped after step {s} with a checkpoint at "
                   rf"gs://ares-chain/aepo/checkpoints/{s}(?!\d)", c.log1)
  assert c.steps1 == tp._kept(0, *range(2, s + 1, 2), s)  # 0, every second step, the stop step; two kept
  assert c.rows1 == _rows(c.straight)[:s]


@pytest.mark.xdist_group("gs_chain")
def test_the_relaunch_on_gs_continues_step_for_step_and_exports_the_same_policy(gs_chain):
  c = gs_chain
  assert c.rc2 == 0, c.log2[-3000:]
  assert re.search(rf"resumed from gs://ares-chain/aepo/checkpoints/{c.stop} \(data position {4 * c.stop}\)",
                   c.log2)
  assert c.rows2 == _rows(c.straight)
  local = os.path.join(c.straight, "policy")
  assert sorted(c.policy2) == sorted(os.listdir(local))
  for name, blob in c.policy2.items():  # the uninterrupted local run's policy, byte for byte
    with open(os.path.join(local, name), "rb") as f:
      assert f.read() == blob, name


@pytest.mark.xdist_group("gs_chain")
def test_a_corrupt_newest_checkpoint_in_the_bucket_is_moved_aside(gs_chain):
  c = gs_chain
  prev = tp._kept(0, 2, c.stop, 4)[0]  # the checkpoint before 4 (of those the two runs saved, two kept)
  assert c.rc3 == 0, c.log3[-3000:]
  assert re.search(r"checkpoint gs://ares-chain/aepo/checkpoints/4 is unreadable \(.*\); falling back", c.log3)
  assert re.search(rf"resumed from gs://ares-chain/aepo/checkpoints/{prev} ", c.log3)
  assert c.rows3 == _rows(c.straight)
  assert {str(prev), "4", "reference", "unreadable-4", "format.json"} <= set(c.listing3)


@pytest.mark.xdist_group("gs_chain")
def test_the_run_kept_everything_in_the_bucket_and_its_policy_loads_in_transformers(gs_chain):
  from transformers import Qwen2_5_VLForConditionalGeneration
  c = gs_chain
  names = set(storage.listdir(c.work))
  assert {"metrics.jsonl", "curves.png", "tensorboard", "checkpoints", "policy"} <= names
  assert not [n for n in names if n.startswith(".")]  # no temporary objects left behind
  assert not os.path.exists(os.path.join(tp.ROOT, "gs:"))  # nothing went to a local folder named after the URL
  policy = f"{c.work}/policy"
  _, params = models.load_hf(policy)
  with storage.local_folder(policy) as local:
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(local)
  got = dict(model.named_parameters())
  embed = got.get("model.language_model.embed_tokens.weight", got.get("model.embed_tokens.weight"))
  np.testing.assert_array_equal(embed.detach().numpy(), np.asarray(params["embed_tokens"]["embedding"]))


# Its own emulator, keeping objects in a folder (argv[1]) so that one started again on the same port finds
# them, in a fresh process (gcsfs and tensorstore read the emulator's address when they first connect): stopped
# before a checkpoint save and a file write begin (connection refused), started again 3 s later.
OUTAGE = """
import os, sys, threading, time
from ares_jax import gcs_emulator
emu = gcs_emulator.start(buckets=["outage"], root=sys.argv[1])
os.environ.update(emu.env)
import jax, jax.numpy as jnp, numpy as np
from ares_jax import storage
from ares_jax.train.checkpoint import Checkpointer
ck = Checkpointer("gs://outage/ck", async_save=True)
state = {"a": jnp.arange(1000.0), "b": jnp.ones((3, 4))}
ck.save(0, state, {"data_position": 0})
ck.wait()
emu.stop()
back = []
thread = threading.Thread(target=lambda: (time.sleep(3.0), back.append(gcs_emulator.start(port=emu.port, root=sys.argv[1]))))
t0 = time.monotonic()
thread.start()
ck.save(1, jax.tree.map(lambda x: x + 1, state), {"data_position": 4})
storage.write_json("gs://outage/run/report.json", {"written": "during the outage"})
ck.wait()
waited = time.monotonic() - t0
thread.join()
template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
restored = ck.restore_latest(template)
ck.close()
print("WAITED", waited >= 3.0, "STEPS", ck.steps(), "RESTORED", restored.step, restored.meta,
      float(restored.state["a"][7]), storage.read_json("gs://outage/run/report.json"), flush=True)
back[0].stop()
"""


def test_a_save_and_a_write_survive_the_object_store_refusing_connections_for_3_seconds(tmp_path):
  rc, log = tp._run(["-c", OUTAGE, str(tmp_path / "objects")], tmp_path / "outage.log")
  assert rc == 0, log[-3000:]
  assert ("WAITED True STEPS [0, 1] RESTORED 1 {'data_position': 4} 8.0 {'written': 'during the outage'}"
          in log), log[-3000:]
