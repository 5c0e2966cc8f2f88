"""The engine loop: one thread owns the devices and drives the engine; HTTP handlers talk to it through jobs.

A handler makes a `Job` (prompt ids, limits, sampling) and `submit`s it: refused with `QueueFull` when
`max_queue` jobs already wait for a slot. The loop thread moves submitted jobs into the engine, calls
`Engine.step()` (one step: about --step_tokens tokens per slot) while anything is queued or in flight, and
hands each job its progress (new tokens with their recursion depths, then the result) through the job's asyncio
queue on the handler's event loop. `cancel` (a client that went away, a stop string, a timeout) frees the job's
slot at the next step. Deadlines are checked by the loop: a job past its deadline is cancelled and told ("timeout").

Failures: a request the engine refuses at submission is told ("error", "invalid_request", why) and the loop goes
on. Anything else the engine raises ends the loop: every job queued or in flight is told ("error",
"engine_failed", cause), later submissions raise `LoopClosed`, and `on_failure(error)` is called (the server
shuts down and exits 1, so that a supervisor restarts it). `abort` (the drain timeout) tells every job
("error", "shutting_down", why) and closes the loop to new jobs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time

from mor_jax.infer.errors import InferenceError
from mor_jax.infer.sampling import SamplingParams

INT32_MAX = 2 ** 31 - 1


class QueueFull(Exception):
  pass


class LoopClosed(Exception):
  """The loop takes no more jobs (the engine failed, or the server aborted its requests); str: why."""


@dataclasses.dataclass(eq=False)
class Job:
  """One request's life between an HTTP handler and the engine loop. Events on `events`: ("tokens", ids,
  depths), then ("done", Generation) or ("timeout", None) or ("error", kind, message) with kind one of
  "invalid_request", "engine_failed", "shutting_down"."""
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
  ended: bool = False              # the loop is done with it (loop thread)
  answered: bool = False           # the handler has its outcome, or the client went away (handler's event loop)

  def tell(self, *event) -> None:
    try:
      self.loop.call_soon_threadsafe(self.events.put_nowait, event)
    except RuntimeError:           # the handler's event loop is gone
      pass


class EngineLoop:
  """Drives `engine` (an Engine) from one thread; see the module docstring. `metrics`: a serve.metrics.Metrics."""

  def __init__(self, engine, metrics, *, max_queue: int = 256, stop_at_eos: bool = True, on_failure=None):
    self.engine, self.metrics, self.stop_at_eos = engine, metrics, stop_at_eos
    self.max_queue = int(max_queue)
    self.on_failure = on_failure             # called (loop thread) with the error that ended the loop
    self._inbox: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._waiting: set[Job] = set()          # submitted, no token yet
    self._jobs: dict[int, Job] = {}          # engine id -> job (loop thread only)
    self._closed: str | None = None          # why new jobs are refused (under _lock)
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

  @property
  def error_message(self) -> str | None:
    e = self.error
    if e is None:
      return None
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"the engine failed: {type(e).__name__}" + (f": {first}" if first else "")

  def submit(self, job: Job) -> None:
    """Queues `job`; raises QueueFull (max_queue jobs wait already) or LoopClosed."""
    with self._lock:                         # (the inbox is filled under the lock: _close drains all of it)
      if self._closed is not None:
        raise LoopClosed(self._closed)
      if len(self._waiting) >= self.max_queue:
        raise QueueFull()
      self._waiting.add(job)
      self._inbox.put(("submit", job))

  def cancel(self, job: Job) -> None:
    if not job.ended:
      self._inbox.put(("cancel", job))

  def abort(self, message: str) -> None:
    """Ends every job queued or in flight now (told ("error", "shutting_down", message)); refuses new ones."""
    self._inbox.put(("abort", message))

  def stop(self, timeout: float | None = None) -> None:
    """Ends the loop: jobs still queued or in flight are told ("error", "shutting_down", ...)."""
    self._stop.set()
    self._inbox.put(("wake", None))
    self._thread.join(timeout)

  # ------------------------------------------------------------------ loop thread
  def _main(self) -> None:
    eng = self.engine
    try:
      eng.start(stream=True, stop_at_eos=self.stop_at_eos)
      while True:
        self._take_inbox(block=eng.idle)
        if self._stop.is_set():
          break
        self._expire()
        if not eng.idle:
          t = time.monotonic()
          events = eng.step()
          self.metrics.step(time.monotonic() - t, eng.busy, self.waiting)
          for ev in events:
            self._deliver(ev)
        else:
          self.metrics.step(0.0, 0, self.waiting)
    except BaseException as e:  # pylint: disable=broad-except (reported to every job, then to the server)
      logging.exception("engine loop failed")
      self.error = e
    if self.error is None:
      self._close("shutting_down", "the server is shutting down")
    else:
      self._close("engine_failed", self.error_message + " (the server is going down)")
    try:
      eng.finish()
    except Exception:  # pylint: disable=broad-except (the engine that failed may fail again here: already reported)
      pass
    if self.error is not None and self.on_failure is not None:
      self.on_failure(self.error)

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

  def _handle(self, kind: str, job) -> None:
    if kind == "submit":
      if not job.ended:
        self._admit(job)
    elif kind == "cancel" and job.rid is not None and not job.ended:
      self.engine.cancel(job.rid)
      self._drop(job)
      self.metrics.cancelled.inc()
    elif kind == "abort":
      self._close("shutting_down", job)

  def _admit(self, job: Job) -> None:
    """Submits `job` to the engine; a request the engine refuses is answered, the loop goes on."""
    try:
      sp = job.sampling
      for name, v in (("top_k", sp.top_k), ("seed", job.seed), ("max_tokens", job.max_new)):
        if not 0 <= v <= INT32_MAX:         # (the HTTP layer bounds them; the engine's arrays are int32)
          raise InferenceError(f"{name}={v} is outside [0, {INT32_MAX}]")
      job.rid = self.engine.submit(job.prompt_tokens, job.max_new, row_id=0, sampling=sp, seed=job.seed)
    except (InferenceError, ValueError, OverflowError, TypeError) as e:
      self._drop(job)
      job.tell("error", "invalid_request", str(e).splitlines()[0] if str(e) else type(e).__name__)
      return
    self._jobs[job.rid] = job

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

  def _close(self, kind: str, message: str) -> None:
    """Refuses new jobs from now on and tells every job queued or in flight ("error", kind, message)."""
    with self._lock:
      if self._closed is None:
        self._closed = message
    jobs = list(self._jobs.values())
    while True:
      try:
        what, job = self._inbox.get_nowait()
      except queue.Empty:
        break
      if what == "submit" and not job.ended:
        jobs.append(job)
    for job in jobs:
      if job.rid is not None and self.error is None:
        self.engine.cancel(job.rid)
      self._drop(job)
      job.tell("error", kind, message)
