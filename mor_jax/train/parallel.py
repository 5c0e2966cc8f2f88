"""Data parallelism and FSDP: one train step, two wrappers (pjit and pmap), one or many processes.

`parallel.mode = "pjit"` (default): `jax.jit` over a device `Mesh` with two
axes, `data` and `fsdp` (sizes `parallel.data` x `parallel.fsdp`, -1 meaning
"the rest"; the default is pure data parallelism, `fsdp` = 1). The batch is
sharded on its row axis over both axes (every device gets its own rows). The
train state is created already placed (`jax.jit(init, out_shardings=...)`):
replicated when `fsdp` = 1, else parameters and optimizer state are sharded
along `fsdp` by logical-axis rules (`LOGICAL_RULES`: each parameter's axes are
declared where the model creates it, e.g. q_proj kernel = (embed, heads), and
the `embed` axis maps to the `fsdp` mesh axis); XLA inserts the all-gathers of
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
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mor_jax.config import resolve_mesh_shape
from mor_jax.train.aot import AOTStep

AXIS = "data"                 # pmap axis name; first mesh axis in pjit mode
FSDP_AXIS = "fsdp"
BATCH_AXES = (AXIS, FSDP_AXIS)  # the batch's row axis is split over both mesh axes

# logical axis -> mesh axis (None: replicated). The logical axes of each parameter are declared where it is
# created (nn.with_logical_partitioning in mor_jax/model) and read with `mor_jax.model.transformer.param_axes`.
LOGICAL_RULES = (
    ("embed", FSDP_AXIS),
    ("vocab", None), ("heads", None), ("mlp", None), ("layers", None), ("norm", None), ("router", None),
)


def _names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(str(k.name))
  return tuple(out)


def axes_table(param_axes) -> dict[tuple[str, ...], tuple]:
  """{parameter path (names): logical axes} from a `param_axes` tree (leaves: tuples of axis names)."""
  flat = jax.tree_util.tree_flatten_with_path(param_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
  return {_names(path): axes for path, axes in flat}


def leaf_axes(path, shape, table: dict) -> tuple[str | None, ...]:
  """Logical axes of a state leaf: a parameter or an optimizer moment of one (its path ends with the parameter's
  path); other leaves (step, rng, counters, router bias) get none (replicated)."""
  names = _names(path)
  for k in range(len(names)):
    axes = table.get(names[k:])
    if axes is not None and len(axes) == len(shape):
      return axes
  return (None,) * len(shape)


def DataParallel(mode: str = "pjit", devices: Sequence[jax.Device] | None = None, *, data: int = -1,  # noqa: N802
                 fsdp: int = 1, param_axes=None, rules: Sequence[tuple[str, str | None]] = LOGICAL_RULES) -> "Parallel":
  """Placement and compilation for `mode` ('pjit': mesh `data` x `fsdp`; 'pmap': replicated) over `devices`.

  `param_axes` (`mor_jax.model.transformer.param_axes(cfg)`) names each parameter's logical axes; FSDP
  (`fsdp` > 1) shards parameters and optimizer moments by them.
  """
  if mode == "pjit":
    return PjitParallel(devices, data=data, fsdp=fsdp, param_axes=param_axes, rules=rules)
  if mode == "pmap":
    if int(fsdp) != 1:
      raise ValueError("config.parallel.fsdp: FSDP needs parallel.mode 'pjit'.")
    return PmapParallel(devices)
  raise ValueError(f"config.parallel.mode: unknown mode {mode!r}; use 'pjit' or 'pmap'.")


class Parallel:
  """The interface both modes implement; the training loop uses only this."""

  mode = ""
  axis_name: str | None = None        # the axis train_step / eval_step reduce over (pmap) or None (pjit)

  def __init__(self, devices: Sequence[jax.Device], mesh: Mesh, data_size: int, fsdp_size: int):
    self.devices = list(devices)
    self.mesh = mesh
    self.data_size, self.fsdp_size = data_size, fsdp_size
    self.replicated = NamedSharding(self.mesh, P())
    self.trace_counts: dict[str, int] = {}
    self.compiled_memory: dict[str, dict] = {}         # 'train_step[topk]' -> memory analysis (AOT, pjit)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def fsdp(self) -> bool:
    return self.fsdp_size > 1

  def _local_count(self) -> int:
    return sum(d.process_index == jax.process_index() for d in self.devices)

  def _split_rows(self, x, accum: int) -> np.ndarray:
    """[rows, ...] -> [accum, rows / accum, ...] (micro-batch m = rows m*rows/accum ...)."""
    x = np.asarray(x)
    rows = x.shape[0]
    if rows % (accum * self._local_count()):
      raise ValueError(f"batch of {rows} rows does not split into {accum} micro-batches over "
                       f"{self._local_count()} devices; check train.total_batch_size.")
    return x.reshape((accum, rows // accum) + x.shape[1:])

  def shard_train_batch(self, batch: dict, accum: int) -> dict:
    """This process's rows [rows, T+1] -> global device arrays for `train_step`.

    One process: `rows` is the global batch. Several: each passes its own
    rows (the global batch's `process_row_indices`), all the same count.
    """
    return {k: self._put_train(self._split_rows(v, accum)) for k, v in batch.items()}

  def shard_eval_batch(self, batch: dict) -> dict:
    """This process's rows [rows, T+1] -> device arrays for `eval_step`."""
    return {k: self._put_eval(np.asarray(v)) for k, v in batch.items()}

  def process_row_indices(self, rows: int, accum: int) -> np.ndarray:
    """Indices of the rows of a global train batch of `rows` rows that this process feeds, in its order."""
    if rows % (accum * self.num_devices):
      raise ValueError(f"batch of {rows} rows does not split into {accum} micro-batches over "
                       f"{self.num_devices} devices; check train.total_batch_size.")
    return np.arange(rows)

  def _counted(self, name: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      self.trace_counts[name] = self.trace_counts.get(name, 0) + 1   # runs once per trace
      return fn(*args, **kwargs)
    return wrapper

  def _bind(self, name: str, fn: Callable) -> Callable:
    return self._counted(name, functools.partial(fn, axis_name=self.axis_name))

  def state_memory(self, abstract_state) -> dict:
    """Bytes per device of the train state's parts under this placement (params, opt_state, total)."""
    shardings = self.state_shardings(abstract_state)

    def per_device(tree, shs):
      total = 0
      for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shs)):
        total += int(np.prod(self._shard_shape(sh, tuple(x.shape)), dtype=np.int64)) * np.dtype(x.dtype).itemsize
      return total
    out = {"params": per_device(abstract_state.params, shardings.params),
           "opt_state": per_device(abstract_state.opt_state, shardings.opt_state)}
    out["total"] = per_device(abstract_state, shardings)
    return out

  def abstract_train_args(self, abstract_state, accum: int, micro: int, width: int, keys: Sequence[str]):
    """(state, batch) as `jax.ShapeDtypeStruct`s placed as the run places them: the state as `place_state`
    leaves it, int32 batch arrays `keys` as `shard_train_batch` makes them from [accum x micro x devices, width]
    rows. For compiling the train step without allocating anything (mor_jax.train.fit)."""
    state = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(self._placed_shape(x.shape), x.dtype, sharding=sh),
                         abstract_state, self._placed_shardings(abstract_state))
    shape, sharding = self._train_layout(accum, micro, width)
    return state, {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in keys}

  def ahead_of_time(self, train_fn: Callable, name: str = "train_step", routes: bool = True,
                    sink: dict | None = None) -> Callable:
    """`train_fn` compiled ahead of time once per routing mode where the mode supports it."""
    del name, routes, sink
    return train_fn


