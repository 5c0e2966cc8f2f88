"""Data parallelism and FSDP: one train step, two wrappers (pjit and pmap), one or many processes.

`parallel.mode = "pjit"` (default): `jax.jit` over a device `Mesh` with two
axes, `data` and `fsdp` (sizes `parallel.data` x `parallel.fsdp`, -1 meaning
"the rest"; the default is pure data parallelism, `fsdp` = 1). The batch is
sharded on its row axis over both axes (every device gets its own rows). The
train state is created already placed (`jax.jit(init, out_shardings=...)`):
replicated when `fsdp` = 1, else parameters and optimizer state are sharded
along `fsdp` by logical-axis rules (`LOGICAL_RULES`: each parameter's axes are
named from its module and shape, e.g. q_proj kernel = (embed, heads), and the
`embed` axis maps to the `fsdp` mesh axis); XLA inserts the all-gathers of
the weights and the reduce-scatters of the gradients. The step is compiled
ahead of time per routing mode (`AOTStep`), and its memory analysis is
logged.

`parallel.mode = "pmap"`: classic `jax.pmap` over the local devices with
axis name `data`; the state carries a leading device axis (replicated), each
device gets its rows, and the step reduces gradients and metrics with
`psum`/`pmean` itself (one process only).

Several processes (JAX's multi-controller runtime, see `mor_jax.distributed`):
the mesh spans `jax.devices()` of all processes (ordered by process, so the
`fsdp` groups stay inside a host when `fsdp` divides the local device count);
each process feeds the rows of its own devices (`shard_train_batch` builds the
global batch with `jax.make_array_from_process_local_data`;
`process_row_indices` says which rows of a global batch those are).

Both wrap the same `train_step` / `eval_step` (see step.py), so a batch
split into the same micro-batches gives the same numbers in both modes, on
any number of devices or processes and with or without FSDP (routing is per
sequence). Checkpoints hold the unreplicated state, so a run can resume on a
different device count, mesh or mode.
"""

from __future__ import annotations

import functools
import queue
import re
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mor_jax.config import resolve_mesh_shape

AXIS = "data"                 # pmap axis name; first mesh axis in pjit mode
FSDP_AXIS = "fsdp"
BATCH_AXES = (AXIS, FSDP_AXIS)  # the batch's row axis is split over both mesh axes

# logical axis -> mesh axis (None: replicated). Parameters get logical axes from `logical_axes`.
LOGICAL_RULES = (
    ("embed", FSDP_AXIS),
    ("vocab", None), ("heads", None), ("mlp", None), ("layers", None), ("norm", None), ("router", None),
)

# (module name pattern, parameter name) -> logical axes of the unstacked parameter
_PARAM_AXES = (
    (r"embed", "embedding", ("vocab", "embed")),
    (r"lm_head", "kernel", ("embed", "vocab")),
    (r"[qkv]_proj", "kernel", ("embed", "heads")),
    (r"o_proj", "kernel", ("heads", "embed")),
    (r"(gate|up)_proj", "kernel", ("embed", "mlp")),
    (r"down_proj", "kernel", ("mlp", "embed")),
    (r"dense|fc1", "kernel", ("embed", "router")),
    (r"fc2", "kernel", ("router", None)),
    (r".*norm.*", "scale", ("norm",)),
)


def _names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(str(k.name))
  return tuple(out)


def logical_axes(path, shape) -> tuple[str | None, ...]:
  """Logical axis names of a parameter-shaped leaf from its key path (params and optimizer moments alike).

  A leading extra axis (nn.scan's stacked layers) is named 'layers'; leaves that
  match no rule (step, rng, counters, router bias) get no names (replicated).
  """
  names = _names(path)
  if len(names) < 2 or not shape:
    return (None,) * len(shape)
  module, param = names[-2], names[-1]
  for pattern, pname, axes in _PARAM_AXES:
    if param == pname and re.fullmatch(pattern, module):
      if len(shape) == len(axes):
        return axes
      if len(shape) == len(axes) + 1:
        return ("layers",) + axes
  return (None,) * len(shape)


