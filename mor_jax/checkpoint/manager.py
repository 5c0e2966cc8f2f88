"""Saving and restoring training steps: one Orbax CheckpointManager, checked on the way in and out.

Save: `save` starts an (asynchronous) Orbax save of {state, data, meta}; arrays are copied to host before
it returns. `poll()` (called after each step) and the next `save` / `wait` / `close` check the previous
save: a failure is raised at once as CheckpointSaveError with one clear line ("no space left on device
while writing checkpoint N to DIR; the last complete checkpoint is M"); a completed step gets its checksum
manifest (integrity.py). The manifest's SHA-256 (seconds for a few GB of state) is computed off the training
thread: `poll()` starts it on a background thread once Orbax reports the save complete (never before, so a manifest
only ever describes a complete save), and the next `save` / `wait` / `close` joins it.

Several processes: every process calls `save` and `restore` (Orbax writes each array's shards from the
processes that hold them, JSON items from process 0); `data` then holds every process's iterator state
(`{"iterator": <process 0's>, "processes": [...]}`) and each process resumes from its own. The directory
must be on a filesystem all hosts share; process 0 writes manifests and moves damaged steps.

Restore (`restore_latest`): the newest step whose checksums verify, whose meta agrees with the config
(schema.check_compatible, else CheckpointMismatchError: nothing moved) and whose whole state is finite.
Only a step proven unreadable (checksum mismatch, missing or truncated file, non-finite values) is moved
to checkpoints_corrupt/ with a warning naming the file, and the previous step is tried. Any other error
(I/O, out of memory, ...) stops with CheckpointError and moves nothing; so does a workdir whose every step
is unreadable (starting over is the user's decision).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import shutil
import threading
import time
from typing import Any, Callable

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from mor_jax import distributed
from mor_jax.checkpoint import integrity
from mor_jax.checkpoint.layout import (ITEMS, CheckpointCorruptError, CheckpointError, CheckpointMismatchError,
                                       CheckpointSaveError, check_newest_complete, corrupt_dir, step_dir,
                                       steps_in)


@dataclasses.dataclass
class TrainRestore:
  """A training step restored in full."""
  step: int
  state: Any       # the TrainState, on the target shardings
  data: Any        # this process's data-iterator state (None if none was saved)
  meta: dict
  directory: str   # the step's directory


def _first_line(e: BaseException) -> str:
  s = str(e)
  return s.splitlines()[0][:300] if s else type(e).__name__


def _no_space(e: BaseException | None) -> bool:
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


class Checkpointer:
  """Saves and restores {state, data, meta} under `directory` keeping `max_to_keep` steps."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.corrupt_dir = corrupt_dir(self.directory)
    self._max_to_keep = max_to_keep if max_to_keep and max_to_keep > 0 else None
    self._async = async_save
    options = ocp.CheckpointManagerOptions(max_to_keep=self._max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._pending: int | None = None      # the step whose save may still be running
    self._manifest: _ManifestThread | None = None   # a complete step's manifest, being written in the background
    self.written: list[int] = []

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  # ------------------------------------------------------------------ saving
  def save(self, step: int, state, data_state, meta: dict) -> None:
    """Starts an (asynchronous) save of `state` (unreplicated), the iterator state and `meta` at `step`."""
    self.wait()                                   # the previous save: its failure or its manifest first
    data = {"iterator": data_state}
    if jax.process_count() > 1:                   # JSON items are written by process 0: gather every process's
      data["processes"] = distributed.allgather_json(data_state)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
                              meta=ocp.args.JsonSave(meta))
    self._pending = int(step)
    self._checked(lambda: self._manager.save(int(step), args=args, force=True))
    self.written.append(int(step))
    if not self._async:
      self.wait()

  def _checked(self, *calls) -> None:
    try:
      for call in calls:
        call()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from None

  def poll(self) -> None:
    """Non-blocking: raises a failed background save now; writes the manifest of a completed one."""
    if self._pending is None:
      return
    self._checked(self._manager.check_for_errors)
    # several processes: the manifest's barrier must come at the same step everywhere, so it waits for the next
    # save or close (which every process reaches together); one process finishes it as soon as the save is done
    if jax.process_count() == 1 and not self._manager.is_saving_in_progress():
      self._checked(self._manager.wait_until_finished, self._manager.check_for_errors)   # finished: returns at once
      step, self._pending = self._pending, None
      self._join_manifest()
      self._manifest = _ManifestThread(step_dir(self.directory, step))

  def wait(self) -> None:
    """Waits for the running save and its manifest; raises CheckpointSaveError if either failed."""
    if self._pending is not None:
      self._checked(self._manager.wait_until_finished, self._manager.check_for_errors)
      step, self._pending = self._pending, None
      self._join_manifest()
      if jax.process_index() == 0:
        self._manifest = _ManifestThread(step_dir(self.directory, step))
      self._join_manifest()
      distributed.barrier(f"mor_jax_manifest_{step}")
    self._join_manifest()

  def _join_manifest(self) -> None:
    manifest, self._manifest = self._manifest, None
    if manifest is not None:
      manifest.join()
      if manifest.error is not None:
        raise CheckpointSaveError(f"writing the checksums of {manifest.step_dir} failed "
                                  f"({type(manifest.error).__name__}: {_first_line(manifest.error)}); the step is "
                                  "complete and restores without checksum verification")

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._pending = None
      if self._manifest is not None:
        self._manifest.join()
        self._manifest = None
      try:
        self._manager.close()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("closing the checkpoint manager of %s: %s", self.directory, _first_line(e))

  def _save_error(self, e: BaseException) -> CheckpointSaveError:
    step, self._pending = self._pending, None
    for tmp in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
      shutil.rmtree(tmp, ignore_errors=True)      # the unfinished step (frees the space it took)
    done = [s for s in steps_in(self.directory) if s != step]
    last = f"step {done[-1]}" if done else "none"
    if _no_space(e):
      msg = f"no space left on device while writing checkpoint {step} to {self.directory}"
    else:
      msg = f"writing checkpoint {step} to {self.directory} failed ({type(e).__name__}: {_first_line(e)})"
    return CheckpointSaveError(f"{msg}; the last complete checkpoint is {last}")

  # ------------------------------------------------------------------ restoring
  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {}

  def restore(self, step: int, abstract_state, shardings,
              check_meta: Callable[[dict], Any] | None = None) -> TrainRestore:
    """Restores one step exactly onto `shardings`; raises CheckpointCorruptError when it is proven damaged."""
    d = step_dir(self.directory, step)
    if integrity.has_manifest(d):
      integrity.verify_manifest(d)
    else:
      logging.info("checkpoint %s has no checksums (written before they existed, or cut before they were): "
                   "restoring it without checksum verification.", d)
    meta = self.restore_meta(step)
    if check_meta is not None:
      check_meta(meta)               # CheckpointMismatchError: not a corruption
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    out = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                              data=ocp.args.JsonRestore()))
    state = out["state"]
    got = int(np.asarray(jax.device_get(state.step)))
    if got != step:
      raise CheckpointCorruptError(f"{d} holds the state of step {got}", d)
    bad = integrity.nonfinite_leaves(state)
    if bad:
      where = os.path.join(d, "state")
      raise CheckpointCorruptError(f"{where} holds non-finite values in {', '.join(bad[:4])}"
                                   + (f" and {len(bad) - 4} more leaves" if len(bad) > 4 else ""), where)
    return TrainRestore(step=step, state=state, data=_process_data_state(out["data"] or {}, step), meta=meta,
                        directory=d)

  def restore_latest(self, abstract_state, shardings, check_meta=None) -> TrainRestore | None:
    """The newest good step (see the module docstring); None for an empty directory. An unfinished newest step
    folder is refused (layout.check_newest_complete: the same decision as inference's)."""
    check_newest_complete(self.directory)
    damaged: list[tuple[int, CheckpointCorruptError]] = []
    for step in reversed(self.all_steps()):
      try:
        restored = self.restore(step, abstract_state, shardings, check_meta)
      except (CheckpointMismatchError, CheckpointSaveError):
        raise
      except CheckpointCorruptError as e:
        damaged.append((step, e))
        continue
      except FileNotFoundError as e:       # a file of the step is missing: proven unreadable
        damaged.append((step, CheckpointCorruptError(f"{e.filename or step_dir(self.directory, step)} is missing",
                                                     e.filename or step_dir(self.directory, step))))
        continue
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(
            f"reading checkpoint {step} in {self.directory} failed ({type(e).__name__}: {_first_line(e)}). This "
            "is not a proven corruption (e.g. a read error or out of memory), so nothing was moved; fix the cause "
            "and run again.") from e
      for s, e in damaged:
        logging.warning("checkpoint %d is damaged: %s. Moving it to %s and resuming from step %d.", s, e,
                        self.corrupt_dir, step)
        self._quarantine(s)
      return restored
    if damaged:
      raise CheckpointCorruptError(
          f"every checkpoint in {self.directory} is unreadable: " + "; ".join(f"step {s}: {e}" for s, e in damaged)
          + ". Nothing was moved or changed. To start over, use a new --workdir (or move the checkpoints away).",
          damaged[0][1].path)
    return None

  def _quarantine(self, step: int) -> None:
    src = step_dir(self.directory, step)
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(self.corrupt_dir, exist_ok=True)
      shutil.move(src, os.path.join(self.corrupt_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"))
    distributed.barrier(f"mor_jax_quarantine_{step}")
    self._manager.reload()


class _ManifestThread(threading.Thread):
  """Writes the checksum manifest of a complete step (integrity.write_manifest) in the background; `error` holds
  what it raised. Started only once Orbax has finished the step."""

  def __init__(self, step_dir_: str):
    super().__init__(name=f"mor_jax-manifest-{os.path.basename(step_dir_)}", daemon=True)
    self.step_dir, self.error = step_dir_, None
    self.start()

  def run(self) -> None:
    try:
      if os.path.isdir(self.step_dir):
        integrity.write_manifest(self.step_dir)
    except Exception as e:  # pylint: disable=broad-except (raised on the training thread by _join_manifest)
      self.error = e


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