class PjitParallel(Parallel):
  """`jax.jit` over a `data` x `fsdp` mesh of (possibly several processes') devices."""

  mode = "pjit"

  def __init__(self, devices=None, *, data: int = -1, fsdp: int = 1, param_axes=None, rules=LOGICAL_RULES):
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    data_size, fsdp_size = resolve_mesh_shape(len(devices), data, fsdp)
    super().__init__(devices, Mesh(np.array(devices).reshape(data_size, fsdp_size), BATCH_AXES),
                     data_size, fsdp_size)
    self.batch_axes: Any = BATCH_AXES
    self.rules = tuple(rules)
    if self.fsdp and param_axes is None:
      raise ValueError("FSDP (config.parallel.fsdp > 1) needs the model's parameter axes: pass "
                       "param_axes=mor_jax.model.transformer.param_axes(cfg).")
    self.axes = axes_table(param_axes) if param_axes is not None else {}

  def _spec(self, path, shape) -> P:
    """PartitionSpec of one state leaf: logical axes -> mesh axes, dimensions that do not divide replicated."""
    if not self.fsdp:
      return P()
    rules = dict(self.rules)
    axes = []
    for name, dim in zip(leaf_axes(path, shape, self.axes), shape):
      mesh_axis = rules.get(name) if name is not None else None
      if mesh_axis is not None and (mesh_axis in axes or dim % self.mesh.shape[mesh_axis]):
        mesh_axis = None      # a mesh axis shards one dimension at most; sizes must divide
      axes.append(mesh_axis)
    return P(*axes)

  def state_shardings(self, abstract_state) -> Any:
    """Shardings of the *unreplicated* state (creation, restore and step-output targets)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(self.mesh, self._spec(p, tuple(x.shape))), abstract_state)

  @staticmethod
  def _shard_shape(sharding, shape):
    return sharding.shard_shape(shape)

  def create_state(self, init_fn: Callable[[], Any]) -> Any:
    """Runs `init_fn` (pure, no arguments) so that its result is created already placed."""
    return jax.jit(init_fn, out_shardings=self.state_shardings(jax.eval_shape(init_fn)))()

  def place_state(self, state) -> Any:
    """An unreplicated state (restored or host) -> this mode's layout (a no-op when it is placed so)."""
    return jax.device_put(state, self.state_shardings(state))

  def unreplicate(self, state) -> Any:
    """The state as checkpoints hold it."""
    return state

  def _train_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(None, self.batch_axes))

  def _placed_shape(self, shape):
    return tuple(shape)

  def _placed_shardings(self, abstract_state):
    return self.state_shardings(abstract_state)

  def _train_layout(self, accum: int, micro: int, width: int):
    return (accum, micro * self.num_devices, width), self._train_sharding()

  def process_row_indices(self, rows: int, accum: int) -> np.ndarray:
    """Micro-batch m holds global rows m * micro ... (m + 1) * micro - 1; each process owns a contiguous
    slice of every micro-batch (its devices' rows)."""
    out = super().process_row_indices(rows, accum)
    if jax.process_count() == 1:
      return out
    micro = rows // accum
    index_map = self._train_sharding().addressable_devices_indices_map((accum, micro))
    lo = min(idx[1].start or 0 for idx in index_map.values())
    hi = max(micro if idx[1].stop is None else idx[1].stop for idx in index_map.values())
    return (np.arange(accum)[:, None] * micro + np.arange(lo, hi)[None]).reshape(-1)

  def _put_train(self, x):
    return jax.make_array_from_process_local_data(self._train_sharding(), x)

  def _put_eval(self, x):
    return jax.make_array_from_process_local_data(NamedSharding(self.mesh, P(self.batch_axes)), x)

  def any_process(self, flag: bool) -> jax.Array:
    """A replicated device bool: True if `flag` is True on any process (asynchronous; fetch it later)."""
    return _any(self._put_eval(np.full((self._local_count(),), bool(flag))))

  def compile_train_step(self, step_fn: Callable, state_shardings: Any = None) -> Callable:
    """`step_fn(state, batch, routing_mode, axis_name=...)` -> `f(state, batch, routing_mode)`, state donated;
    `state_shardings` (from `state_shardings(abstract_state)`) pins the new state's placement (FSDP)."""
    fn = self._bind("train_step", step_fn)
    out = None if state_shardings is None else (state_shardings, self.replicated)
    return jax.jit(lambda state, batch, routing_mode: fn(state, batch, routing_mode=routing_mode),
                   static_argnums=(2,), donate_argnums=(0,), out_shardings=out)

  def compile_eval_step(self, eval_fn: Callable) -> Callable:
    return jax.jit(self._bind("eval_step", eval_fn), out_shardings=self.replicated)

  def ahead_of_time(self, train_fn: Callable, name: str = "train_step", routes: bool = True,
                    sink: dict | None = None) -> Callable:
    """`train_fn` compiled ahead of time once per routing mode, its memory analysis logged (naming the routing
    mode when the model `routes`) and kept in `sink` (default: `compiled_memory`)."""
    return AOTStep(train_fn, name, self.compiled_memory if sink is None else sink, routes)

  def fetch(self, tree) -> Any:
    """Device values -> host numpy."""
    return jax.device_get(tree)

  def describe(self) -> str:
    return (f"mesh data={self.data_size} x fsdp={self.fsdp_size} over {self.num_devices} devices, "
            f"{jax.process_count()} process(es)")