class DataParallel:
  """Placement and compilation for one of the two modes over `devices` (mesh `data` x `fsdp` in pjit mode)."""

  def __init__(self, mode: str = "pjit", devices: Sequence[jax.Device] | None = None, *, data: int = -1,
               fsdp: int = 1, rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES):
    if mode not in ("pjit", "pmap"):
      raise ValueError(f"config.parallel.mode: unknown mode {mode!r}; use 'pjit' or 'pmap'.")
    self.mode = mode
    if mode == "pmap" and jax.process_count() > 1:
      raise ValueError("config.parallel.mode: 'pmap' runs on one process's local devices; use 'pjit' for "
                       f"{jax.process_count()} processes.")
    if devices is None:
      devices = jax.devices() if mode == "pjit" else jax.local_devices()
    self.devices = sorted(devices, key=lambda d: (d.process_index, d.id)) if mode == "pjit" else list(devices)
    if mode == "pjit":
      self.data_size, self.fsdp_size = resolve_mesh_shape(len(self.devices), data, fsdp)
      self.mesh = Mesh(np.array(self.devices).reshape(self.data_size, self.fsdp_size), BATCH_AXES)
      self.batch_axes: Any = BATCH_AXES
    else:
      if int(fsdp) != 1:
        raise ValueError("config.parallel.fsdp: FSDP needs parallel.mode 'pjit'.")
      self.data_size, self.fsdp_size = len(self.devices), 1
      self.mesh = Mesh(np.array(self.devices), (AXIS,))
      self.batch_axes = AXIS
    self.rules = tuple(rules)
    self.replicated = NamedSharding(self.mesh, P())
    self.stacked = NamedSharding(self.mesh, P(AXIS))   # leading device axis (pmap layout)
    self.trace_counts: dict[str, int] = {}
    self.compiled_memory: dict[str, dict] = {}         # 'train_step[topk]' -> memory analysis (AOT, pjit)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def axis_name(self) -> str | None:
    return AXIS if self.mode == "pmap" else None

  @property
  def fsdp(self) -> bool:
    return self.fsdp_size > 1

  # ----------------------------------------------------------------- state
  def _spec(self, path, shape) -> P:
    """PartitionSpec of one state leaf: logical axes -> mesh axes, dimensions that do not divide replicated."""
    if not self.fsdp:
      return P()
    rules = dict(self.rules)
    axes = []
    for name, dim in zip(logical_axes(path, shape), shape):
      mesh_axis = rules.get(name) if name is not None else None
      if mesh_axis is not None and (mesh_axis in axes or dim % self.mesh.shape[mesh_axis]):
        mesh_axis = None      # a mesh axis shards one dimension at most; sizes must divide
      axes.append(mesh_axis)
    return P(*axes)

  def state_shardings(self, abstract_state) -> Any:
    """Shardings of the *unreplicated* state on this machine (creation, restore and step-output targets)."""
    if self.mode == "pmap":
      sh = jax.sharding.SingleDeviceSharding(self.devices[0])
      return jax.tree.map(lambda _: sh, abstract_state)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(self.mesh, self._spec(p, tuple(x.shape))), abstract_state)

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

  def state_memory(self, abstract_state) -> dict:
    """Bytes per device of the train state's parts under this placement (params, opt_state, total)."""
    shardings = self.state_shardings(abstract_state)

    def per_device(tree, shs):
      total = 0
      for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shs)):
        shape = sh.shard_shape(tuple(x.shape)) if self.mode == "pjit" else tuple(x.shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
      return total
    out = {"params": per_device(abstract_state.params, shardings.params),
           "opt_state": per_device(abstract_state.opt_state, shardings.opt_state)}
    out["total"] = per_device(abstract_state, shardings)
    return out

  # ----------------------------------------------------------------- batches
  def _train_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(None, self.batch_axes))

  def _local_count(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.devices)

  def process_row_indices(self, rows: int, accum: int) -> np.ndarray:
    """Indices of the rows of a global train batch of `rows` rows that this process feeds, in its order.

    Micro-batch m holds global rows m * micro ... (m + 1) * micro - 1; each
    process owns a contiguous slice of every micro-batch (its devices' rows).
    """
    if rows % (accum * self.num_devices):
      raise ValueError(f"batch of {rows} rows does not split into {accum} micro-batches over "
                       f"{self.num_devices} devices; check train.total_batch_size.")
    micro = rows // accum
    if self.mode == "pmap" or jax.process_count() == 1:
      return np.arange(rows)
    index_map = self._train_sharding().addressable_devices_indices_map((accum, micro))
    lo = min(idx[1].start or 0 for idx in index_map.values())
    hi = max(micro if idx[1].stop is None else idx[1].stop for idx in index_map.values())
    return (np.arange(accum)[:, None] * micro + np.arange(lo, hi)[None]).reshape(-1)

  def shard_train_batch(self, batch: dict, accum: int) -> dict:
    """This process's rows [rows, T+1] -> global device arrays for `train_step` (micro-batch m = rows m*rows/accum ...).

    One process: `rows` is the global batch. Several: each passes its own
    rows (the global batch's `process_row_indices`), all the same count.
    """
    def put(x):
      x = np.asarray(x)
      rows = x.shape[0]
      if rows % (accum * self._local_count()):
        raise ValueError(f"batch of {rows} rows does not split into {accum} micro-batches over "
                         f"{self._local_count()} devices; check train.total_batch_size.")
      x = x.reshape((accum, rows // accum) + x.shape[1:])
      if self.mode == "pjit":
        return jax.make_array_from_process_local_data(self._train_sharding(), x)
      n = self.num_devices
      x = x.reshape((accum, n, -1) + x.shape[2:]).swapaxes(0, 1)
      return jax.device_put(np.ascontiguousarray(x), self.stacked)
    return {k: put(v) for k, v in batch.items()}

  def shard_eval_batch(self, batch: dict) -> dict:
    """This process's rows [rows, T+1] -> device arrays for `eval_step`."""
    def put(x):
      x = np.asarray(x)
      if self.mode == "pjit":
        return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(self.batch_axes)), x)
      return jax.device_put(x.reshape((self.num_devices, -1) + x.shape[1:]), self.stacked)
    return {k: put(v) for k, v in batch.items()}

  def any_process(self, flag: bool) -> jax.Array:
    """A replicated device bool: True if `flag` is True on any process (asynchronous; fetch it later)."""
    local = np.full((self._local_count(),), bool(flag))
    arr = jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(self.batch_axes)), local)
    return _any(arr)

  # ----------------------------------------------------------------- compile
  def _counted(self, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      self.trace_counts[name] = self.trace_counts.get(name, 0) + 1   # runs once per trace
      return fn(*args, **kwargs)
    return wrapper

  def compile_train_step(self, step_fn: Callable, state_shardings: Any = None) -> Callable:
    """`step_fn(state, batch, routing_mode, axis_name=...)` -> `f(state, batch, routing_mode)`, state donated.

    pjit: `state_shardings` (from `state_shardings(abstract_state)`) pins the
    new state's placement to the old one's (needed with FSDP).
    """
    fn = self._counted("train_step", functools.partial(step_fn, axis_name=self.axis_name))
    if self.mode == "pjit":
      out = None if state_shardings is None else (state_shardings, self.replicated)
      jitted = jax.jit(lambda state, batch, routing_mode: fn(state, batch, routing_mode=routing_mode),
                       static_argnums=(2,), donate_argnums=(0,), out_shardings=out)
      return jitted
    return jax.pmap(lambda state, batch, routing_mode: fn(state, batch, routing_mode=routing_mode),
                    axis_name=AXIS, static_broadcasted_argnums=(2,), donate_argnums=(0,), devices=self.devices)

  def compile_eval_step(self, eval_fn: Callable) -> Callable:
    fn = self._counted("eval_step", functools.partial(eval_fn, axis_name=self.axis_name))
    if self.mode == "pjit":
      return jax.jit(fn, out_shardings=self.replicated)
    return jax.pmap(fn, axis_name=AXIS, devices=self.devices)

  def ahead_of_time(self, train_fn: Callable, name: str = "train_step") -> Callable:
    """pjit: `train_fn` compiled ahead of time once per routing mode, memory analysis logged; pmap: unchanged."""
    if self.mode != "pjit":
      return train_fn
    return AOTStep(train_fn, name, self.compiled_memory)

  def fetch(self, tree) -> Any:
    """Device values -> host numpy (the first replica in pmap mode)."""
    host = jax.device_get(tree)
    if self.mode == "pmap":
      host = jax.tree.map(lambda x: x[0], host)
    return host

  def describe(self) -> str:
    if self.mode == "pmap":
      return f"pmap over {self.num_devices} devices"
    return (f"mesh data={self.data_size} x fsdp={self.fsdp_size} over {self.num_devices} devices, "
            f"{jax.process_count()} process(es)")


@jax.jit
def _any(x):
  return jnp.any(x)


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
  `memory[routing_mode]`.
  """

  def __init__(self, jitted: Callable, name: str = "train_step", sink: dict | None = None):
    self.jitted, self.name = jitted, name
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
      logging.info("compiled %s (%s) in %.1f s; per device: arguments %s, outputs %s, temporaries %s, peak %s",
                   self.name, routing_mode, mem["compile_seconds"], format_bytes(mem.get("argument_size")),
                   format_bytes(mem.get("output_size")), format_bytes(mem.get("temp_size")),
                   format_bytes(mem.get("peak_memory")))
      self.executables[routing_mode] = exe
    return exe

  def __call__(self, state, batch, routing_mode: str):
    return self.compile(state, batch, routing_mode)(state, batch)


class DevicePrefetcher:
  """Iterates (device batch, host iterator state after it) with `size` batches read and put on devices ahead.

  A background thread reads host batches and starts their transfers, so the
  next batches are on the devices while the current step runs. The state
  returned with each batch is the iterator's state right after that batch
  (what a checkpoint taken after its step must hold), so batches that were
  prefetched but not trained on are simply read again after a resume.
  `size` = 0: no thread, each batch is read and put when asked for.
  """

  _END = object()

  def __init__(self, iterator: Iterator[dict], put: Callable[[dict], dict], size: int = 2):
    self._it, self._put, self.size = iterator, put, int(size)
    self._state = (lambda: iterator.get_state()) if hasattr(iterator, "get_state") else (lambda: None)
    self._queue: queue.Queue | None = None
    self._stop = threading.Event()
    self._thread = None
    if self.size > 0:
      self._queue = queue.Queue(maxsize=self.size)
      self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
      self._thread.start()

  def _run(self):
    try:
      while not self._stop.is_set():
        try:
          host = next(self._it)
        except StopIteration:
          self._offer((self._END, None))
          return
        item = (self._put(host), self._state())
        if not self._offer(item):
          return
    except BaseException as e:  # pylint: disable=broad-except
      self._offer((e, None))

  def _offer(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def __iter__(self):
    return self

  def __next__(self):
    if self._queue is None:
      host = next(self._it)
      return self._put(host), self._state()
    item, state = self._queue.get()
    if item is self._END:
      self._queue.put((self._END, None))
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item, state

  def close(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
