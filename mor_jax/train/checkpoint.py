"""Orbax checkpoints: train state + data-iterator state + config and run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta} written by one
`orbax.checkpoint.CheckpointManager` (asynchronously: arrays are copied to
host before `save` returns, files are written in the background). `state` is
the unreplicated TrainState; `data` the grain iterator's JSON state; `meta`
the config, the per-step loss / learning-rate history and run facts.

Several processes: every process calls `save` and `restore` (Orbax writes
each array's shards from the processes that hold them, JSON items from
process 0); `data` then holds every process's iterator state
(`{"iterator": <process 0's>, "processes": [<state of process i>, ...]}`,
gathered at save time) and each process resumes from its own. The directory
must be on a filesystem all hosts share.

Restore is verified: Orbax lists a corrupt or partial step like a good one
and fails only when it is read, so `restore_latest` tries the newest step,
checks what it read (step number, finite parameters), and on any failure
warns, moves that step aside to WORKDIR/checkpoints_corrupt/ and falls back
to the previous one.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mor_jax import distributed

ITEMS = ("state", "data", "meta")


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint belongs to a different model; the message says what differs."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: Any        # the iterator state (None if none was saved)
  meta: dict


class Checkpointer:
  """Saves and restores {state, data, meta} under `directory` keeping `max_to_keep` steps."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.corrupt_dir = self.directory.rstrip("/") + "_corrupt"
    self._max_to_keep = max_to_keep if max_to_keep and max_to_keep > 0 else None
    self._async = async_save
    self._manager = self._make_manager()
    self.written: list[int] = []

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data_state, meta: dict) -> None:
    """Starts an (asynchronous) save of `state` (unreplicated), the iterator state and `meta` at `step`."""
    data = {"iterator": data_state}
    if jax.process_count() > 1:                  # JSON items are written by process 0: gather every process's state
      data["processes"] = distributed.allgather_json(data_state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data),
                              meta=ocp.args.JsonSave(meta))
    self._manager.save(int(step), args=args, force=True)
    self.written.append(int(step))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state, shardings, check_meta=None) -> Restored:
    """Restores one step exactly onto `shardings` (raises on any problem)."""
    meta = self.restore_meta(step)
    if check_meta is not None:
      check_meta(meta)   # may raise CheckpointMismatchError (not a corruption)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              data=ocp.args.JsonRestore()))
    state = out["state"]
    got = int(np.asarray(jax.device_get(state.step)))
    if got != step:
      raise ValueError(f"checkpoint {step} holds a state of step {got}")
    if not _all_finite(state.params):
      raise ValueError(f"checkpoint {step} holds non-finite parameters")
    return Restored(step=step, state=state, data=_process_data_state(out["data"] or {}, step), meta=meta)

  def restore_latest(self, abstract_state, shardings, check_meta=None) -> Restored | None:
    """The newest step that restores and verifies; corrupt ones are warned about and moved aside."""
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, abstract_state, shardings, check_meta)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d in %s cannot be restored (%s: %s); moving it to %s and falling "
                        "back to the previous checkpoint.", step, self.directory, type(e).__name__,
                        str(e).splitlines()[0][:300] if str(e) else "", self.corrupt_dir)
        self._quarantine(step)
    return None

  def _quarantine(self, step: int) -> None:
    src = os.path.join(self.directory, str(step))
    if jax.process_count() > 1:                  # process 0 moves it; the others wait for that
      if jax.process_index() == 0 and os.path.exists(src):
        os.makedirs(self.corrupt_dir, exist_ok=True)
        shutil.move(src, os.path.join(self.corrupt_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
      distributed.barrier(f"mor_jax_quarantine_{step}")
      self._manager.reload()
      return
    if os.path.exists(src):
      os.makedirs(self.corrupt_dir, exist_ok=True)
      shutil.move(src, os.path.join(self.corrupt_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
    self._manager.reload()


def _all_finite(tree) -> bool:
  """True if every array in `tree` is finite (arrays spread over several processes are checked on device)."""
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return all(bool(np.all(np.isfinite(np.asarray(jax.device_get(x))))) for x in leaves)
  return bool(jax.device_get(_finite_on_device(leaves)))


@jax.jit
def _finite_on_device(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _process_data_state(data: dict, step: int):
  """This process's iterator state from a checkpoint's `data` item (None if it cannot be resumed exactly)."""
  n, i = jax.process_count(), jax.process_index()
  per_process = data.get("processes")
  if per_process is None:
    if n == 1:
      return data.get("iterator")
    logging.warning("checkpoint %d was written by one process; the %d processes now running start their data "
                    "shards from the beginning.", step, n)
    return None
  if len(per_process) != n:
    logging.warning("checkpoint %d was written by %d processes, %d run now: the data shards differ, so each "
                    "process starts its shard from the beginning.", step, len(per_process), n)
    return None
  return per_process[i]
