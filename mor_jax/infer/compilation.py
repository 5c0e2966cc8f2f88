"""XLA compilation for the inference commands: the persistent cache, and the compilation time of this process.

`enable_compilation_cache()`: a second generate / serve start reads the compiled programs from disk instead of
compiling them again (MOR_JAX_COMPILE_CACHE='' turns it off). `compiled_seconds()`: the time this process spent
preparing programs so far (JAX's compilation: tracing to a jaxpr, lowering to StableHLO, XLA compilation, or
reading a compiled program from the persistent cache instead), which `rate_note` takes out of a tokens/s figure.
`decode_options(dtype, rows)`: the XLA compile options of a decode program whose products have `rows` rows.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

CACHE_ENV = "MOR_JAX_COMPILE_CACHE"
_COMPILED = {"seconds": 0.0}
PREPARATION_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                      "/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec")


# XLA:CPU hands float32 products to YNNPACK by default. For the few rows of a decode step its Eigen path is faster:
# on a 2-core AMD EPYC (AVX2), jax 0.10.2 (benchmarks/results/decode_libraries.json), SmolLM2-135M's products took
# 0.80x (4 rows), 0.70x (8), 0.62x (16) and 0.83x (32) of YNNPACK's time and the hidden-192 benchmark models'
# 0.62-0.85x from 4 to 128 rows, while YNNPACK was faster at 2 rows (1.15-1.19x); from 128 rows on (prefills) the
# two were within 5% for SmolLM2. One row takes neither (a vector product). bfloat16 products stay on YNNPACK
# (Eigen's were 1.3-3.4x slower at 2-16 rows).
EIGEN_ROWS = (4, 128)
NO_YNNPACK = {"xla_cpu_experimental_ynn_fusion_type": ""}


def decode_options(dtype, rows: int) -> dict:
  """XLA compile options for a program whose products have `rows` rows in `dtype`: float32 products of
  EIGEN_ROWS rows compiled without YNNPACK, everything else as XLA chooses ({}). The options are XLA:CPU's (other
  backends ignore them) and part of the persistent cache's key."""
  lo, hi = EIGEN_ROWS
  return dict(NO_YNNPACK) if jnp.dtype(dtype) == jnp.float32 and lo <= int(rows) <= hi else {}


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
