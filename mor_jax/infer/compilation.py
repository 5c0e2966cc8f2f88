"""XLA compilation for the inference commands: the persistent cache, and the compilation time of this process.

`enable_compilation_cache()`: a second generate / serve start reads the compiled programs from disk instead of
compiling them again (MOR_JAX_COMPILE_CACHE='' turns it off). `compiled_seconds()`: XLA compilation time so far
(persistent-cache hits add nothing), which `rate_note` takes out of a tokens/s figure.
"""

from __future__ import annotations

import functools
import os

import jax

CACHE_ENV = "MOR_JAX_COMPILE_CACHE"
_COMPILED = {"seconds": 0.0}


def enable_compilation_cache() -> None:
  """Persistent XLA cache in $MOR_JAX_COMPILE_CACHE (default ~/.cache/mor_jax/xla; '' turns it off)."""
  path = os.environ.get(CACHE_ENV, os.path.expanduser("~/.cache/mor_jax/xla"))
  if not path:
    return
  try:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  except Exception:  # pylint: disable=broad-except (a JAX without these options: no cache)
    pass


@functools.cache
def _track() -> None:
  def listener(event, seconds, **unused):
    if event == "/jax/core/compile/backend_compile_duration":
      _COMPILED["seconds"] += seconds
  jax.monitoring.register_event_duration_secs_listener(listener)


def compiled_seconds() -> float:
  """XLA compilation time of this process since the first call (which starts counting)."""
  _track()
  return _COMPILED["seconds"]


def rate_note(tokens: int, seconds: float, compiled: float) -> str:
  """'N tokens/s', and when XLA compiled during the call, the rate with and without the compilation time."""
  rate = f"{tokens / max(seconds, 1e-9):.1f} tokens/s"
  if compiled <= 0:
    return rate
  steady = max(seconds - compiled, 1e-9)
  return f"{rate} incl. {compiled:.1f}s compilation; {tokens / steady:.1f} tokens/s without it"
