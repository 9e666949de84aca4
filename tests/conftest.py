"""Test session setup: 8 simulated CPU devices and a compilation cache per worker (set before jax is imported);
a GCS API on loopback for the `gs://` tests (fixtures `gcs` and `bucket`).

Two tiers. `python -m pytest -q -n 2 --dist=loadgroup tests` runs everything (README, .ci/run). The quick
tier, `python -m pytest -q -n 2 -m "not slow" tests`, takes minutes and still exercises every module of
ares_jax/ (unit tests, small parity cases against transformers, one short AEPO step): whole pipelines,
multi-process runs, notebooks, memory plans and long runs are marked `slow`."""

import os
import sys
import tempfile
import uuid

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (installed for the TPU-topology memory plans) must not claim a TPU in every test process
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# A persistent XLA compilation cache per xdist worker, shared with the processes its tests start: the tiny
# model's programs compile once, not once per test (compiling is most of a short CPU run). Not one for all
# workers: JAX writes an entry in place (no temporary file and rename), and a worker that read an entry the
# other was still writing aborted in XLA's deserializer (once in a full run, 2026-12-06; perhaps the mapping
# limit below instead).
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"ares_jax_tests_xla_cache_{_worker}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, os.path.dirname(__file__))
# gcsfs reads this when it is imported: without it, it probes each bucket over gRPC, 60 s per probe on an emulator.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


# XLA's CPU runtime maps each compiled program's code and data into memory (about 7 mappings a program), and
# JAX keeps every program a live function compiled. A pytest worker that runs hundreds of tests reached Linux's
# limit of 65,530 mappings a process (vm.max_map_count), and then segfaulted in whatever mapped next: a compile,
# or loading a program from the compilation cache (full runs of 2026-12-06/07; a worker at 52,017 mappings
# 55% into one). Past MAX_MAPPINGS, the end of a test module drops JAX's compiled programs (later modules
# compile theirs again, or load them from the cache).
MAX_MAPPINGS = 20_000


def mappings() -> int | None:
  """This process's memory mappings (Linux), or None where /proc does not say."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


@pytest.fixture(scope="module", autouse=True)
def bounded_mappings():
  yield
  n = mappings()
  if n is not None and n > MAX_MAPPINGS and "jax" in sys.modules:
    import gc  # pylint: disable=g-import-not-at-top
    sys.modules["jax"].clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def gcs():
  """fake-gcs-server on a free loopback port (ares_jax.gcs_emulator), with this process's environment (and
  so every process a test starts) pointing gcsfs and tensorstore at it. One per xdist worker."""
  from ares_jax import gcs_emulator
  emu = gcs_emulator.start()
  saved = {k: os.environ.get(k) for k in emu.env}
  os.environ.update(emu.env)
  try:
    yield emu
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    emu.stop()


@pytest.fixture
def bucket(gcs):
  """`gs://<a new bucket>` on the emulator: every test starts from an empty one."""
  name = f"test-{uuid.uuid4().hex[:16]}"
  gcs.create_bucket(name)
  return f"gs://{name}"


@pytest.fixture(scope="session")
def small_straight(tmp_path_factory, worker_id):
  """The local workdir of the preemption tests' small AEPO run (test_preemption.SMALL), uninterrupted: what
  the interrupted runs of test_preemption.py and test_object_store.py must equal. Made once per session:
  xdist workers share it through a lock in the session's common temp folder."""
  import filelock  # pylint: disable=g-import-not-at-top
  import test_preemption as tp  # pylint: disable=g-import-not-at-top
  shared = tmp_path_factory.getbasetemp()
  shared = shared.parent if worker_id != "master" else shared
  work = shared / "small_straight"
  with filelock.FileLock(str(shared / "small_straight.lock")):
    if not (work / "metrics.jsonl").exists() or not (work / "policy" / "config.json").exists():
      cache = f"--config.compilation_cache_dir={os.environ['JAX_COMPILATION_CACHE_DIR']}"
      rc, log = tp._run(tp.MAIN + tp.SMALL + [cache, f"--config.workdir={work}"], shared / "small_straight.log")
      assert rc == 0, log[-3000:]
  return work
