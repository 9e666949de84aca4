"""Several JAX processes on one machine for the multi-process tests (gloo collectives over localhost)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_together(commands: Sequence[Sequence[str]], envs: Sequence[dict], log_dir: Path, timeout: float = 600,
                 name: str = "process") -> list[tuple[int, str]]:
  """Starts every command at once and waits for all: (return code, output) per process. Output goes to files,
  not pipes: with pipes read one after the other, a process blocked on a full pipe would stall the others in
  a collective."""
  files = [open(log_dir / f"{name}_{i}.log", "w+") for i in range(len(commands))]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(list(cmd), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
           for cmd, env, f in zip(commands, envs, files)]
  out = []
  for p, f in zip(procs, files):
    p.wait(timeout=timeout)
    f.seek(0)
    out.append((p.returncode, f.read()))
    f.close()
  return out
