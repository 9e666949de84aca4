"""Host-side grading: math-verify accuracy, format, a hung or crashing parse scoring 0, workers that outlive
a SIGTERM to the whole process group and are never left behind."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ares_jax.data import grading


def slow_or_crashing(response: str, gold: str) -> float:
  if response == "hang":
    time.sleep(60)
  if response.startswith("slow "):
    time.sleep(0.2)
    response = response[len("slow "):]
  if response == "crash":
    raise RuntimeError("parser crashed")
  return float(response == gold)


def slow_grade_one(response: str, gold: str) -> float:
  """`grading.grade_one`, 0.05 s slower: grading lasts long enough to be interrupted (test_preemption)."""
  time.sleep(0.05)
  return grading.grade_one(response, gold)


def suffixed(response: str, gold: str, suffix: str = "") -> float:
  return float(response + suffix == gold)


def sleepy(response: str, gold: str) -> float:
  """0.25 s per item: grading whose length is known (the overlap test)."""
  time.sleep(0.25)
  return float(response == gold)


def test_last_boxed_and_format():
  assert grading.last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}} end") == r"\frac{1}{2}"
  assert grading.last_boxed("no answer") is None and grading.last_boxed(r"\boxed{open") is None
  assert grading.format_ok(r"<think>3+4=7.</think> \boxed{7}")
  assert not grading.format_ok(r"\boxed{7}") and not grading.format_ok("<think>x</think> 7")


def test_math_verify_accuracy():
  with grading.Grader(workers=2, timeout_s=20) as g:
    out = g.grade([r"<think>.</think> \boxed{8}", r"so \boxed{\frac{1}{2}}", "none", r"\boxed{0.5}", r"\boxed{7}"],
                  ["8", "0.5", "1", "1/2", "8"])
  np.testing.assert_array_equal(out.accuracy, [1, 1, 0, 1, 0])
  np.testing.assert_array_equal(out.format, [1, 0, 0, 0, 0])
  assert out.timeouts == 0 and out.errors == 0


def test_hung_and_crashing_items_score_zero_and_are_counted():
  with grading.Grader(workers=1, timeout_s=1.0, fn=slow_or_crashing) as g:
    t0 = time.perf_counter()
    out = g.grade(["a", "hang", "b", "crash", "c"], ["a", "x", "b", "x", "z"])
    assert time.perf_counter() - t0 < 30
    np.testing.assert_array_equal(out.accuracy, [1, 0, 1, 0, 0])
    assert out.timeouts == 1 and out.errors == 1
    again = g.grade(["a"], ["a"])  # the pool was replaced and still works
    assert again.accuracy[0] == 1


def test_each_item_gets_its_own_extra_arguments():
  with grading.Grader(workers=2, timeout_s=20, fn=suffixed) as g:
    out = g.grade(["a", "a", "b", "b"], ["a", "ax", "by", "by"], extra=[(), ("x",), ("y",), ("z",)], desc="items")
  np.testing.assert_array_equal(out.accuracy, [1, 1, 1, 0])


def test_a_batch_put_out_of_order_grades_what_grade_does():
  """Groups put as they come (keys out of order, a hung and a crashing item among them) give `grade`'s grades
  in key order; `put` never waits for a worker; closing the grader fails a batch still in flight."""
  responses = ["a", "hang", "b", "crash", "c", "slow d", "e"]
  golds = ["a", "x", "b", "x", "z", "d", "y"]
  with grading.Grader(workers=2, timeout_s=1.0, fn=slow_or_crashing, grace_s=0.5) as g:
    want = g.grade(responses, golds)
    batch = g.batch()
    t0 = time.perf_counter()
    for part in ([5, 1], [0, 6, 3], [4, 2]):
      batch.put([responses[i] for i in part], [golds[i] for i in part], keys=part)
    assert time.perf_counter() - t0 < 1.0  # less than the hung item's timeout
    got = batch.result()
    np.testing.assert_array_equal(want.accuracy, [1, 0, 1, 0, 0, 1, 0])
    np.testing.assert_array_equal(got.accuracy, want.accuracy)
    np.testing.assert_array_equal(got.format, want.format)
    assert (got.timeouts, got.errors) == (want.timeouts, want.errors) == (1, 1)
    cut = g.batch()
    cut.put(["hang"], ["x"])
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
      cut.result()
    assert g.grade(["a"], ["a"]).accuracy[0] == 1  # a later grade starts new workers


def test_a_batch_is_graded_while_the_main_thread_is_inside_jax_calls():
  """8 items of 0.25 s on 2 workers are 1 s of grading (`grade` waits that long); put before 3 s of jitted
  calls on the main thread, they are all graded by the end of them, so `result` returns at once."""
  import jax
  import jax.numpy as jnp

  work = jax.jit(lambda x: jnp.tanh(x @ x))
  x = work(jnp.full((256, 256), 0.01)).block_until_ready()
  responses, golds = [f"r{i}" for i in range(8)], [f"r{i}" if i % 3 else "x" for i in range(8)]
  with grading.Grader(workers=2, timeout_s=30, fn=sleepy) as g:
    g.grade(["warm"], ["warm"])  # workers started
    t0 = time.perf_counter()
    want = g.grade(responses, golds)
    assert time.perf_counter() - t0 >= 0.95  # the grading to hide
    batch = g.batch()
    t0 = time.perf_counter()
    batch.put(responses, golds)
    while time.perf_counter() - t0 < 3.0:
      x = work(x).block_until_ready()
    t1 = time.perf_counter()
    got = batch.result()
    waited = time.perf_counter() - t1
  assert waited < 0.2, waited
  np.testing.assert_array_equal(got.accuracy, want.accuracy)
  np.testing.assert_array_equal(got.accuracy, [0, 1, 1, 0, 1, 1, 0, 1])


# Grades 12 slow items (0.2 s each, 2 workers) while a timer sends SIGTERM to the whole process group, as a
# scheduler or `kill -TERM -<pgid>` does; this process's own handler only records it, as the run's does.
GROUP_SIGTERM = """
import os, signal, sys, threading
sys.path.insert(0, sys.argv[1])
import test_grading
from ares_jax.data import grading
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append(1))
g = grading.Grader(workers=2, timeout_s=5.0, fn=test_grading.slow_or_crashing)
g.grade(["a"], ["a"])  # workers started
print("WORKERS", *g._feeder.pids(), flush=True)
threading.Timer(0.3, os.killpg, (os.getpgid(0), signal.SIGTERM)).start()
out = g.grade(["slow a", "slow b"] * 6, ["a", "x"] * 6)
print("SIGTERM", len(got), "ACC", "".join(str(int(a)) for a in out.accuracy), "TIMEOUTS", out.timeouts, flush=True)
"""


def test_workers_outlive_a_sigterm_to_the_process_group_and_end_with_the_parent():
  proc = subprocess.Popen([sys.executable, "-c", GROUP_SIGTERM, os.path.dirname(__file__)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM 1 ACC 101010101010 TIMEOUTS 0" in out, out + err[-3000:]
  workers = [int(p) for p in out.split("WORKERS", 1)[1].split("\n", 1)[0].split()]
  assert len(workers) == 2  # both outlived the SIGTERM (the grades above) ...
  left = _running_in_group(proc.pid)  # ... and nothing of the group is alive once the parent has exited
  assert not left, left


def _running_in_group(pgid: int, within_s: float = 10.0) -> list[tuple[int, str]]:
  """(pid, command line) of the processes of process group `pgid` that are not zombies (a zombie has exited;
  here nobody may reap it), once none is left or after `within_s` seconds (multiprocessing's resource
  tracker exits just after its parent)."""
  deadline = time.monotonic() + within_s
  while True:
    left = _group_members(pgid)
    if not left or time.monotonic() > deadline:
      return left
    time.sleep(0.1)


def _group_members(pgid: int) -> list[tuple[int, str]]:
  out = []
  for d in os.listdir("/proc"):
    if d.isdigit():
      try:
        with open(f"/proc/{d}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
        with open(f"/proc/{d}/cmdline", "rb") as f:
          out.append((int(d), f.read().replace(b"\0", b" ").decode(errors="replace")[:200]))
  return out