class PmapParallel(Parallel):
  """Classic `jax.pmap` over one process's local devices: the state carries a leading device axis."""

  mode = "pmap"
  axis_name = AXIS

  def __init__(self, devices=None):
    if jax.process_count() > 1:
      raise ValueError("config.parallel.mode: 'pmap' runs on one process's local devices; use 'pjit' for "
                       f"{jax.process_count()} processes.")
    devices = list(jax.local_devices() if devices is None else devices)
    super().__init__(devices, Mesh(np.array(devices), (AXIS,)), len(devices), 1)
    self.batch_axes: Any = AXIS
    self.stacked = NamedSharding(self.mesh, P(AXIS))   # leading device axis

  def state_shardings(self, abstract_state) -> Any:
    sh = jax.sharding.SingleDeviceSharding(self.devices[0])
    return jax.tree.map(lambda _: sh, abstract_state)

  @staticmethod
  def _shard_shape(sharding, shape):
    del sharding
    return shape

  def create_state(self, init_fn: Callable[[], Any]) -> Any:
    return self.replicate(jax.jit(init_fn)())

  def place_state(self, state) -> Any:
    return self.replicate(state)

  def replicate(self, tree) -> Any:
    """Adds a leading device axis and puts one copy on each device."""
    n = self.num_devices

    def rep(x):
      x = np.asarray(jax.device_get(x))
      return jax.device_put(np.broadcast_to(x, (n,) + x.shape), self.stacked)
    return jax.tree.map(rep, tree)

  def unreplicate(self, state) -> Any:
    """The state without a device axis (what checkpoints hold)."""
    return jax.tree.map(lambda x: x[0], state)

  def _placed_shape(self, shape):
    return (self.num_devices,) + tuple(shape)

  def _placed_shardings(self, abstract_state):
    return jax.tree.map(lambda _: self.stacked, abstract_state)

  def _train_layout(self, accum: int, micro: int, width: int):
    return (self.num_devices, accum, micro, width), self.stacked

  def _put_train(self, x):
    x = x.reshape((x.shape[0], self.num_devices, -1) + x.shape[2:]).swapaxes(0, 1)
    return jax.device_put(np.ascontiguousarray(x), self.stacked)

  def _put_eval(self, x):
    return jax.device_put(x.reshape((self.num_devices, -1) + x.shape[1:]), self.stacked)

  def any_process(self, flag: bool) -> jax.Array:
    return jnp.asarray(bool(flag))

  def compile_train_step(self, step_fn: Callable, state_shardings: Any = None) -> Callable:
    del state_shardings
    fn = self._bind("train_step", step_fn)
    return jax.pmap(lambda state, batch, routing_mode: fn(state, batch, routing_mode=routing_mode),
                    axis_name=AXIS, static_broadcasted_argnums=(2,), donate_argnums=(0,), devices=self.devices)

  def compile_eval_step(self, eval_fn: Callable) -> Callable:
    return jax.pmap(self._bind("eval_step", eval_fn), axis_name=AXIS, devices=self.devices)

  def fetch(self, tree) -> Any:
    """Device values -> host numpy (the first replica)."""
    return jax.tree.map(lambda x: x[0], jax.device_get(tree))

  def describe(self) -> str:
    return f"pmap over {self.num_devices} devices"


@jax.jit
def _any(x):
  return jnp.any(x)
