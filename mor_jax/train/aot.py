"""Ahead-of-time compilation of the train step, with XLA's memory analysis logged."""

from __future__ import annotations

import time
from typing import Any, Callable

from absl import logging


def memory_analysis(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis of a compiled program ({} when the backend has none).

  `peak_memory` is the larger of XLA's own figure and arguments + outputs - aliased outputs + temporaries
  (everything the executable holds at once). On an H100 the sum matched the allocator's measured peak within
  5 KB (benchmarks/results/gpu_h100_train_throughput.json); XLA:CPU's own peak counts only the arguments.
  """
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
  if out:
    held = (out.get("argument_size", 0) + out.get("output_size", 0) - out.get("alias_size", 0)
            + out.get("temp_size", 0))
    out["peak_memory"] = max(out.get("peak_memory", 0), held)
  return out


def format_bytes(n: float | None) -> str:
  if n is None:
    return "n/a"
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if abs(n) < 1024 or unit == "TiB":
      return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
    n /= 1024
  return str(n)


def batch_signature(batch: dict) -> tuple:
  """(key, shape, dtype) of each array of a batch (concrete or jax.ShapeDtypeStruct), sorted by key."""
  return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in batch.items()))


class AOTStep:
  """A jitted `f(state, batch, routing_mode)` compiled ahead of time (`lower(...).compile()`) per routing mode
  and batch signature.

  Calls go straight to the compiled executable (each routing mode is traced exactly once per batch shape);
  the memory analysis of each executable is logged and kept in `memory[routing_mode]`. The log names the
  routing mode only for a model that routes (`routes`). `compile` also takes abstract arguments
  (`jax.ShapeDtypeStruct` with the shardings the call will have): mor_jax.train.fit compiles candidate
  micro-batches that way, and the chosen one's executable is the one the run calls.
  """

  def __init__(self, jitted: Callable, name: str = "train_step", sink: dict | None = None, routes: bool = True):
    self.jitted, self.name, self.routes = jitted, name, routes
    self.executables: dict[tuple, Any] = {}
    self.memory: dict[str, dict] = {} if sink is None else sink
    self.key_memory: dict[tuple, dict] = {}

  def compile(self, state, batch, routing_mode: str):
    key = (routing_mode, batch_signature(batch))
    exe = self.executables.get(key)
    if exe is None:
      t = time.perf_counter()
      exe = self.jitted.lower(state, batch, routing_mode).compile()
      mem = memory_analysis(exe)
      mem["compile_seconds"] = time.perf_counter() - t
      self.key_memory[key] = mem
      self.memory[f"{self.name}[{routing_mode}]"] = mem
      label = f"{self.name} ({routing_mode})" if self.routes else self.name
      logging.info("compiled %s in %.1f s; per device: arguments %s, outputs %s, temporaries %s, peak %s",
                   label, mem["compile_seconds"], format_bytes(mem.get("argument_size")),
                   format_bytes(mem.get("output_size")), format_bytes(mem.get("temp_size")),
                   format_bytes(mem.get("peak_memory")))
      self.executables[key] = exe
    return exe

  def keep_only(self, routing_mode: str, batch, sink: dict) -> None:
    """Drops every executable but the one of (`routing_mode`, `batch`'s signature) and records its memory in
    `sink` from now on (a search's chosen candidate becomes the run's step)."""
    key = (routing_mode, batch_signature(batch))
    self.executables = {key: self.executables[key]}
    self.key_memory = {key: self.key_memory[key]}
    self.memory = sink
    sink[f"{self.name}[{routing_mode}]"] = self.key_memory[key]

  def __call__(self, state, batch, routing_mode: str):
    return self.compile(state, batch, routing_mode)(state, batch)
