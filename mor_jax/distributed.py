"""Multi-process (multi-host) set-up on JAX's own distributed runtime, and process-0 helpers.

`initialize(config)` calls `jax.distributed.initialize(...)` once, before
anything touches the devices, when the configuration or the environment asks
for several processes; otherwise it does nothing (one process). Where the
settings come from, first match wins:

1. `config.distributed.enable = "off"`: never (one process).
2. `config.distributed.coordinator_address` (with `num_processes`,
   `process_id`; unset ones are taken from the environment below).
3. `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`
   (e.g. `torchrun`-style launchers or your own scripts).
4. SLURM (`srun`, more than one task): `SLURM_NTASKS`, `SLURM_PROCID`, the
   first host of `SLURM_STEP_NODELIST` as coordinator (port
   `distributed.coordinator_port`, `JAX_COORDINATOR_PORT`, or derived from
   `SLURM_JOB_ID` as JAX does). With several tasks on a node, each task uses
   the GPU `SLURM_LOCALID` unless `CUDA_VISIBLE_DEVICES` already narrows the
   GPUs or `distributed.local_device_ids` is set; with one task per node it
   uses all the node's GPUs.
5. Open MPI (`mpirun`, `OMPI_COMM_WORLD_SIZE` > 1) and anything else JAX's
   own cluster detection knows, when `distributed.enable = "on"`:
   `jax.distributed.initialize()` with no arguments.

On CPU the cross-process collectives go through gloo
(`jax_cpu_collectives_implementation`), set before initialisation.

After initialisation every process runs the same program: `jax.devices()`
lists all processes' devices, `jax.local_devices()` this process's. Only
process 0 writes metrics, TensorBoard events and reports (`is_main()`);
`quiet_other_processes()` lowers the other processes' log level to warnings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

from absl import logging

from mor_jax.errors import ConfigError

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `jax.distributed.initialize` is called with (None: let JAX detect it)."""
  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  local_device_ids: tuple[int, ...] | None
  source: str                       # 'config', 'env', 'slurm', 'auto'
  initialization_timeout: int = 300

  def kwargs(self) -> dict:
    kw: dict[str, Any] = {"initialization_timeout": int(self.initialization_timeout)}
    if self.source != "auto":
      kw.update(coordinator_address=self.coordinator_address, num_processes=self.num_processes,
                process_id=self.process_id, cluster_detection_method="deactivate")
    if self.local_device_ids is not None:
      kw["local_device_ids"] = list(self.local_device_ids)
    return kw


_initialized: Settings | None = None


def _section(config):
  if config is None:
    return {}
  try:
    section = config.get("distributed", None)
  except AttributeError:
    section = None
  return {} if section is None else dict(section)


def _fail(field: str, msg: str):
  raise ConfigError(f"config.distributed.{field}: {msg}")


def slurm_coordinator(env: dict, port: int | str | None = None) -> str:
  """host:port of the coordinator for a SLURM job: the step's first node (as JAX's own SLURM support does)."""
  nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
  if not nodes:
    raise RuntimeError("SLURM_STEP_NODELIST is not set; launch with srun or set distributed.coordinator_address.")
  m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodes)
  host = m.group(1)
  if m.group(3):                                   # node[001-004,007] -> node001
    host += re.split(r"[,-]", m.group(3))[0]
  if not port:
    port = int(env.get("SLURM_JOB_ID", "0")) % 2 ** 12 + (65535 - 2 ** 12 + 1)
  return f"{host}:{port}"


def _slurm_tasks_on_node(env: dict) -> int:
  """Tasks of this step on this node (SLURM_STEP_TASKS_PER_NODE like '4(x2)' or '2,1'); 1 if unknown."""
  spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
  counts = []
  for part in filter(None, spec.split(",")):
    m = re.match(r"(\d+)(\(x(\d+)\))?", part)
    if m:
      counts += [int(m.group(1))] * int(m.group(3) or 1)
  node = int(env.get("SLURM_NODEID", "0") or 0)
  if counts:
    return counts[min(node, len(counts) - 1)]
  if env.get("SLURM_NTASKS_PER_NODE"):
    return int(env["SLURM_NTASKS_PER_NODE"])
  return 1


