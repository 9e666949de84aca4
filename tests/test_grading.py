"""Host-side grading: math-verify accuracy, format, and a hung or crashing parse scoring 0."""

import time

import numpy as np

from ares_jax.data import grading


def slow_or_crashing(response: str, gold: str) -> float:
  if response == "hang":
    time.sleep(60)
  if response == "crash":
    raise RuntimeError("parser crashed")
  return float(response == gold)


def suffixed(response: str, gold: str, suffix: str = "") -> float:
  return float(response + suffix == gold)


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
