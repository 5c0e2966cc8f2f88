"""XLA compilation for the inference commands: the persistent cache, and the compilation time of this process.

`enable_compilation_cache()`: a second generate / serve start reads the compiled programs from disk instead of
compiling them again (MOR_JAX_COMPILE_CACHE='' turns it off). `compiled_seconds()`: the time this process spent
preparing programs so far (JAX's compilation: tracing to a jaxpr, lowering to StableHLO, XLA compilation, or
reading a compiled program from the persistent cache instead), which `rate_note` takes out of a tokens/s figure.
"""

from __future__ import annotations

import functools
import os

import jax

CACHE_ENV = "MOR_JAX_COMPILE_CACHE"
_COMPILED = {"seconds": 0.0}
PREPARATION_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                      "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")


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
    if event in PREPARATION_EVENTS:
      _COMPILED["seconds"] += seconds
  jax.monitoring.register_event_duration_secs_listener(listener)


def compiled_seconds() -> float:
  """Seconds this process spent tracing, lowering, compiling or loading compiled programs since the first call
  (which starts counting)."""
  _track()
  return _COMPILED["seconds"]


def rate_note(tokens: int, seconds: float, compiled: float) -> str:
  """'N tokens/s', and when programs were compiled during the call, the rate with and without that time."""
  rate = f"{tokens / max(seconds, 1e-9):.1f} tokens/s"
  if compiled <= 0:
    return rate
  steady = max(seconds - compiled, 1e-9)
  return f"{rate} incl. {compiled:.1f}s compilation; {tokens / steady:.1f} tokens/s without it"
