"""Provenance of a measured result: which code, machine, versions and conditions produced it.

Every benchmark writes its JSON through `write_result`, so a figure quoted in the README or docs can be traced to
the commit (and whether the tree had uncommitted changes), the command line, the date, the machine (CPU model,
cores, accelerator), the library versions and the conditions that matter (random or trained weights, batch,
dtype, ...):

    from mor_jax.tools.provenance import write_result
    write_result("benchmarks/results/x.json", {"rows": rows}, conditions={"weights": "trained", "batch": 16})

The file gets {"provenance": {...}, **data}; it is written atomically (a temporary file, then a rename), so a
reader never sees half a result. `provenance()` alone returns the dict.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata

from mor_jax import files as files_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "torch", "transformers")


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo; else platform.processor())."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          have = set(line.split(":", 1)[1].split())
          return [x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in have]
  except OSError:
    pass
  return []


def versions() -> dict:
  out = {}
  for name in PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      continue
  return out


def accelerator() -> dict:
  """The JAX backend and its devices (only when jax is already imported: this never starts a backend itself)."""
  jax = sys.modules.get("jax")
  if jax is None:
    return {"backend": None}
  try:
    devs = jax.devices()
    return {"backend": jax.default_backend(), "devices": len(devs), "device_kind": devs[0].device_kind}
  except Exception:  # pylint: disable=broad-except (provenance must never fail a benchmark)
    return {"backend": None}


RESULTS = "benchmarks/results"   # outputs, not code: rewriting a result there does not make the next one 'dirty'


def provenance(conditions: dict | None = None, argv: list[str] | None = None) -> dict:
  """Commit, dirty tree (tracked files changed outside benchmarks/results/, and which), date, command line,
  machine, versions and the given conditions."""
  status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){RESULTS}")
  changed = [line.split(maxsplit=1)[-1] for line in (status or "").splitlines() if line.strip()]
  return {
      "commit": _git("rev-parse", "HEAD"),
      "dirty": None if status is None else bool(changed),
      **({"dirty_paths": changed[:20]} if changed else {}),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join([os.path.basename(sys.executable)] + list(sys.argv if argv is None else argv)),
      "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "cpu_flags": _cpu_flags(),
                  "platform": platform.platform(), "python": platform.python_version(), **accelerator()},
      "versions": versions(),
      "conditions": dict(conditions or {}),
  }


def write_result(path: str, data: dict, *, conditions: dict | None = None, argv: list[str] | None = None) -> dict:
  """Writes {"provenance": provenance(conditions, argv), **data} to `path` (atomically); returns it."""
  obj = {"provenance": provenance(conditions, argv), **data}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files_lib.write_json(path, obj, indent=1, default=_plain)
  return obj


def _plain(x):
  """numpy scalars and arrays as plain JSON values."""
  if hasattr(x, "tolist"):
    return x.tolist()
  if hasattr(x, "item"):
    return x.item()
  raise TypeError(f"{type(x).__name__} is not JSON serialisable")
