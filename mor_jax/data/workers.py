"""Worker processes that exit when the process that started them dies.

grain's `mp_prefetch` workers and the pre-tokenizing pool are spawned
processes; after a kill -9 of the trainer they would live on under PID 1
(each holding its pipeline, ~240 MB), and with them multiprocessing's
resource tracker. Each worker runs an `ExitWithParent()` initializer at start: a
daemon thread that ends the worker within `_POLL_S` seconds of its parent's
death. (PR_SET_PDEATHSIG is not used: it fires when the *thread* that started
the worker exits, and grain may start workers from a prefetch thread.)
"""

from __future__ import annotations

import os
import threading
import time

_POLL_S = 0.5


def _watch(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(_POLL_S)
  os._exit(1)  # pylint: disable=protected-access


class ExitWithParent:
  """A worker initializer: the worker exits as soon as the process that started it is gone.

  The parent's pid is recorded when the initializer is pickled, i.e. in the
  process that starts the worker, so a worker that is still starting up when
  its parent dies (it has been re-parented already) exits at once. Any
  arguments are ignored: it serves as grain's `worker_init_fn(worker_index,
  num_workers)` and as a process-pool initializer.
  """

  def __init__(self):
    self.parent_pid = os.getpid()

  def __getstate__(self):
    return {"parent_pid": os.getpid()}

  def __call__(self, *unused_args) -> None:
    if os.getppid() != self.parent_pid:
      os._exit(1)  # pylint: disable=protected-access
    threading.Thread(target=_watch, args=(self.parent_pid,), daemon=True,
                     name="exit-with-parent").start()
