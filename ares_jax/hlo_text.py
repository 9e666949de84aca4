"""An optimized HLO module's text as data: its computations and instructions, and its loops' trip counts.

XLA dumps the module it compiled (`xla_dump_to`, `*after_optimizations.txt`); `hlo_cost` counts what each
computation costs from what is parsed here. Only what those counts need is read: each instruction's name,
shape, opcode, operand names and attributes, and which computations it calls.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional

# what an instruction line is: [ROOT] %name = shape opcode(operands), attributes
_LINE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_ARRAY = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLEE = re.compile(r"\b(calls|body|condition|to_apply|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"([0-9]+)"\}')


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str  # "f32[32,64]{1,0}" or a tuple "(s32[], f32[8]{0})"
  opcode: str
  operands: tuple[str, ...]  # names
  attrs: str
  root: bool = False


def array_bytes(shape: str) -> int:
  """Bytes of every array in a shape ("f32[2,3]{1,0}", a tuple of them); pred is a byte, s4 / u4 a byte
  (rounded up), tokens and opaque types none."""
  total = 0
  for dtype, sizes in _ARRAY.findall(shape):
    bits = re.match(r"[a-z]+([0-9]+)", dtype)
    if bits is None and dtype != "pred":
      continue
    size = max(int(bits.group(1)) // 8, 1) if bits else 1
    total += size * math.prod(int(d) for d in sizes.split(",") if d)
  return total


def dims(shape: str) -> list[int]:
  """The first array's dimensions ("f32[2,3]{1,0}" -> [2, 3])."""
  found = _ARRAY.search(shape)
  return [int(d) for d in found.group(2).split(",") if d] if found else []


def _split_top(text: str) -> list[str]:
  """Split at the commas outside brackets and braces."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    if ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p.strip() for p in parts if p.strip()]


def _closing(text: str, start: int) -> int:
  """Index of the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += text[i] in "([{"
    depth -= text[i] in ")]}"
    if depth == 0:
      return i
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]!r}")


