"""Per-device memory and cost of compiled programs: topologies, abstract sharded arrays, what XLA reports.

The pieces of a memory plan that know nothing of a training step: the devices (and HBM) of a TPU
topology or of the run itself, per-device bytes of sharded trees, host arrays and the model's
parameters as the abstract sharded arrays jit would see, and one compiled program's arguments /
outputs / temporaries as `memory_analysis()` gives them, with its flops and bytes accessed as
`cost_analysis()` gives them (see `compile_program`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from ares_jax import chips, hlo_cost, models, sharding
from ares_jax.models import lora

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
  """One compiled program's per-device memory (bytes) and the resident state beside it, and its per-device
  flops and bytes accessed (XLA's cost analysis; None where no program ran or XLA reported none)."""

  name: str
  shapes: str
  args: int
  out: int
  alias: int  # outputs written into donated arguments (counted once)
  temp: int
  resident: int  # state alive during the program but not among its arguments
  hbm: int
  flops: Optional[float] = None
  bytes_accessed: Optional[float] = None
  collective_bytes: Optional[int] = None  # what the program's collectives produce per device (`hlo_cost`)
  extra: tuple[tuple[str, Any], ...] = ()  # further (key, value) pairs of the JSON row

  @property
  def peak(self) -> int:
    return self.resident + self.args + self.out - self.alias + self.temp

  def fits(self, usable: float) -> bool:
    return self.peak <= usable * self.hbm

  def row(self, usable: float, device: Optional[chips.Device] = None) -> dict[str, Any]:
    """The table's and the JSON report's row; `roofline_s` on `device` (None without one: a CPU)."""
    g = lambda b: round(b / GIB, 2)
    return {"name": self.name, "shapes": self.shapes, "args_gib": g(self.args), "out_gib": g(self.out - self.alias),
            "temp_gib": g(self.temp), "resident_gib": g(self.resident), "peak_gib": g(self.peak),
            "fits": self.fits(usable), "flops": self.flops, "bytes_accessed": self.bytes_accessed,
            "roofline_s": device.roofline_s(self.flops, self.bytes_accessed) if device else None,
            "collective_bytes": self.collective_bytes, **dict(self.extra)}


def topology_devices(topology: str, hbm_gib: float = 0.0) -> tuple[list[Any], float]:
  """The devices of `topology` ("v5p:2x2x1", ..., or "cpu:N") and their HBM in GiB (`hbm_gib` > 0 wins).

  HBM per device is the chip's (`chips`) over the devices it is described as: half a v4 chip's 32 GiB,
  since `topologies` describes a v4 slice with one device per TensorCore (`chips.for_device`)."""
  if topology.startswith("cpu:"):
    n = int(topology.split(":", 1)[1])
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--topology={topology}: only {len(devices)} CPU devices; set XLA_FLAGS="
                       f"--xla_force_host_platform_device_count={n} before JAX starts")
    if hbm_gib <= 0:
      raise ValueError(f"--topology={topology}: set --config.plan.hbm_gib (the memory to plan for per device)")
    return devices[:n], hbm_gib
  if hbm_gib <= 0 and chips.from_topology(topology) is None:
    raise ValueError(f"--topology={topology}: unknown HBM size; set --config.plan.hbm_gib")
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  except Exception as e:  # libtpu absent or an unknown name: say which
    raise ValueError(f"--topology={topology}: cannot describe this TPU topology ({e}); install the libtpu wheel "
                     "(pip install -e '.[plan]') or use --topology=cpu:N") from e
  devices = list(desc.devices)
  if hbm_gib > 0:
    return devices, hbm_gib
  device = chips.for_device(devices[0]) or chips.Device(chips.from_topology(topology))
  return devices, device.hbm_gib


def device_hbm_gib(device: Any, configured: float = 0.0) -> float:
  """`configured` if > 0, else a real device's allocator limit; on CPU, host memory / local devices."""
  if configured > 0:
    return configured
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return stats["bytes_limit"] / GIB
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GIB / max(jax.local_device_count(), 1)


