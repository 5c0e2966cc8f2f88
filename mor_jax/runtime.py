"""Process-level set-up for the command-line entry points (not imported by the library).

XLA:CPU allocates the temporaries of a compiled program afresh on every
execution (about 0.7 GB per training step of the CPU benchmark model). With
4 KiB pages the kernel faults every page in again each step - about 190k page
faults, 20-30% of the step's CPU time. Asking glibc's malloc for transparent
huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, glibc >= 2.35; ignored by
older ones) cuts that by ~10x. The tunable is read when the process starts, so
`use_huge_pages()` re-executes the current command once with it set.
Opt out with MOR_JAX_HUGEPAGES=0.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"


def use_huge_pages() -> None:
  """Re-exec this process once with GLIBC_TUNABLES asking for huge pages (Linux only)."""
  if not sys.platform.startswith("linux") or os.environ.get("MOR_JAX_HUGEPAGES", "1") == "0":
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb" in current or os.environ.get("_MOR_JAX_REEXEC"):
    return
  env = dict(os.environ, GLIBC_TUNABLES=f"{current}:{TUNABLE}" if current else TUNABLE, _MOR_JAX_REEXEC="1")
  try:
    os.execve(sys.executable, [sys.executable] + sys.argv, env)
  except OSError:
    pass  # keep running without it
