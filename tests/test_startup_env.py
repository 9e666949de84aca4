"""What JAX, libtpu and transformers are told before they start (`ares_jax.startup_env`): the decision as a
function of the environment, the device files and the JAX plugins; and a CPU process that imports ares_jax
then JAX, or describes a TPU topology, printing nothing of libtpu's."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys

import pytest

from ares_jax import startup_env
from tiny_configs import ROOT

LIBTPU = {"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1",
          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def test_a_cpu_machine_gets_cpu_and_libtpus_single_host_answers():
  assert startup_env.decide({}, []) == {**LIBTPU, "JAX_PLATFORMS": "cpu"}
  # /dev/vfio/vfio is the VFIO control file of any machine with the module loaded: no TPU group
  assert startup_env.decide({"HOME": "/root"}, ["/dev/vfio/vfio"]) == {**LIBTPU, "JAX_PLATFORMS": "cpu"}


def test_what_the_user_set_is_kept():
  env = {"JAX_PLATFORMS": "cpu,tpu", "TPU_WORKER_HOSTNAMES": "10.0.0.2", "ALLOW_MULTIPLE_LIBTPU_LOAD": "0"}
  assert startup_env.decide(env, []) == {"TPU_SKIP_MDS_QUERY": "1", "TPU_HOST_BOUNDS": "1,1,1"}
  # an empty JAX_PLATFORMS is JAX's "choose for me": chosen here
  assert startup_env.decide({"JAX_PLATFORMS": ""}, [])["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("files, env", [
    (["/dev/accel0", "/dev/accel1"], {}),  # TPU v2-v4
    (["/dev/vfio/vfio", "/dev/vfio/0"], {}),  # v5e, v5p, v6e: an IOMMU group per chip
    ([], {"TPU_ACCELERATOR_TYPE": "v5p-8"}),  # libtpu configured by hand
    ([], {"JAX_FORCE_TPU_INIT": "1"}),
])
def test_nothing_is_set_where_a_tpu_is_attached(files, env):
  assert startup_env.decide(env, files) == {}


@pytest.mark.parametrize("files, plugins, expected", [
    (["/dev/nvidia0", "/dev/nvidiactl"], ["xla_cuda12"], "cuda,cpu"),
    (["/dev/nvidiactl"], [], "cpu"),  # a GPU without JAX's CUDA plugin: JAX would use the CPU anyway
    ([], ["xla_cuda12"], "cpu"),  # the plugin without a GPU
    (["/dev/kfd"], ["xla_rocm7"], "rocm,cpu"),
    (["/dev/nvidia0"], ["xla_cuda12", "metal_plugin"], None),  # a plugin of unknown kind: JAX chooses
])
def test_gpu_platforms_where_device_and_plugin_are_both_there(files, plugins, expected):
  out = startup_env.decide({}, files, plugins)
  assert out.get("JAX_PLATFORMS") == expected
  assert {k: out[k] for k in LIBTPU} == LIBTPU  # libtpu is quiet all the same


def test_libtpus_advice_to_delete_its_lockfile_is_cut():
  busy = ("Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process with pid 12. Not "
          "attempting to load libtpu.so in this process. Please use lsof /dev/accel0 to figure out which process is "
          'using the TPU. If you still get this message, run "$ sudo rm /tmp/libtpu_lockfile".')
  assert startup_env.without_delete_advice(busy) == busy[:busy.index(" If you still")]
  assert startup_env.without_delete_advice(
      'Internal error when accessing libtpu multi-process lockfile. Run "$ sudo rm /tmp/libtpu_lockfile".'
  ) == "Internal error when accessing libtpu multi-process lockfile."
  # as JAX logs it (importing ares_jax installed the filter)
  record = logging.LogRecord("jax._src.xla_bridge", logging.INFO, __file__, 1, "%s", (busy,), None)
  assert logging.getLogger("jax._src.xla_bridge").filter(record)
  assert "sudo" not in record.getMessage() and "already in use" in record.getMessage()


def test_transformers_pytorch_advice_is_dropped_and_nothing_else():
  def kept(message):
    return bool(logging.getLogger("transformers").filter(
        logging.LogRecord("transformers", logging.WARNING, __file__, 1, message, (), None)))
  assert not kept("PyTorch was not found. Models won't be available and only tokenizers, configuration and "
                  "file/data utilities can be used.")
  assert kept("Some other transformers warning")


def _quiet_env() -> dict[str, str]:
  """This environment less what JAX and libtpu read (tests/conftest.py sets JAX_PLATFORMS and more)."""
  return {k: v for k, v in os.environ.items()
          if not (k.startswith(("JAX_", "TPU_", "XLA_")) or k == "ALLOW_MULTIPLE_LIBTPU_LOAD")}


def test_a_cpu_process_prints_nothing_of_libtpu():
  """`import ares_jax` then JAX's devices; then (with libtpu) a TPU topology described as the planner does."""
  if startup_env.tpu_attached(os.environ, startup_env.device_files()):
    pytest.skip("a TPU is attached: nothing is set")
  code = "import ares_jax, jax; print(jax.devices()[0].platform)"
  if importlib.util.find_spec("libtpu"):
    code += ("; from jax.experimental import topologies; "
             "print(len(topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x1').devices))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_quiet_env(), cwd=ROOT,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[:1] == ["cpu"] and proc.stdout.split()[1:] in ([], ["4"]), proc.stdout
  assert proc.stderr == "", proc.stderr[-3000:]
