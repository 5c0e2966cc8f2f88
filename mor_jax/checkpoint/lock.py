"""The workdir lock: one training run per workdir.

`WorkdirLock(workdir)` holds an exclusive `fcntl.flock` on WORKDIR/.lock, which records the holder's pid,
host and start time. It is taken before anything else is written to the workdir and released on exit; the
kernel drops it when the holder dies, so a lock file left by a killed run (its content still names the dead
holder) is taken over with a warning. A second run on the same workdir gets WorkdirLockedError naming the
holder and touches nothing. In a multi-process run process 0 takes the lock and the others wait for it on a
barrier (they write only through Orbax, in step with process 0).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket

from absl import logging

from mor_jax import distributed
from mor_jax.checkpoint.layout import LOCK_FILE, WorkdirLockedError


def _holder(text: str) -> str:
  try:
    h = json.loads(text)
    return f"pid {h['pid']} on {h['host']} (started {h['started']})"
  except (ValueError, KeyError, TypeError):
    return "another process"


class WorkdirLock:
  """Context manager: the exclusive lock on a workdir (see the module docstring)."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock (process 0); every process raises WorkdirLockedError when it is held elsewhere."""
    refused = None
    if distributed.process_index() == 0:
      try:
        self._acquire_here()
      except WorkdirLockedError as e:
        refused = str(e)
    refused = distributed.allgather_json(refused)[0]   # process 0's answer, for every process
    if refused is not None:
      raise WorkdirLockedError(refused)
    return self

  def _acquire_here(self) -> None:
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        raise
      raise WorkdirLockedError(f"the workdir {self.workdir} is in use by another training run ({_holder(text)}; "
                               f"lock file {self.path}). Wait for it to finish, stop it, or use another --workdir."
                               ) from None
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:
      logging.warning("the workdir lock %s was left by a run that is gone (%s); taking it over.", self.path,
                      _holder(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)        # an empty lock file: released cleanly (no holder to report)
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False
