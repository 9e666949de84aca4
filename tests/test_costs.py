"""Program costs in the memory plans: the chips table and its lookups, the roofline arithmetic, XLA's flops
for a compiled matmul (per device once sharded), and the plan's table and JSON report carrying them."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax import chips, sharding
from ares_jax import compiled_memory as cm

GIB = cm.GIB


@pytest.mark.parametrize("kind, key", [
    ("TPU v4", "v4"), ("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"),
    ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
    ("cpu", None), ("TPU v4 lite", None), ("NVIDIA H100 PCIe", None), ("NVIDIA H100 NVL", None),
    ("NVIDIA H200 NVL", None), ("NVIDIA GH200 480GB", None), ("NVIDIA A100-SXM4-80GB", None)])
def test_device_kinds_name_their_chip_or_none(kind, key):
  assert chips.from_device_kind(kind) is (chips.CHIPS[key] if key else None)


@pytest.mark.parametrize("topology, key", [
    ("v4:2x2x1", "v4"), ("v5e:2x4", "v5e"), ("v5litepod:2x4", "v5e"), ("v5p:2x2x1", "v5p"), ("v6e:2x4", "v6e"),
    ("cpu:8", None), ("v7x:2x2x1", None)])
def test_topology_names_name_their_chip_or_none(topology, key):
  assert chips.from_topology(topology) is (chips.CHIPS[key] if key else None)


def test_the_table_holds_the_public_figures():
  """bf16 dense peak (TFLOP/s), HBM bandwidth (GB/s), HBM (GiB), TensorCores: the sources in chips.py."""
  got = {k: (c.peak_flops / 1e12, c.hbm_bandwidth / 1e9, c.hbm_gib, c.tensorcores) for k, c in chips.CHIPS.items()}
  assert got == {"v4": (275, 1200, 32, 2), "v5e": (197, 819, 16, 1), "v5p": (459, 2765, 95, 2),
                 "v6e": (918, 1640, 32, 1), "h100": (989, 3350, 80, 1), "h200": (989, 4800, 141, 1)}
  assert all(c.source.startswith("https://") for c in chips.CHIPS.values())


def test_a_device_with_fewer_cores_than_its_chip_is_that_share_of_it():
  """`topologies` describes a v4 slice per TensorCore (num_cores 1 of 2), v5p as megacore (2 of 2)."""
  v4_core = types.SimpleNamespace(device_kind="TPU v4", num_cores=1)
  v5p = types.SimpleNamespace(device_kind="TPU v5", num_cores=2)
  gpu = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")  # no num_cores
  half = chips.for_device(v4_core)
  assert half.per_chip == 2 and half.peak_flops == 137.5e12 and half.hbm_bandwidth == 600e9 and half.hbm_gib == 16
  assert chips.for_device(v5p) == chips.Device(chips.CHIPS["v5p"])
  assert chips.for_device(gpu) == chips.Device(chips.CHIPS["h100"])
  assert chips.for_device(jax.devices()[0]) is None  # CPU: no roofline, no error


def test_roofline_is_the_slower_of_compute_and_memory():
  v5p = chips.Device(chips.CHIPS["v5p"])
  # 918 TFLOP at 459 TFLOP/s = 2 s against 2.765 GB at 2765 GB/s = 1 ms: compute-bound
  assert v5p.roofline_s(918e12, 2.765e9) == pytest.approx(2.0)
  # 1 GFLOP (2.2 us) against 27.65 GB (10 ms): memory-bound
  assert v5p.roofline_s(1e9, 27.65e9) == pytest.approx(0.010)
  # half a v4 chip: 275 TFLOP at 137.5 TFLOP/s
  assert chips.Device(chips.CHIPS["v4"], 2).roofline_s(275e12, 0.0) == pytest.approx(2.0)
  assert v5p.roofline_s(None, 1e9) is None and v5p.roofline_s(1e9, None) is None
  assert v5p.describe() == {"name": "TPU v5p", "devices_per_chip": 1, "peak_flops": 459e12, "hbm_bandwidth": 2765e9,
                            "hbm_gib": 95.0, "source": chips.CHIPS["v5p"].source}


def test_compiled_matmul_reports_2mnk_flops_per_device():
  """CPU XLA counts a dot's flops; sharded 8 ways, each device's program does an eighth of them."""
  m, k, n = 64, 32, 16
  mesh = sharding.make_mesh(fsdp=8, devices=jax.devices()[:8])
  rows, rep = NamedSharding(mesh, PartitionSpec("fsdp", None)), NamedSharding(mesh, PartitionSpec())
  matmul = jax.jit(lambda a, b: a @ b)
  whole = cm.compile_program(matmul, jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=rep),
                             jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=rep), mesh=mesh)
  split = cm.compile_program(matmul, jax.ShapeDtypeStruct((m, k), jnp.float32, sharding=rows),
                             jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=rep), mesh=mesh)
  assert whole.flops == 2 * m * n * k and split.flops == 2 * m * n * k / 8
  # at least the operands and the result, once
  assert whole.bytes_accessed >= 4 * (m * k + k * n + m * n)
  assert split.bytes_accessed >= 4 * (m * k + m * n) / 8 + 4 * k * n
  plan = cm.plan_row("matmul", "64 x 32 x 16", split, 0, 1.0)
  assert (plan.flops, plan.bytes_accessed) == (split.flops, split.bytes_accessed)


def test_cost_without_figures_is_none():
  """cost_analysis() as a dict (jax 0.10), a list of one dict (older jax), empty, None, or unimplemented."""
  def compiled(result):
    def cost_analysis():
      if isinstance(result, Exception):
        raise result
      return result
    return types.SimpleNamespace(cost_analysis=cost_analysis)
  figures = {"flops": 8.0, "bytes accessed": 96.0, "utilization0{}": 1.0}
  assert cm.cost(compiled(figures)) == (8.0, 96.0)
  assert cm.cost(compiled([figures])) == (8.0, 96.0)
  assert cm.cost(compiled({"bytes accessed": 96.0})) == (0.0, 96.0)  # a copy: XLA leaves out zero flops
  for nothing in ({}, [], None, NotImplementedError("no cost model")):
    assert cm.cost(compiled(nothing)) == (None, None)


def test_plan_table_and_report_carry_the_costs():
  """plan.py's table gains GFLOP, GiB accessed and roofline ms after the verdict (the memory columns as
  before); the JSON report has them per program and the chip figures used; no chip: '-' and None."""
  from ares_jax import plan  # pylint: disable=g-import-not-at-top
  hbm = 95 * GIB
  roll = cm.ProgramPlan("rollout chunk", "8 prompts", GIB, 0, 0, 2 * GIB, 0, hbm, 4.59e12, 2.765e9)
  restore = cm.ProgramPlan("AEPO restore", "train state", 0, GIB, 0, 0, GIB, hbm)
  device = chips.Device(chips.CHIPS["v5p"])
  rows = [roll.row(0.95, device), restore.row(0.95, device)]
  assert rows[0]["roofline_s"] == pytest.approx(0.01) and rows[1]["roofline_s"] is None
  lines = plan.format_table(rows, "v5p:2x2x1", 95.0, 0.95, device).splitlines()
  assert lines[2] == ("| program | shapes | args | out | temp | resident | peak | verdict | GFLOP | GiB accessed "
                      "| roofline ms |")
  assert lines[4] == "| rollout chunk | 8 prompts | 1.00 | 0.00 | 2.00 | 0.00 | 3.00 | fits | 4,590 | 2.58 | 10 |"
  assert lines[5] == "| AEPO restore | train state | 0.00 | 1.00 | 0.00 | 1.00 | 2.00 | fits | - | - | - |"
  assert "one decode step" in lines[-1] and "TPU v5p" in lines[-1] and "459.0 TFLOP/s" in lines[-1]
  report = plan.report(rows, "v5p:2x2x1", 95.0, 0.95, device)
  assert report["chip"]["name"] == "TPU v5p" and report["chip"]["peak_flops"] == 459e12
  assert {"flops", "bytes_accessed", "roofline_s", "peak_gib", "fits"} <= set(report["programs"][0])
  cpu_rows = [roll.row(0.95)]
  assert cpu_rows[0]["roofline_s"] is None and cpu_rows[0]["flops"] == 4.59e12
  assert plan.format_table(cpu_rows, "cpu:8", 1.0, 0.95).splitlines()[4].endswith("| fits | 4,590 | 2.58 | - |")
  assert plan.report(cpu_rows, "cpu:8", 1.0, 0.95)["chip"] is None


@pytest.mark.slow
def test_tpu_topology_devices_get_their_share_of_the_chip():
  """With libtpu: v4:2x2x1 is described as 8 TensorCore devices (half a chip's HBM and rates each);
  v5p:2x2x1 as 4 megacore devices (a whole chip each)."""
  pytest.importorskip("libtpu")
  devices, hbm = cm.topology_devices("v4:2x2x1")
  assert len(devices) == 8 and hbm == 16.0 and chips.for_device(devices[0]).per_chip == 2
  devices, hbm = cm.topology_devices("v5p:2x2x1")
  assert len(devices) == 4 and hbm == 95.0 and chips.for_device(devices[0]) == chips.Device(chips.CHIPS["v5p"])
