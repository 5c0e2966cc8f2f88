"""Data parallelism: one train step, two wrappers (pjit and pmap).

`parallel.mode = "pjit"` (default): `jax.jit` over a device `Mesh` with one
axis `data`; the train state is replicated (`NamedSharding(mesh, P())`) and
created already placed (`jax.jit(init, out_shardings=...)`); the batch is
sharded on its row axis. XLA inserts the gradient all-reduce.

`parallel.mode = "pmap"`: classic `jax.pmap` over the local devices with
axis name `data`; the state carries a leading device axis (replicated), each
device gets its rows, and the step reduces gradients and metrics with
`psum`/`pmean` itself.

Both wrap the same `train_step` / `eval_step` (see step.py), so a batch
split into the same micro-batches gives the same numbers in both modes and
on any number of devices (routing is per sequence). Checkpoints always hold
the unreplicated state, so a run can resume on a different device count or
mode.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


class DataParallel:
  """Placement and compilation for one of the two modes over `devices`."""

  def __init__(self, mode: str = "pjit", devices: Sequence[jax.Device] | None = None):
    if mode not in ("pjit", "pmap"):
      raise ValueError(f"config.parallel.mode: unknown mode {mode!r}; use 'pjit' or 'pmap'.")
    self.mode = mode
    if mode == "pmap" and jax.process_count() > 1:
      raise ValueError("config.parallel.mode: 'pmap' runs on one process's local devices; use 'pjit' for "
                       f"{jax.process_count()} processes.")
    if devices is None:
      devices = jax.devices() if mode == "pjit" else jax.local_devices()
    self.devices = list(devices)
    self.mesh = Mesh(np.array(self.devices), (AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.stacked = NamedSharding(self.mesh, P(AXIS))   # leading device axis (pmap layout)
    self.trace_counts: dict[str, int] = {}

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def axis_name(self) -> str | None:
    return AXIS if self.mode == "pmap" else None

  # ----------------------------------------------------------------- state
  def state_shardings(self, abstract_state) -> Any:
    """Shardings of the *unreplicated* state on this machine (restore targets)."""
    sh = self.replicated if self.mode == "pjit" else jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.tree.map(lambda _: sh, abstract_state)

  def create_state(self, init_fn: Callable[[], Any]) -> Any:
    """Runs `init_fn` (pure, no arguments) so that its result is created already placed."""
    abstract = jax.eval_shape(init_fn)
    state = jax.jit(init_fn, out_shardings=self.state_shardings(abstract))()
    return state if self.mode == "pjit" else self.replicate(state)

  def place_state(self, state) -> Any:
    """An unreplicated state (restored or host) -> this mode's layout."""
    if self.mode == "pjit":
      return jax.device_put(state, self.state_shardings(state))
    return self.replicate(state)

  def replicate(self, tree) -> Any:
    """Adds a leading device axis and puts one copy on each device (pmap layout)."""
    n = self.num_devices

    def rep(x):
      x = np.asarray(jax.device_get(x))
      return jax.device_put(np.broadcast_to(x, (n,) + x.shape), self.stacked)
    return jax.tree.map(rep, tree)

  def unreplicate(self, state) -> Any:
    """The state without a device axis (what checkpoints hold)."""
    if self.mode == "pjit":
      return state
    return jax.tree.map(lambda x: x[0], state)

  # ----------------------------------------------------------------- batches
  def shard_train_batch(self, batch: dict, accum: int) -> dict:
    """Host rows [rows, T+1] -> device arrays for `train_step` (micro-batch m = rows m*rows/accum ...)."""
    def put(x):
      x = np.asarray(x)
      rows = x.shape[0]
      if rows % (accum * self._local_count()):
        raise ValueError(f"batch of {rows} rows does not split into {accum} micro-batches over "
                         f"{self._local_count()} devices; check train.total_batch_size.")
      x = x.reshape((accum, rows // accum) + x.shape[1:])
      if self.mode == "pjit":
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(None, AXIS)), x)
      n = self.num_devices
      x = x.reshape((accum, n, -1) + x.shape[2:]).swapaxes(0, 1)
      return jax.device_put(np.ascontiguousarray(x), self.stacked)
    return {k: put(v) for k, v in batch.items()}

  def shard_eval_batch(self, batch: dict) -> dict:
    """Host rows [rows, T+1] -> device arrays for `eval_step`."""
    def put(x):
      x = np.asarray(x)
      if self.mode == "pjit":
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(AXIS)), x)
      return jax.device_put(x.reshape((self.num_devices, -1) + x.shape[1:]), self.stacked)
    return {k: put(v) for k, v in batch.items()}

  def _local_count(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.devices)

  # ----------------------------------------------------------------- compile
  def _counted(self, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      self.trace_counts[name] = self.trace_counts.get(name, 0) + 1   # runs once per trace
      return fn(*args, **kwargs)
    return wrapper

  def compile_train_step(self, step_fn: Callable) -> Callable:
    """`step_fn(state, batch, routing_mode, axis_name=...)` -> `f(state, batch, routing_mode)`, state donated."""
    fn = self._counted("train_step", functools.partial(step_fn, axis_name=self.axis_name))
    if self.mode == "pjit":
      jitted = jax.jit(lambda state, batch, routing_mode: fn(state, batch, routing_mode=routing_mode),
                       static_argnums=(2,), donate_argnums=(0,))
      return jitted
    return jax.pmap(lambda state, batch, routing_mode: fn(state, batch, routing_mode=routing_mode),
                    axis_name=AXIS, static_broadcasted_argnums=(2,), donate_argnums=(0,), devices=self.devices)

  def compile_eval_step(self, eval_fn: Callable) -> Callable:
    fn = self._counted("eval_step", functools.partial(eval_fn, axis_name=self.axis_name))
    if self.mode == "pjit":
      return jax.jit(fn)
    return jax.pmap(fn, axis_name=AXIS, devices=self.devices)

  def fetch(self, tree) -> Any:
    """Device values -> host numpy (the first replica in pmap mode)."""
    host = jax.device_get(tree)
    if self.mode == "pmap":
      host = jax.tree.map(lambda x: x[0], host)
    return host
