"""What XLA's cost analysis leaves out of a program with loops, read from its optimized HLO text.

`cost_analysis()` walks each computation of a module once, so a while loop's body is counted once whatever
its trip count: a `lax.scan` over 28 decoder layers reports one layer's flops and bytes, and the
collectives in its body are seen once. The trip count of every loop XLA can bound (a scan, a `fori_loop`
with static bounds) is in the optimized HLO: written by XLA on CPU (`known_trip_count`), read from the
loop itself on TPU (`hlo_text.TripCounter`).

`loop_cost(text)` counts, per computation, what XLA's cost model counts that matters at scale:
  flops       matrix products: a dot's 2 x output elements x contracted elements, a convolution's
              2 x output elements x kernel elements per output feature (TPU compiles dots as convolutions);
              elementwise work (a few flops per element against a product's thousands) is not counted.
  bytes       each top-level instruction's operands and output, as XLA's model does it for a fusion: an
              operand the fusion only slices counts as the slices read, an in-place update as the update
              written; bitcasts, tuples, parameters and loop plumbing move nothing.
  collectives the bytes every collective produces per device (an async pair counted at its start).
and returns the module's totals with each loop body x its known trip count ("run") and with every body
once ("xla", what the cost analysis saw). A conditional counts the least of its branches' figures (flops,
bytes and collectives each): which branch runs is decided on the data, and only the data fixes how often
the dear one does. In these programs that is blockwise attention skipping a tile no query of which may see
a key of it (a 7B row's causal triangle computes about half its tiles; the vision tower's whole-image layers
a few per row of tiles) and the vision tower choosing, layer by layer, whole-image attention (4 of 32
layers) or windows. Such work is therefore not counted past each loop's first run: the figures are a low
bound by its share (XLA itself takes the dearest branch, once). `compiled_memory.compile_program` adds
run - xla to XLA's own figures. A loop whose trip count XLA does not know (a decode loop that stops when
every slot is done) stays counted once: `step_time` multiplies such a program by its own estimate of the
steps. Matrix products XLA hands to a library (a GPU's cublas custom calls) and Pallas kernels are not
seen here, as they are not by the cost analysis.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

from ares_jax.hlo_text import Instruction, TripCounter, array_bytes, callees, dims, parse

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# instructions that move no bytes of their own (plumbing, views) or whose cost is their callee's
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-update", "async-done",
         "add-dependency", "domain", "iota"}
_SLICES = {"dynamic-slice", "slice", "gather"}


@dataclasses.dataclass(frozen=True)
class LoopCost:
  """A module's flops, bytes accessed and collective bytes per device: `run` with every while body times
  its known trip count, `xla` with every body once (as the cost analysis counts them)."""

  run: tuple[float, float, float]
  xla: tuple[float, float, float]
  loops: tuple[tuple[str, Optional[int]], ...]  # each while instruction and its known trip count (None: unknown)

  @property
  def missing(self) -> tuple[float, float, float]:
    """What the cost analysis leaves out: run - xla (flops, bytes, collective bytes)."""
    return tuple(r - x for r, x in zip(self.run, self.xla))


def _matmul_flops(ins: Instruction, shapes: dict[str, str]) -> float:
  out = math.prod(dims(ins.shape))
  if ins.opcode == "dot":
    lhs = dims(shapes.get(ins.operands[0], ""))
    found = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    contracted = math.prod(lhs[int(d)] for d in found.group(1).split(",") if d) if found and lhs else 1
    return 2.0 * out * contracted
  return _convolution_flops(ins, shapes)


def _window(attrs: str, key: str, n: int, default: int) -> list[int]:
  found = re.search(rf"\b{key}=([0-9x_]+)", attrs)
  return [int(v) for v in found.group(1).split("x")] if found else [default] * n


def _taps(size_in: int, size_k: int, size_out: int, stride: int, pad_low: int, lhs_dilate: int,
          rhs_dilate: int) -> int:
  """(output, kernel) position pairs of one spatial dimension that land on an input element (not padding,
  not a hole of lhs dilation): XLA's `valid_position_counts`. TPU writes batched products as
  convolutions whose batch dimensions are windows with lhs dilation, one tap per output."""
  count = 0
  for k in range(size_k):
    c = k * rhs_dilate - pad_low
    if lhs_dilate == 1:  # 0 <= o * stride + c <= size_in - 1
      lo, hi = max(0, -(c // stride)), min(size_out - 1, (size_in - 1 - c) // stride)
      count += max(0, hi - lo + 1)
      continue
    for o in range(size_out):
      at = o * stride + c
      count += at >= 0 and at % lhs_dilate == 0 and at // lhs_dilate < size_in
  return count


def _convolution_flops(ins: Instruction, shapes: dict[str, str]) -> float:
  """XLA's convolution count: 2 x batch / batch groups x input features / feature groups x output features
  x each spatial dimension's valid (output, kernel) pairs."""
  lhs, kernel = dims(shapes.get(ins.operands[0], "")), dims(shapes.get(ins.operands[1], ""))
  out = dims(ins.shape)
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
  if not lhs or not kernel or labels is None:
    return 0.0
  lhs_l, k_l, out_l = labels.groups()
  spatial = sorted(ch for ch in lhs_l if ch.isdigit())
  n = len(spatial)
  size, stride = _window(ins.attrs, "size", n, 1), _window(ins.attrs, "stride", n, 1)
  lhs_dilate, rhs_dilate = _window(ins.attrs, "lhs_dilate", n, 1), _window(ins.attrs, "rhs_dilate", n, 1)
  pad = re.search(r"\bpad=([0-9_x-]+)", ins.attrs)
  pads = [int(p.split("_")[0]) for p in pad.group(1).split("x")] if pad else [0] * n
  taps = math.prod(_taps(lhs[lhs_l.index(d)], kernel[k_l.index(d)], out[out_l.index(d)], stride[j], pads[j],
                         lhs_dilate[j], rhs_dilate[j]) for j, d in enumerate(spatial))
  groups = lambda key: int(m.group(1)) if (m := re.search(rf"{key}=([0-9]+)", ins.attrs)) else 1
  batch, features = lhs[lhs_l.index("b")], lhs[lhs_l.index("f")]
  return 2.0 * batch / groups("batch_group_count") * features / groups("feature_group_count") * \
      kernel[k_l.index("o")] * taps