def device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded abstract (or concrete) arrays."""
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):  # static arguments (configs) and None
      continue
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    itemsize = x.dtype.itemsize if hasattr(x.dtype, "itemsize") else 8  # typed PRNG keys: 2 x uint32
    total += math.prod(shape) * itemsize
  return total


def abstract_like(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host arrays (numpy, scalars, typed keys) -> ShapeDtypeStructs replicated on `mesh`, as jit places them."""
  rep = NamedSharding(mesh, PartitionSpec())

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, jax.dtypes.canonicalize_dtype(x.dtype), sharding=rep)
  return jax.tree.map(one, tree)


def abstract_params(mcfg: models.ModelConfig, mesh: jax.sharding.Mesh) -> Any:
  """The parameters as ShapeDtypeStructs in the param dtype, with the logical rules' shardings; a LoRA
  policy's frozen base in the compute dtype, as the run holds it (`lora.frozen_base`)."""
  boxed = models.abstract_params(mcfg)
  shardings = sharding.param_shardings(boxed, mesh)
  out = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(mcfg.param_dtype), sharding=s),
                     nn.unbox(boxed), shardings)
  if not mcfg.lora.enabled:
    return out
  base = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, mcfg.compute_dtype, sharding=x.sharding),
                      lora.base_params(out))
  return lora.with_adapters(base, lora.adapters(out))


@dataclasses.dataclass(frozen=True)
class Compiled:
  """A compiled program's abstract outputs, per-device memory, and per-device flops and bytes accessed."""

  out: Any  # ShapeDtypeStructs with shardings
  args: int
  out_bytes: int
  alias: int
  temp: int
  flops: Optional[float] = None
  bytes_accessed: Optional[float] = None
  collective_bytes: Optional[int] = None


_HBM_OOM = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT]?)\)")


def cost(compiled: Any) -> tuple[Optional[float], Optional[float]]:
  """(flops, bytes accessed) of a compiled program, per device; (None, None) where XLA reports none.

  `cost_analysis()` is a dict in jax 0.10 and a list of one dict in older versions; a backend may
  return None, an empty dict, or raise. XLA leaves zero figures out (a copy's dict has "bytes accessed"
  and no "flops"), so a figure missing from a non-empty dict is 0.

  The figures are one device's program after SPMD partitioning. Measured on 8 simulated CPU devices: a
  [512, 256] x [256, 128] f32 matmul reports 2*m*n*k = 33.6M flops unsharded and 4.19M (an eighth) with
  its rows sharded 8 ways; with the contracted dimension sharded, an eighth plus the all-reduce's adds
  (4.26M); compiled for `v5p:2x2x1` / `v4:2x2x1` (4 / 8 devices), a quarter / an eighth. A while loop's
  body is counted once whatever its trip count (a `fori_loop` of 10 matmuls reports one matmul's flops):
  `compile_program` adds the other runs of loops whose trip count XLA knows (`hlo_cost`); a rollout
  program's decode loop stops on its data and stays one decode step (docs/design.md §10.4)."""
  try:
    analysis = compiled.cost_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):  # a backend without a cost model (UNIMPLEMENTED)
    return None, None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None, None
  return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def _size(n: int) -> str:
  if not n:
    return "0"
  for unit, scale in (("GiB", GIB), ("MiB", 1 << 20)):
    if n >= scale // 10:
      return f"{n / scale:.{2 if unit == 'GiB' else 1}f} {unit}"
  return f"{n / 1024:.1f} KiB"


def _array(x: Any) -> str:
  return f"{x.dtype}[{','.join(str(d) for d in x.shape)}]"


def describe_call(fn: Callable, args: tuple, kwargs: dict) -> str:
  """What a program is compiled for, in one line: its name, each array argument's dtype[shape] (a tree of
  more than three arrays: its first, how many more and the bytes one device holds), each number's value;
  configs and other static objects left out. 'score(params: float32[64,32] +45 arrays (1.2 MiB/device);
  inputs: ...; prompt_width=96)'."""
  name = getattr(fn, "__name__", type(fn).__name__).lstrip("_")
  try:
    bound = list(inspect.signature(fn).bind(*args, **kwargs).arguments.items())
  except (TypeError, ValueError):  # no signature to bind to: positions
    bound = [*((f"arg{i}", a) for i, a in enumerate(args)), *kwargs.items()]
  parts = []
  for key, value in bound:
    if isinstance(value, (bool, int, float)):
      parts.append(f"{key}={value}")
      continue
    leaves = [x for x in jax.tree.leaves(value) if hasattr(x, "shape") and hasattr(x, "dtype")]
    if len(leaves) > 3:
      parts.append(f"{key}: {_array(leaves[0])} +{len(leaves) - 1} arrays ({_size(device_bytes(leaves))}/device)")
    elif leaves:
      parts.append(f"{key}: " + ", ".join(_array(x) for x in leaves))
  return f"{name}({'; '.join(parts)})"


