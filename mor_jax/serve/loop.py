"""The engine loop: one thread owns the devices and drives the engine; HTTP handlers talk to it through jobs.

A handler makes a `Job` (prompt ids, limits, sampling) and `submit`s it: refused with `QueueFull` when
`max_queue` jobs already wait for a slot. The loop thread moves submitted jobs into the engine, calls
`Engine.step(ticks_per_step)` while anything is queued or in flight, and hands each job its progress (new
tokens with their recursion depths, then the result) through the job's asyncio queue on the handler's event
loop. `cancel` (a client that went away, a stop string, a timeout) frees the job's slot at the next step.
Deadlines are checked by the loop: a job past its deadline is cancelled and told ("timeout").
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from mor_jax.infer.sampling import SamplingParams


class QueueFull(Exception):
  pass


@dataclasses.dataclass(eq=False)
class Job:
  """One request's life between an HTTP handler and the engine loop. Events on `events`: ("tokens", ids,
  depths), then ("done", Generation) or ("timeout", None) or ("error", message)."""
  prompt_tokens: list[int]
  max_new: int
  sampling: SamplingParams
  seed: int
  deadline: float                  # time.monotonic() after which the job is cancelled
  loop: asyncio.AbstractEventLoop
  events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
  submitted: float = dataclasses.field(default_factory=time.monotonic)
  rid: int | None = None           # the engine's request id (loop thread only)
  first: float | None = None       # time of the first token
  last: float | None = None
  ended: bool = False

  def tell(self, *event) -> None:
    try:
      self.loop.call_soon_threadsafe(self.events.put_nowait, event)
    except RuntimeError:           # the handler's event loop is gone
      pass


class EngineLoop:
  """Drives `engine` (an Engine) from one thread; see the module docstring. `metrics`: a serve.metrics.Metrics."""

  def __init__(self, engine, metrics, *, max_queue: int = 256, ticks_per_step: int = 4, stop_at_eos: bool = True):
    self.engine, self.metrics, self.stop_at_eos = engine, metrics, stop_at_eos
    self.max_queue, self.ticks_per_step = int(max_queue), int(ticks_per_step)
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._waiting: set[Job] = set()          # submitted, no token yet
    self._jobs: dict[int, Job] = {}          # engine id -> job (loop thread only)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._main, name="mor-engine-loop", daemon=True)
    self.error: BaseException | None = None

  # ------------------------------------------------------------------ handler side (any thread)
  def start(self) -> None:
    self._thread.start()

  @property
  def waiting(self) -> int:
    with self._lock:
      return len(self._waiting)

  def submit(self, job: Job) -> None:
    with self._lock:
      if len(self._waiting) >= self.max_queue:
        raise QueueFull()
      self._waiting.add(job)
    self._inbox.put(("submit", job))

  def cancel(self, job: Job) -> None:
    if not job.ended:
      self._inbox.put(("cancel", job))

  def stop(self, timeout: float | None = None) -> None:
    """Ends the loop: jobs still queued or in flight are cancelled (told 'error')."""
    self._stop.set()
    self._inbox.put(("wake", None))
    self._thread.join(timeout)

  # ------------------------------------------------------------------ loop thread
  def _main(self) -> None:
    eng = self.engine
    eng.start(stream=True, stop_at_eos=self.stop_at_eos)
    try:
      while True:
        self._take_inbox(block=eng.idle)
        if self._stop.is_set():
          break
        self._expire()
        if not eng.idle:
          t = time.monotonic()
          events = eng.step(self.ticks_per_step)
          self.metrics.step(time.monotonic() - t, eng.busy, self.waiting)
          for ev in events:
            self._deliver(ev)
        else:
          self.metrics.step(0.0, 0, self.waiting)
    except BaseException as e:  # pylint: disable=broad-except (reported to every job, then to the server)
      logging.exception("engine loop failed")
      self.error = e
    finally:
      self._end_all("the server is shutting down" if self.error is None else f"engine error: {self.error}")
      eng.finish()

  def _take_inbox(self, block: bool) -> None:
    try:
      item = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
    except queue.Empty:
      return
    while True:
      self._handle(*item)
      try:
        item = self._inbox.get_nowait()
      except queue.Empty:
        return

  def _handle(self, kind: str, job: Job | None) -> None:
    if kind == "submit":
      if job.ended:
        return
      job.rid = self.engine.submit(job.prompt_tokens, job.max_new, row_id=0, sampling=job.sampling, seed=job.seed)
      self._jobs[job.rid] = job
    elif kind == "cancel" and job.rid is not None and not job.ended:
      self.engine.cancel(job.rid)
      self._drop(job)
      self.metrics.cancelled.inc()

  def _drop(self, job: Job) -> None:
    job.ended = True
    self._jobs.pop(job.rid, None)
    with self._lock:
      self._waiting.discard(job)

  def _expire(self) -> None:
    now = time.monotonic()
    for job in [j for j in self._jobs.values() if j.deadline < now]:
      self.engine.cancel(job.rid)
      self._drop(job)
      self.metrics.timeouts.inc()
      job.tell("timeout", None)

  def _deliver(self, ev) -> None:
    job = self._jobs.get(ev.id)
    if job is None:                 # cancelled meanwhile
      return
    now = time.monotonic()
    if ev.tokens:
      if job.first is None:
        job.first = now
        with self._lock:
          self._waiting.discard(job)
        self.metrics.first_token(now - job.submitted)
      elif job.last is not None:
        self.metrics.inter_token(now - job.last, len(ev.tokens))
      job.last = now
      self.metrics.tokens(ev.recursions)
      job.tell("tokens", ev.tokens, ev.recursions)
    if ev.result is not None:
      self._drop(job)
      job.tell("done", ev.result)

  def _end_all(self, message: str) -> None:
    while True:
      try:
        kind, job = self._inbox.get_nowait()
      except queue.Empty:
        break
      if kind == "submit":
        self._jobs[id(job)] = job
    for job in list(self._jobs.values()):
      if job.rid is not None:
        self.engine.cancel(job.rid)
      self._drop(job)
      job.tell("error", message)
