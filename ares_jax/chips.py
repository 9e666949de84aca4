"""Accelerator chips' peak rates: the roofline time of a compiled program on one device.

XLA's cost analysis gives a program's flops and bytes accessed per device, but JAX does not expose a
device's peak FLOP/s or HBM bandwidth, so they are a table here, from the vendors' public pages. A
roofline time is max(flops / peak, bytes / bandwidth): a lower bound that ignores communication, kernel
launch gaps and whatever XLA's cost model does not see (Pallas kernels, see docs/design.md §10.4).

A chip is not always one JAX device. TPU v4 and v5p chips have two TensorCores; on real hardware JAX
runs them as one "megacore" device, but `jax.experimental.topologies` describes a v4 slice with one
device per TensorCore (`v4:2x2x1`: 8 devices with `num_cores` 1, two per chip coordinate; `v5p:2x2x1`:
4 devices with `num_cores` 2; checked with the libtpu wheel of jax 0.10.2). `for_device` divides the
chip's rates and HBM by the devices it is split into, from the device's `num_cores`.

Nothing here imports JAX: devices are read through their `device_kind` and `num_cores` attributes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip's dense bf16 peak, HBM bandwidth and capacity, and where the figures come from."""

  name: str
  peak_flops: float  # dense bf16 FLOP/s (no structured sparsity)
  hbm_bandwidth: float  # bytes/s
  hbm_gib: float
  tensorcores: int  # TPU TensorCores per chip (1 for GPUs: one device per chip)
  source: str


CHIPS = {
    # https://cloud.google.com/tpu/docs/v4 (system architecture): "Each TPU v4 chip contains two
    # TensorCores"; peak compute per chip 275 teraflops (bf16 or int8); HBM2 32 GiB, 1200 GBps.
    "v4": Chip("TPU v4", 275e12, 1200e9, 32.0, 2, "https://cloud.google.com/tpu/docs/v4"),
    # https://cloud.google.com/tpu/docs/v5e (system architecture): one TensorCore per chip; 197 TFLOPs
    # bf16; HBM2 16 GB, 819 GBps.
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16.0, 1, "https://cloud.google.com/tpu/docs/v5e"),
    # https://cloud.google.com/tpu/docs/v5p (system architecture): 2 TensorCores per chip; 459 TFLOPs
    # bf16; HBM 95 GiB, 2765 GBps.
    "v5p": Chip("TPU v5p", 459e12, 2765e9, 95.0, 2, "https://cloud.google.com/tpu/docs/v5p"),
    # https://cloud.google.com/tpu/docs/v6e (system architecture, Trillium): one TensorCore per chip;
    # 918 TFLOPs bf16; HBM 32 GB, 1640 GBps (1638 GBps in the page's latest revision; 1640 kept, as in
    # docs/design.md §10.4: the difference is 0.1%).
    "v6e": Chip("TPU v6e", 918e12, 1640e9, 32.0, 1, "https://cloud.google.com/tpu/docs/v6e"),
    # NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 Tensor Core 1,979 TFLOPS "with sparsity"
    # (989 dense, half); GPU memory 80 GB HBM3 (five 16 GiB stacks), bandwidth 3.35 TB/s.
    "h100": Chip("NVIDIA H100 SXM", 989e12, 3.35e12, 80.0, 1,
                 "https://www.nvidia.com/en-us/data-center/h100/ (datasheet, SXM)"),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: BF16 Tensor Core 1,979 TFLOPS with sparsity
    # (989 dense); GPU memory 141 GB HBM3e, bandwidth 4.8 TB/s. (The GPU capacities are for reading only:
    # the planner takes a real GPU's HBM from its allocator, `compiled_memory.device_hbm_gib`.)
    "h200": Chip("NVIDIA H200 SXM", 989e12, 4.8e12, 141.0, 1,
                 "https://www.nvidia.com/en-us/data-center/h200/ (datasheet, SXM)"),
}

# The prefix of a topology name (`python -m ares_jax.plan --topology=v5e:2x4`) -> table key.
_TOPOLOGY_PREFIXES = {"v4": "v4", "v5e": "v5e", "v5litepod": "v5e", "v5p": "v5p", "v6e": "v6e"}

# `jax.Device.device_kind` (lowercased) -> table key. TPU kinds as libtpu names them ("TPU v5 lite" is
# v5e, plain "TPU v5" is v5p); GPU kinds as the driver names them. H100 PCIe / NVL, H200 NVL and GH200 are
# other chips (lower clocks or other memory) and stay unknown.
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5": "v5p", "tpu v5p": "v5p",
                 "tpu v6 lite": "v6e", "tpu v6e": "v6e"}
_GPU_KINDS = ((re.compile(r"nvidia h100( sxm5?)?( 80gb)? hbm3$|nvidia h100 sxm5? 80gb$"), "h100"),
              (re.compile(r"nvidia h200( sxm5?)?( 141gb)?( hbm3e)?$"), "h200"))


def from_topology(topology: str) -> Optional[Chip]:
  """The chip of a planner topology name ("v5p:2x2x1", "v5e:2x4", ...); None for cpu:N and unknown names."""
  key = _TOPOLOGY_PREFIXES.get(topology.split(":", 1)[0].strip().lower())
  return CHIPS[key] if key else None


def from_device_kind(kind: str) -> Optional[Chip]:
  """The chip of a `device_kind` string ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...); None if unknown (CPU)."""
  kind = " ".join(kind.lower().split())
  if kind in _DEVICE_KINDS:
    return CHIPS[_DEVICE_KINDS[kind]]
  for pattern, key in _GPU_KINDS:
    if pattern.match(kind):
      return CHIPS[key]
  return None


@dataclasses.dataclass(frozen=True)
class Device:
  """What one JAX device has of its chip: all of it, or 1/`per_chip` (a TensorCore of a v4 chip)."""

  chip: Chip
  per_chip: int = 1

  @property
  def peak_flops(self) -> float:
    return self.chip.peak_flops / self.per_chip

  @property
  def hbm_bandwidth(self) -> float:
    return self.chip.hbm_bandwidth / self.per_chip

  @property
  def hbm_gib(self) -> float:
    return self.chip.hbm_gib / self.per_chip

  def roofline_s(self, flops: Optional[float], bytes_accessed: Optional[float]) -> Optional[float]:
    """max(flops / peak, bytes / bandwidth) in seconds; None when XLA reported no cost."""
    if flops is None or bytes_accessed is None:
      return None
    return max(flops / self.peak_flops, bytes_accessed / self.hbm_bandwidth)

  def describe(self) -> dict[str, Any]:
    """The per-device figures used, for a JSON report."""
    return {"name": self.chip.name, "devices_per_chip": self.per_chip, "peak_flops": self.peak_flops,
            "hbm_bandwidth": self.hbm_bandwidth, "hbm_gib": self.hbm_gib, "source": self.chip.source}


def for_device(device: Any) -> Optional[Device]:
  """The roofline figures of one JAX device (a real one or a topology's); None for an unknown kind (CPU).

  A device with fewer cores (`num_cores`) than its chip's TensorCores is that share of the chip."""
  chip = from_device_kind(getattr(device, "device_kind", ""))
  if chip is None:
    return None
  cores = getattr(device, "num_cores", None)
  if isinstance(cores, int) and 0 < cores < chip.tensorcores:
    return Device(chip, chip.tensorcores // cores)
  return Device(chip)