def compile_program(fn: Callable, *args, mesh: jax.sharding.Mesh, **kwargs) -> Compiled:
  """`fn.lower(*args).compile()` under the mesh and the logical rules, as the run calls it, with a log line
  as it starts (`describe_call`) and one when it is done (its seconds and memory), flushed: a large
  program takes minutes to compile for a TPU.

  XLA refuses to compile a TPU program whose temporaries exceed HBM, naming what it wanted: that
  figure is the program's temporaries (its outputs are then unknown: counted as 0, and its cost is
  unknown). Flops and bytes accessed are per device: XLA's cost analysis (`cost`) plus what it leaves
  out of loops with a known trip count (every body past its first run, `hlo_cost`), and the bytes the
  program's collectives produce, loops counted the same way; both read from the optimized HLO that XLA
  dumps (a TPU module read back through `Compiled.as_text` can fail on its async wrappers:
  "async-update instruction should have 1 operands")."""
  what = describe_call(fn, args, kwargs)
  logging.info("compiling %s", what)
  start = time.perf_counter()
  on_cpu = mesh.devices.flat[0].platform == "cpu"
  with sharding.mesh_context(mesh), tempfile.TemporaryDirectory() as where:
    lowered = fn.lower(*args, **kwargs)
    try:
      # A CPU dump also writes each module's LLVM IR and object code (slow); its text reads back whole.
      compiled = lowered.compile(compiler_options=None if on_cpu else {"xla_dump_to": where,
                                                                      "xla_dump_hlo_as_text": True})
    except jax.errors.JaxRuntimeError as e:
      found = _HBM_OOM.search(str(e))
      if not found:
        raise
      temp = float(found.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": GIB, "T": GIB << 10}[found.group(2)]
      logging.info("compiled %s in %.1f s: temporaries %s per device, more than the device's memory (XLA)",
                   what.split("(", 1)[0], time.perf_counter() - start, _size(int(temp)))
      return Compiled(None, device_bytes((args, kwargs)), 0, 0, int(temp))
    texts = [open(os.path.join(where, p)).read() for p in os.listdir(where) if p.endswith("after_optimizations.txt")]
    loops = [hlo_cost.loop_cost(t) for t in ([compiled.as_text()] if on_cpu else texts)]
  m = compiled.memory_analysis()
  logging.info("compiled %s in %.1f s: arguments %s, outputs %s, temporaries %s per device", what.split("(", 1)[0],
               time.perf_counter() - start, _size(m.argument_size_in_bytes), _size(m.output_size_in_bytes),
               _size(m.temp_size_in_bytes))
  flops, bytes_accessed = cost(compiled)
  collective = None
  if loops:
    missing = [sum(x) for x in zip(*(c.missing for c in loops))]
    flops = None if flops is None else flops + missing[0]
    bytes_accessed = None if bytes_accessed is None else bytes_accessed + missing[1]
    collective = int(sum(c.run[2] for c in loops))
  return Compiled(compiled.out_info, int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                  int(m.alias_size_in_bytes), int(m.temp_size_in_bytes), flops, bytes_accessed, collective)


def plan_row(name: str, shapes: str, c: Compiled, resident: int, hbm_gib: float,
             extra: tuple[tuple[str, Any], ...] = ()) -> ProgramPlan:
  return ProgramPlan(name, shapes, c.args, c.out_bytes, c.alias, c.temp, resident, int(hbm_gib * GIB), c.flops,
                     c.bytes_accessed, c.collective_bytes, extra)
