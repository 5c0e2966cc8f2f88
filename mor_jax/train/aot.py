"""Ahead-of-time compilation of the train step, with XLA's memory analysis logged."""

from __future__ import annotations

import time
from typing import Any, Callable

from absl import logging


def memory_analysis(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis of a compiled program ({} when the backend has none)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {}
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "peak_memory_in_bytes"):
    v = getattr(m, key, None)
    if v is not None:
      out[key.replace("_in_bytes", "")] = int(v)
  if "peak_memory" not in out and out:
    out["peak_memory"] = (out.get("argument_size", 0) + out.get("output_size", 0) - out.get("alias_size", 0)
                          + out.get("temp_size", 0))
  return out


def format_bytes(n: float | None) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


class AOTStep:
  """A jitted `f(state, batch, routing_mode)` compiled ahead of time (`lower(...).compile()`) per routing mode.

  Calls go straight to the compiled executable (each routing mode is traced
  exactly once); the memory analysis of each executable is logged and kept in
  `memory[routing_mode]`. The log names the routing mode only for a model that routes (`routes`).
  """

  def __init__(self, jitted: Callable, name: str = "train_step", sink: dict | None = None, routes: bool = True):
    self.jitted, self.name, self.routes = jitted, name, routes
    self.executables: dict[str, Any] = {}
    self.memory: dict[str, dict] = {} if sink is None else sink

  def compile(self, state, batch, routing_mode: str):
    exe = self.executables.get(routing_mode)
    if exe is None:
      t = time.perf_counter()
      exe = self.jitted.lower(state, batch, routing_mode).compile()
      mem = memory_analysis(exe)
      mem["compile_seconds"] = time.perf_counter() - t
      self.memory[f"{self.name}[{routing_mode}]"] = mem
      label = f"{self.name} ({routing_mode})" if self.routes else self.name
      logging.info("compiled %s in %.1f s; per device: arguments %s, outputs %s, temporaries %s, peak %s",
                   label, mem["compile_seconds"], format_bytes(mem.get("argument_size")),
                   format_bytes(mem.get("output_size")), format_bytes(mem.get("temp_size")),
                   format_bytes(mem.get("peak_memory")))
      self.executables[routing_mode] = exe
    return exe

  def __call__(self, state, batch, routing_mode: str):
    return self.compile(state, batch, routing_mode)(state, batch)