def resolve(config=None, env: dict | None = None) -> Settings | None:
  """The distributed settings the config and environment ask for, or None for a single process."""
  env = dict(os.environ if env is None else env)
  d = _section(config)
  mode = str(d.get("enable", "auto")).lower()
  if mode in ("true", "1", "yes"):
    mode = "on"
  if mode in ("false", "0", "no"):
    mode = "off"
  if mode not in MODES:
    _fail("enable", f"unknown value {d.get('enable')!r}; use 'auto', 'on' or 'off'.")
  if mode == "off":
    return None
  timeout = int(d.get("initialization_timeout", 300) or 300)
  ids = tuple(int(i) for i in (d.get("local_device_ids") or ()))
  local_ids = ids or None
  if not local_ids and env.get("JAX_LOCAL_DEVICE_IDS"):
    local_ids = tuple(int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(","))
  num = int(d.get("num_processes", 0) or 0)
  pid = int(d.get("process_id", -1) if d.get("process_id", -1) is not None else -1)
  address = str(d.get("coordinator_address", "") or "")
  port = d.get("coordinator_port", 0) or env.get("JAX_COORDINATOR_PORT")

  def checked(address, num, pid, source, local):
    if num < 1:
      _fail("num_processes", f"is {num}; with coordinator_address set, give the number of processes (>= 1).")
    if not 0 <= pid < num:
      _fail("process_id", f"is {pid}; it must be in [0, num_processes = {num}) and differ on every process.")
    if ":" not in address:
      _fail("coordinator_address", f"{address!r} needs host:port (e.g. 10.0.0.1:1234), the address of process 0.")
    return Settings(address, num, pid, local, source, timeout)

  if address:
    if num < 1:
      num = int(env.get("JAX_NUM_PROCESSES") or env.get("SLURM_NTASKS") or 0)
    if pid < 0:
      pid = int(env.get("JAX_PROCESS_ID") or env.get("SLURM_PROCID") or -1)
    return checked(address, num, pid, "config", local_ids)
  if env.get("JAX_COORDINATOR_ADDRESS"):
    num = num if num >= 1 else int(env.get("JAX_NUM_PROCESSES", 0) or 0)
    pid = pid if pid >= 0 else int(env.get("JAX_PROCESS_ID", -1) or 0)
    if num > 1 or mode == "on":
      return checked(env["JAX_COORDINATOR_ADDRESS"], num, pid, "env", local_ids)
    return None
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env:
    num = num if num >= 1 else int(env["SLURM_NTASKS"])
    pid = pid if pid >= 0 else int(env["SLURM_PROCID"])
    if local_ids is None and _slurm_tasks_on_node(env) > 1 and "SLURM_LOCALID" in env:
      visible = env.get("CUDA_VISIBLE_DEVICES", "")
      if not visible or len(visible.split(",")) > 1:   # srun --gpus-per-task already gives each task its GPU
        local_ids = (int(env["SLURM_LOCALID"]),)
    return checked(slurm_coordinator(env, port), num, pid, "slurm", local_ids)
  if mode == "on" or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return Settings(None, None, None, local_ids, "auto", timeout)
  return None


def initialize(config=None, env: dict | None = None) -> bool:
  """Starts JAX's distributed runtime when asked (see module doc). Returns True for a multi-process run.

  Idempotent; must run before the first use of the devices.
  """
  global _initialized
  if _initialized is not None:
    import jax  # pylint: disable=g-import-not-at-top
    return jax.process_count() > 1
  settings = resolve(config, env)
  if settings is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("initialising JAX's distributed runtime (%s): coordinator %s, %s processes, this is process %s",
               settings.source, settings.coordinator_address or "auto", settings.num_processes or "auto",
               "auto" if settings.process_id is None else settings.process_id)
  jax.distributed.initialize(**settings.kwargs())
  _initialized = settings
  logging.info("process %d of %d: %d local devices, %d in all", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def process_index() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index()


def is_main() -> bool:
  """True on process 0 (the one that writes metrics, reports and logs)."""
  return process_index() == 0


def quiet_other_processes() -> None:
  """Logs only warnings and errors on processes other than 0."""
  if not is_main():
    logging.set_verbosity(logging.WARNING)


def allgather_json(obj: Any) -> list:
  """Every process's JSON-able `obj`, as a list indexed by process (all processes must call it)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
  padded = np.zeros((int(sizes.max()),), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [json.loads(bytes(gathered[i, :int(n)]).decode("utf-8")) for i, n in enumerate(sizes)]


def barrier(name: str) -> None:
  """Waits until every process got here (no-op for one process)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def describe(settings: Settings | None = None) -> str:
  s = settings or _initialized
  if s is None:
    return "single process"
  return f"{s.source}: coordinator {s.coordinator_address}, {s.num_processes} processes, process {s.process_id}"