def _instruction(line: str) -> Optional[Instruction]:
  found = _LINE.match(line)
  if found is None:
    return None
  root, name, rest = found.groups()
  if rest.startswith("("):
    end = _closing(rest, 0) + 1
  else:
    end = rest.find(" ")
  shape, rest = rest[:end], rest[end:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if op is None:
    return None
  close = _closing(rest, op.end() - 1)
  operands = tuple(p.split()[-1].lstrip("%") for p in _split_top(rest[op.end():close]))
  return Instruction(name, shape, op.group(1), operands, rest[close + 1:], bool(root))


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation: its instructions}, the entry computation's name) of an HLO module's text."""
  computations: dict[str, list[Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      entry = header.group(1) if line.startswith("ENTRY") else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      ins = _instruction(line)
      if ins is not None:
        current.append(ins)
  return computations, entry


def callees(ins: Instruction) -> list[str]:
  names = []
  for _, value in _CALLEE.findall(ins.attrs):
    names += [v.strip().lstrip("%") for v in value.strip("{}").split(",") if v.strip()]
  return names


_PASS = {"copy", "convert", "bitcast", "reshape"}
_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE", "EQ": "EQ", "NE": "NE"}


class TripCounter:
  """The trip count of a counted loop, for backends that do not write XLA's `known_trip_count` (TPU): the
  condition compares a tuple element with a bound (`i < n`), the element starts at a constant and the body
  adds a constant to it; the bound and the step may be constants or tuple elements the body passes through
  unchanged from constant starts. Anything else (a loop that stops on its data) is unknown: None."""

  def __init__(self, computations: dict[str, list[Instruction]]):
    self.computations = computations
    self.by_name = {c: {i.name: i for i in ins} for c, ins in computations.items()}

  def _root(self, computation: str) -> Optional[Instruction]:
    ins = self.computations.get(computation, [])
    return next((i for i in ins if i.root), ins[-1] if ins else None)

  def form(self, computation: str, name: str, known: dict[int, int], env: Optional[dict] = None):
    """("const", c) or ("elem", tuple index, offset) of a scalar in a loop's body or condition (`known`:
    tuple elements that hold a constant throughout); None when it is neither. `env`: a fused computation's
    parameters as its caller's forms."""
    ins = self.by_name.get(computation, {}).get(name)
    if ins is None:
      return None
    op = ins.opcode
    if op == "constant":
      return ("const", int(ins.operands[0])) if re.fullmatch(r"-?[0-9]+", ins.operands[0] or "") else None
    if op in _PASS:
      return self.form(computation, ins.operands[0], known, env)
    if op == "parameter":
      return env.get(int(ins.operands[0])) if env is not None else None
    source = self.by_name[computation].get(ins.operands[0]) if ins.operands else None
    if op == "get-tuple-element" and env is None and source is not None and source.opcode == "parameter":
      index = int(re.search(r"index=([0-9]+)", ins.attrs).group(1))
      return ("const", known[index]) if index in known else ("elem", index, 0)
    if op == "fusion":
      inner = {k: self.form(computation, o, known, env) for k, o in enumerate(ins.operands)}
      root = self._root(callees(ins)[0])
      return self.form(callees(ins)[0], root.name, known, inner) if root else None
    if op in ("add", "subtract") and len(ins.operands) == 2:
      a, b = (self.form(computation, o, known, env) for o in ins.operands)
      if a is None or b is None or (a[0] == "elem" and b[0] == "elem"):
        return None
      sign = 1 if op == "add" else -1
      if a[0] == "const" and b[0] == "const":
        return ("const", a[1] + sign * b[1])
      if a[0] == "elem":
        return ("elem", a[1], a[2] + sign * b[1])
      return ("elem", b[1], b[2] + a[1]) if op == "add" else None
    return None

  def _compare(self, computation: str, name: str, known: dict[int, int], env: Optional[dict] = None):
    """(element form, direction, bound) of the condition's root compare, the element on the left."""
    ins = self.by_name[computation][name]
    if ins.opcode == "fusion":
      inner = {k: self.form(computation, o, known, env) for k, o in enumerate(ins.operands)}
      root = self._root(callees(ins)[0])
      return self._compare(callees(ins)[0], root.name, known, inner) if root else None
    direction = re.search(r"direction=([A-Z]+)", ins.attrs)
    if ins.opcode != "compare" or direction is None:
      return None
    a, b = (self.form(computation, o, known, env) for o in ins.operands)
    if a and b and a[0] == "elem" and b[0] == "const":
      return a, direction.group(1), b[1]
    if a and b and b[0] == "elem" and a[0] == "const":
      return b, _FLIP[direction.group(1)], a[1]
    return None

  def trips(self, computation: str, ins: Instruction) -> Optional[int]:
    """The trip count of the while instruction `ins` of `computation`, or None."""
    found = _TRIP.search(ins.attrs)
    if found:
      return int(found.group(1))
    init = self.by_name[computation].get(ins.operands[0])
    body_name, cond_name = (re.search(rf"{k}=%?([\w.\-]+)", ins.attrs) for k in ("body", "condition"))
    if init is None or init.opcode != "tuple" or body_name is None or cond_name is None:
      return None
    starts = {k: self.form(computation, o, {}) for k, o in enumerate(init.operands)}
    body, cond = body_name.group(1), cond_name.group(1)
    out = self._root(body)
    if out is None or out.opcode != "tuple":
      return None
    passed = {k for k, o in enumerate(out.operands) if self.form(body, o, {}) == ("elem", k, 0)}
    known = {k: v[1] for k, v in starts.items() if k in passed and v and v[0] == "const"}
    test = self._compare(cond, self._root(cond).name, known) if self._root(cond) else None
    if test is None or test[0][2] != 0 or test[0][1] not in starts or test[0][1] in known:
      return None
    k, direction, bound = test[0][1], test[1], test[2]
    start, step = starts[k], self.form(body, out.operands[k], known)
    if start is None or start[0] != "const" or step is None or step[:2] != ("elem", k) or step[2] == 0:
      return None
    start, step = start[1], step[2]
    span = {"LT": bound - start, "LE": bound - start + 1, "GT": start - bound, "GE": start - bound + 1,
            "NE": bound - start}.get(direction)
    if span is None or (direction in ("LT", "LE", "NE") and step < 0) or (direction in ("GT", "GE") and step > 0):
      return None
    return max(0, -(-span // abs(step)))
