"""SIGTERM / SIGINT during training: finish the step, save, write the report, exit 'interrupted' (code 75)."""

from __future__ import annotations

import signal
import threading

from absl import logging


class SignalGuard:
  """First SIGTERM/SIGINT sets `received`; a second SIGINT raises KeyboardInterrupt."""

  def __init__(self):
    self.received: str | None = None
    self._old: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    logging.warning("received %s: finishing this step, writing a checkpoint and the report, then exiting "
                    "(press Ctrl-C again to abort without saving).", self.received)

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    return False
