"""One log line per compiled XLA program: its name, the seconds it took and whether the persistent
compilation cache had it (`install`), from JAX's monitoring events rather than its compile log.

JAX's own log (`jax_log_compiles`, the config's `log_compiles=True`) names every program with its
global shapes and types: about 200 KB for the tiny pipeline's hundred-odd programs, kept for chasing shape
churn. This line is always on, at INFO.
"""

from __future__ import annotations

import threading
from typing import Optional

import jax
from absl import logging

# Recorded by JAX around each backend compile: the duration of `compile_or_get_cached` (a cache read on a
# hit), and inside it, in the same thread, whether the persistent cache was consulted and whether it hit.
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
CACHE_CONSULTED = "/jax/compilation_cache/compile_requests_use_cache"
CACHE_HIT = "/jax/compilation_cache/cache_hits"

_state = threading.local()  # the cache outcome of the compile in progress in this thread
_installed = []


def line(name: str, seconds: float, cache: Optional[str]) -> str:
  """'compiled jit(score) in 3.21 s (cache miss)'. `cache`: "hit", "miss", or None where the persistent
  cache was not consulted (off, or the program not eligible)."""
  return f"compiled {name} in {seconds:.2f} s ({f'cache {cache}' if cache else 'uncached'})"


def _on_event(event: str, **kwargs) -> None:
  if event == CACHE_CONSULTED:
    _state.cache = "miss"
  elif event == CACHE_HIT:
    _state.cache = "hit"


def _on_duration(event: str, seconds: float, **kwargs) -> None:
  if event != BACKEND_COMPILE:
    return
  cache, _state.cache = getattr(_state, "cache", None), None
  logging.info("%s", line(str(kwargs.get("fun_name", "?")), seconds, cache))


def install() -> None:
  """Logs `line` for every program this process compiles from now on (once per process however often called)."""
  if _installed:
    return
  jax.monitoring.register_event_listener(_on_event)
  jax.monitoring.register_event_duration_secs_listener(_on_duration)
  _installed.append(True)
