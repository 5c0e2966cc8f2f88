"""Process-level set-up for the command-line entry points (not imported by the library).

XLA:CPU allocates the temporaries of a compiled program afresh on every
execution (about 0.7 GB per training step of the CPU benchmark model). With
4 KiB pages the kernel faults every page in again each step - about 190k page
faults, 20-30% of the step's CPU time. Asking glibc's malloc for transparent
huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc >= 2.35; ignored by
older ones) cuts that by ~10x. The tunable is read when the process starts, so
`use_huge_pages()` re-executes the current command once with it set, on the
CPU backend only (`cpu_backend_expected`: decided before JAX starts, from
JAX_PLATFORMS or from whether an accelerator plugin is installed; GPU/TPU
runs keep the process as it is). Opt out with MOR_JAX_HUGEPAGES=0.
"""

from __future__ import annotations

import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
# jaxlib plugins that give JAX an accelerator backend (CUDA, ROCm, TPU)
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13",
                       "jax_rocm60_plugin", "jax_rocm7_plugin", "jax_plugins.xla_rocm60", "libtpu")


def _importable(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except (ImportError, ValueError):
    return False


def cpu_backend_expected(environ=None) -> bool:
  """Will JAX's default backend be the CPU? Decided without initialising any backend.

  JAX_PLATFORMS (or the older JAX_PLATFORM_NAME) names the backends in order of
  preference; without it JAX picks an accelerator whenever a plugin for one is
  installed, so the answer is "no" then (the re-exec is skipped on a machine
  that has the CUDA jaxlib even if it runs on CPU: huge pages only speed up).
  """
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "") or environ.get("JAX_PLATFORM_NAME", "")
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(_importable(name) for name in ACCELERATOR_PLUGINS)


def use_huge_pages() -> None:
  """Re-exec this process once with GLIBC_TUNABLES asking for huge pages (Linux, CPU backend only)."""
  if not sys.platform.startswith("linux") or os.environ.get("MOR_JAX_HUGEPAGES", "1") == "0":
    return
  if not cpu_backend_expected():
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current or os.environ.get("_MOR_JAX_REEXEC"):
    return
  env = dict(os.environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE, _MOR_JAX_REEXEC="1")
  try:
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
  except OSError:
    pass  # keep running without it