class _Module:
  """Per-computation costs of one parsed module, each computation's total memoized per counting rule."""

  def __init__(self, text: str):
    self.computations, self.entry = parse(text)
    self.shapes = {c: {i.name: i.shape for i in ins} for c, ins in self.computations.items()}
    self.computations_by_name = {c: {i.name: i for i in ins} for c, ins in self.computations.items()}
    counter = TripCounter(self.computations)
    self.trips = {(c, i.name): counter.trips(c, i) for c, ins in self.computations.items() for i in ins
                  if i.opcode == "while"}
    self._totals: dict[tuple[str, bool, bool], tuple[float, float, float]] = {}

  def _is_view(self, ins: Instruction) -> bool:
    """A bitcast, or a nested fusion that only copies its operand to another tiling (TPU fuses such
    layout changes, aliased in place, in front of a slice or an update of a loop's stacked buffer)."""
    if ins.opcode == "bitcast":
      return True
    inner = self.computations.get(callees(ins)[0], []) if ins.opcode == "fusion" else []
    return bool(inner) and all(f.opcode in ("parameter", "copy", "bitcast") for f in inner) and len(ins.operands) == 1

  def _users(self, computation: str, name: str) -> list[tuple[Instruction, str]]:
    """(user, the name it uses) of a value in a fused computation, looking through views (`_is_view`)."""
    found = []
    for f in self.computations.get(computation, []):
      if name in f.operands:
        found += self._users(computation, f.name) if self._is_view(f) else [(f, name)]
    return found

  def _operand_bytes(self, ins: Instruction, shapes: dict[str, str]) -> float:
    """Bytes a fusion reads of its operands: a parameter the fused computation only slices counts as the
    slices, one it updates in place as nothing (the update is counted as the output)."""
    fused = callees(ins)[0] if ins.opcode == "fusion" else ""
    # `parameter(2)` parses as an operand named "2"
    by_index = {int(f.operands[0]): f.name for f in self.computations.get(fused, [])
                if f.opcode == "parameter" and f.operands}
    total = 0.0
    for k, operand in enumerate(ins.operands):
      full = array_bytes(shapes.get(operand, ""))
      users = self._users(fused, by_index[k]) if k in by_index else [(ins, operand)]
      read = 0.0
      for user, used in users:
        if user.opcode in _SLICES and user.operands[0] == used:
          read += array_bytes(user.shape)
        elif not (user.opcode == "dynamic-update-slice" and user.operands[0] == used):
          read = full
          break
      total += min(full, read)
    return total

  def _written(self, computation: str, name: str, shapes: dict[str, str]) -> float:
    """Bytes a fusion's output writes: an in-place update its update, a tuple its elements."""
    ins = self.computations_by_name.get(computation, {}).get(name)
    if ins is None:
      return 0.0
    if ins.opcode == "dynamic-update-slice":
      return array_bytes(shapes.get(ins.operands[1], ""))
    if ins.opcode in ("tuple", "bitcast"):
      return sum(self._written(computation, o, shapes) for o in ins.operands)
    return array_bytes(ins.shape)

  def _output_bytes(self, ins: Instruction, shapes: dict[str, str]) -> float:
    if ins.opcode != "fusion":
      return array_bytes(ins.shape)
    fused = callees(ins)[0]
    root = next((f for f in self.computations.get(fused, []) if f.root), None)
    return array_bytes(ins.shape) if root is None else self._written(fused, root.name, self.shapes.get(fused, {}))

  def _bytes(self, ins: Instruction, shapes: dict[str, str]) -> float:
    if ins.opcode in _FREE or ins.opcode.endswith("-done"):
      return 0.0
    if ins.opcode in _SLICES:
      return 2.0 * array_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
      return 2.0 * array_bytes(shapes.get(ins.operands[1], ""))
    return self._operand_bytes(ins, shapes) + self._output_bytes(ins, shapes)

  def total(self, computation: str, counted: bool, fused: bool = False) -> tuple[float, float, float]:
    """(flops, bytes, collective bytes) of one run of `computation` and what it calls; `counted`: while
    bodies times their known trip counts; `fused`: inside a fusion (its bytes are the fusion's)."""
    key = (computation, counted, fused)
    if key not in self._totals:
      self._totals[key] = self._total(computation, counted, fused)
    return self._totals[key]

  def _total(self, computation: str, counted: bool, fused: bool) -> tuple[float, float, float]:
    flops = moved = collective = 0.0
    shapes = self.shapes.get(computation, {})
    for ins in self.computations.get(computation, []):
      if ins.opcode in ("dot", "convolution"):
        flops += _matmul_flops(ins, shapes)
      base = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") else ins.opcode
      if base in _COLLECTIVES:
        collective += array_bytes(ins.shape)
      if not fused:
        moved += self._bytes(ins, shapes)
      called = callees(ins)
      if ins.opcode in ("all-reduce", "reduce-scatter", "reduce", "map", "sort", "scatter", "select-and-scatter",
                        "reduce-window", "all-reduce-start"):
        continue  # their to_apply is a scalar function
      times = (self.trips[computation, ins.name] or 1) if counted and ins.opcode == "while" else 1
      parts = [self.total(c, counted, fused or ins.opcode == "fusion") for c in called]
      if ins.opcode == "conditional" and parts:  # one branch runs: the least of each figure (module docstring)
        parts = [tuple(min(figures) for figures in zip(*parts))]
      for f, b, c in parts:
        flops, moved, collective = flops + times * f, moved + times * b, collective + times * c
    return flops, moved, collective


def loop_cost(text: str) -> LoopCost:
  """The flops, bytes accessed and collective bytes of an optimized HLO module's entry computation, with
  its loops run (`LoopCost.run`) and each body once (`LoopCost.xla`)."""
  module = _Module(text)
  loops = tuple((name, n) for (_, name), n in module.trips.items())
  return LoopCost(module.total(module.entry, True), module.total(module.entry, False), loops)
