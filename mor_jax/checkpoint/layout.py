"""Where a checkpoint lives and the errors that say what is wrong with one.

  WORKDIR/.lock                      the workdir lock (see lock.py)
  WORKDIR/checkpoints/<step>/        one Orbax step: items `state` (the TrainState), `data` (the data
                                     iterator's JSON state), `meta` (JSON: see schema.py)
  WORKDIR/checkpoints/<step>/checksums.json   size and SHA-256 of every file of the step, written once the
                                     (asynchronous) save has completed (see integrity.py)
  WORKDIR/checkpoints_corrupt/<step>-<time>/  steps proven unreadable, moved aside by a training restore
"""

from __future__ import annotations

import os
import tempfile

from mor_jax.errors import CheckpointError

CHECKPOINTS_SUBDIR = "checkpoints"
CORRUPT_SUFFIX = "_corrupt"
ITEMS = ("state", "data", "meta")
STATE_ITEM, _, META_ITEM = ITEMS
MANIFEST = "checksums.json"
LOCK_FILE = ".lock"


class CheckpointMismatchError(CheckpointError):
  """The checkpoint belongs to a different model or state tree than the config (not a corruption)."""


class CheckpointCorruptError(CheckpointError):
  """A step is proven unreadable (checksum mismatch, missing or truncated file, non-finite values)."""

  def __init__(self, message: str, path: str = ""):
    super().__init__(message)
    self.path = path       # the damaged file (or the step directory)


class CheckpointSaveError(CheckpointError):
  """Writing a checkpoint failed (e.g. no space left on device); earlier steps are intact."""


class WorkdirLockedError(CheckpointError):
  """Another run holds the workdir."""


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINTS_SUBDIR)


def corrupt_dir(directory: str) -> str:
  """WORKDIR/checkpoints_corrupt for WORKDIR/checkpoints."""
  return os.path.abspath(directory).rstrip("/") + CORRUPT_SUFFIX


def has_checkpoints(workdir: str | None) -> bool:
  """Whether WORKDIR/checkpoints holds any step folder (finished or not): a run resumes there, an import refuses it."""
  directory = checkpoints_dir(workdir) if workdir else ""
  return bool(directory) and os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def require_new_workdir(workdir: str) -> None:
  """Raises CheckpointError when `workdir` already holds checkpoints (imports write step 0 of a new workdir)."""
  if has_checkpoints(workdir):
    raise CheckpointError(f"{workdir} already holds checkpoints; import into a new --workdir (nothing was written).")


def require_writable(workdir: str, what: str) -> None:
  """Raises CheckpointError (one line) unless a file can be created in `workdir`: modes that write results there
  (eval) check this before computing anything. `what`: the file the mode writes."""
  try:
    fd, probe = tempfile.mkstemp(prefix=".mor_jax-write-probe-", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(f"{workdir} is not writable ({e.strerror or type(e).__name__}), so {what} cannot be "
                          "written there; nothing was computed. Fix: make it writable, or copy the workdir "
                          "(cp -r) and pass the copy as --workdir.") from None


def step_dir(directory: str, step: int) -> str:
  return os.path.join(directory, str(int(step)))


def is_step_dir(path: str) -> bool:
  return os.path.basename(os.path.normpath(path)).isdigit() and os.path.isdir(os.path.join(path, STATE_ITEM))


def steps_in(directory: str) -> list[int]:
  """The finished steps (digit-named folders with a `state` item) in a checkpoints directory."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit() and is_step_dir(os.path.join(directory, n)))


def check_newest_complete(directory: str) -> None:
  """The one decision about an unfinished newest step (a step folder without its `state` item, e.g. an empty
  folder or a copy cut short), the same in train, eval, generate and serve: refuse, in one line naming the folder
  and the fix; nothing is read, moved or deleted (using an older step silently would hide that the newest is gone).
  Orbax never leaves such a folder (it writes <step>.orbax-checkpoint-tmp-* and renames it when complete)."""
  if not os.path.isdir(directory):
    return
  finished = steps_in(directory)
  newest = max(finished, default=-1)
  unfinished = sorted(int(n) for n in os.listdir(directory)
                      if n.isdigit() and int(n) > newest and not is_step_dir(os.path.join(directory, n)))
  if unfinished:
    d = step_dir(directory, unfinished[-1])
    older = f"step {newest}" if finished else "a fresh start"
    raise CheckpointError(f"{d} is not a complete checkpoint (no {STATE_ITEM}/ in it); nothing was read or changed. "
                          f"Fix: restore it from where it was copied, or move it out of {directory} to use {older}.")


def find_checkpoints(path: str) -> tuple[str, list[int]]:
  """(directory holding <step>/ folders, available steps) for a workdir, checkpoints dir or step dir; an unfinished
  newest step is refused (`check_newest_complete`)."""
  p = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(p):
    raise CheckpointError(f"{path} does not exist; pass a training workdir (--workdir) or a checkpoint directory.")
  if is_step_dir(p):
    return os.path.dirname(p), [int(os.path.basename(p))]
  for d in (os.path.join(p, CHECKPOINTS_SUBDIR), p):
    check_newest_complete(d)
    steps = steps_in(d)
    if steps:
      return d, steps
  raise CheckpointError(f"no checkpoint found under {path}: expected {CHECKPOINTS_SUBDIR}/<step>/{STATE_ITEM} "
                        "(train first: python main.py --mode=train --workdir=...).")
