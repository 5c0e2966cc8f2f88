"""The one owner of what a checkpoint is (used by train, infer, evaluate and interop).

  layout.py     WORKDIR/checkpoints/<step>/{state,data,meta,checksums.json}; the errors
  schema.py     the meta schema (architecture, full config, state-tree signature) and the compatibility
                check: a mismatch is not a corruption (CheckpointMismatchError, train.allow_changes)
  integrity.py  per-step checksum manifest; finiteness of a restored state
  manager.py    Checkpointer: async save with prompt failure detection; verified restore for training
                (TrainRestore) with fallback only past steps proven unreadable
  params.py     params-only restore for inference (ParamsRestore)
  lock.py       the exclusive workdir lock
`write_imported_step` writes step 0 of a new workdir from an imported state (interop/importer.py).
"""

from __future__ import annotations

from mor_jax.checkpoint import schema
from mor_jax.checkpoint.layout import (CHECKPOINTS_SUBDIR, CheckpointCorruptError, CheckpointError,
                                       CheckpointMismatchError, CheckpointSaveError, WorkdirLockedError,
                                       checkpoints_dir, find_checkpoints, has_checkpoints, require_new_workdir,
                                       require_writable, step_dir, steps_in)
from mor_jax.checkpoint.lock import WorkdirLock
from mor_jax.checkpoint.manager import Checkpointer, TrainRestore
from mor_jax.checkpoint.params import ParamsRestore, default_sharding, read_meta, restore_params


def write_imported_step(workdir: str, config, state, *, validated=None, extra_meta: dict | None = None) -> str:
  """Writes `state` (a full TrainState) as step 0 of the new workdir `workdir`; returns the step directory."""
  directory = checkpoints_dir(workdir)
  require_new_workdir(workdir)
  meta = schema.new_meta(config, state, validated)
  meta["checkpoints_written"] = [0]
  meta.update(extra_meta or {})
  with WorkdirLock(workdir):
    ck = Checkpointer(directory, max_to_keep=None, async_save=False)
    try:
      ck.save(0, state, None, meta)
    finally:
      ck.close()
  return step_dir(directory, 0)


__all__ = [
    "CHECKPOINTS_SUBDIR", "CheckpointCorruptError", "CheckpointError", "CheckpointMismatchError",
    "CheckpointSaveError", "Checkpointer", "ParamsRestore", "TrainRestore", "WorkdirLock", "WorkdirLockedError",
    "checkpoints_dir", "default_sharding", "find_checkpoints", "has_checkpoints", "read_meta",
    "require_new_workdir", "require_writable", "restore_params", "schema",
    "step_dir", "steps_in", "write_imported_step",
]
