"""`DevicePrefetcher`: host batches read and put on the devices ahead of the step, by a background thread."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator


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
