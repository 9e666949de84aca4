"""Several JAX processes on one machine for the multi-process tests (gloo collectives over localhost); a
supervisor's SIGTERM to one of them at a chosen moment (`sigterm_when`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_together(commands: Sequence[Sequence[str]], envs: Sequence[dict], log_dir: Path, timeout: float = 600,
                 name: str = "process",
                 while_running: Callable[[list[subprocess.Popen]], None] | None = None) -> list[tuple[int, str]]:
  """Starts every command at once and waits for all: (return code, output) per process. Output goes to files,
  not pipes: with pipes read one after the other, a process blocked on a full pipe would stall the others in
  a collective. `while_running(processes)`, if given, runs once all have started (e.g. to send one of them a
  signal at some point); a process still running when this ends with an error is killed."""
  files = [open(log_dir / f"{name}_{i}.log", "w+") for i in range(len(commands))]  # pylint: disable=consider-using-with
  procs = [subprocess.Popen(list(cmd), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
           for cmd, env, f in zip(commands, envs, files)]
  try:
    if while_running is not None:
      while_running(procs)
    out = []
    for p, f in zip(procs, files):
      p.wait(timeout=timeout)
      f.seek(0)
      out.append((p.returncode, f.read()))
    return out
  finally:
    for p, f in zip(procs, files):
      if p.poll() is None:
        p.kill()
        p.wait()
      f.close()


def sigterm_when(procs: Sequence[subprocess.Popen], to: int, reached: Callable[[], bool], what: str,
                 logs: Sequence[Path], timeout: float = 900) -> None:
  """Sends one SIGTERM to `procs[to]` as soon as `reached()` (polled every 0.05 s), as a scheduler preempting
  a job does: the process may be anywhere in its work by then. Fails, instead of letting a test pass without a
  signal, if a process ends (or `timeout` passes) before that (`what`); the failure shows the `logs`' tails."""
  deadline = time.monotonic() + timeout
  while not reached():
    ended = {i: p.returncode for i, p in enumerate(procs) if p.poll() is not None}
    if ended or time.monotonic() > deadline:
      tail = "\n".join(Path(log).read_text()[-3000:] for log in logs)
      pytest.fail(f"no SIGTERM sent: {f'processes ended (exit codes {ended})' if ended else 'timed out'} before "
                  f"{what}\n{tail}")
    time.sleep(0.05)
  procs[to].send_signal(signal.SIGTERM)
