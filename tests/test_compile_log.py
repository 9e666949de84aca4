"""The one-line compile log (`ares_jax.compile_log`): its format, the persistent-cache outcome read from JAX's
monitoring events, and a real compile logged once, without JAX's own compile log."""

from __future__ import annotations

import logging
import re
import uuid

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from ares_jax import compile_log
from ares_jax import main as entry

LINE = re.compile(r"^compiled (\S+) in (\d+\.\d\d) s \((cache hit|cache miss|uncached)\)$")


def _lines(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled ")]


def test_line_format():
  assert compile_log.line("jit(score)", 3.214, "miss") == "compiled jit(score) in 3.21 s (cache miss)"
  assert compile_log.line("jit(score)", 0.5, "hit") == "compiled jit(score) in 0.50 s (cache hit)"
  assert compile_log.line("jit(score)", 12.0, None) == "compiled jit(score) in 12.00 s (uncached)"


def test_the_cache_outcome_follows_jaxs_events(caplog):
  """JAX records whether the cache was consulted and hit inside the compile, then the compile's duration."""
  compile_log.install()
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  record, duration = jax.monitoring.record_event, jax.monitoring.record_event_duration_secs
  record(compile_log.CACHE_CONSULTED)
  record(compile_log.CACHE_HIT)
  duration(compile_log.BACKEND_COMPILE, 0.25, fun_name="jit_a")
  record(compile_log.CACHE_CONSULTED)
  duration(compile_log.BACKEND_COMPILE, 4.0, fun_name="jit_b")
  duration(compile_log.BACKEND_COMPILE, 1.0, fun_name="jit_c")  # the cache off: never consulted
  duration("/jax/some/other_event", 9.0, fun_name="jit_d")
  assert _lines(caplog) == ["compiled jit_a in 0.25 s (cache hit)", "compiled jit_b in 4.00 s (cache miss)",
                            "compiled jit_c in 1.00 s (uncached)"]


def test_a_compile_is_one_line_and_jaxs_log_only_when_asked(caplog):
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger="absl")
  config = ml_collections.ConfigDict(dict(compilation_cache_dir="", log_compiles=False))
  entry.setup_compilation(config)
  offset = float(uuid.uuid4().int % 1000)  # a program no cache has seen

  def quiet_program(x):
    return jnp.sin(x) * offset

  jax.jit(quiet_program)(jnp.ones((3,))).block_until_ready()
  lines = [m for m in _lines(caplog) if "quiet_program" in m]
  assert len(lines) == 1 and LINE.match(lines[0]), _lines(caplog)
  assert not any("global shapes and types" in r.getMessage() for r in caplog.records)
  caplog.clear()
  try:
    entry.setup_compilation(ml_collections.ConfigDict(dict(compilation_cache_dir="", log_compiles=True)))

    def loud_program(x):
      return jnp.cos(x) * offset

    jax.jit(loud_program)(jnp.ones((3,))).block_until_ready()
  finally:
    jax.config.update("jax_log_compiles", False)
  messages = [r.getMessage() for r in caplog.records]
  assert any("loud_program" in m and "global shapes and types" in m for m in messages), messages
  assert len([m for m in _lines(caplog) if "loud_program" in m]) == 1  # installed once however often set up


def test_dropping_compiled_programs_unmaps_their_code():
  """What conftest.bounded_mappings relies on: a pytest worker stays under Linux's mapping limit because
  jax.clear_caches() unmaps the code of the programs it drops."""
  import gc
  import conftest
  if conftest.mappings() is None:
    pytest.skip("no /proc/self/maps on this platform")
  jax.clear_caches()
  gc.collect()
  before = conftest.mappings()
  offset = float(uuid.uuid4().int % 1000)  # programs no cache has seen
  fns = [jax.jit(lambda x, i=i: jnp.tanh(x * (i + offset)) + i) for i in range(40)]
  for f in fns:
    f(jnp.ones((3,))).block_until_ready()
  grown = conftest.mappings()
  jax.clear_caches()
  gc.collect()
  assert grown - before >= 40 and conftest.mappings() - before < (grown - before) / 4, (before, grown)
