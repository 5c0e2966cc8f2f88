"""Prometheus metrics of the server (its own registry, served at GET /metrics in the text format)."""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
  """requests (by endpoint and status), queue depth, busy slots, tokens/s (last 10 s), time to first token and
  inter-token latency histograms, recursions per generated token (mean and total)."""

  def __init__(self, slots: int, recursions: int):
    r = self.registry = CollectorRegistry()
    self.requests = Counter("mor_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
    self.queue_depth = Gauge("mor_queue_depth", "requests waiting for a slot", registry=r)
    self.busy_slots = Gauge("mor_busy_slots", "engine slots holding a request", registry=r)
    Gauge("mor_slots", "engine slots", registry=r).set(slots)
    Gauge("mor_max_recursions", "recursions of the model's shared block", registry=r).set(recursions)
    self.generated = Counter("mor_generated_tokens", "tokens generated", registry=r)
    self.recursions = Counter("mor_recursions", "recursions run for generated tokens", registry=r)
    self.mean_recursions = Gauge("mor_mean_recursions_per_token", "recursions per generated token (all so far)",
                                 registry=r)
    self.tokens_per_s = Gauge("mor_tokens_per_second", "tokens generated per second over the last 10 s", registry=r)
    self.ttft = Histogram("mor_time_to_first_token_seconds", "submission to first token", buckets=LATENCY_BUCKETS,
                          registry=r)
    self.itl = Histogram("mor_inter_token_latency_seconds", "time between tokens of a request",
                         buckets=LATENCY_BUCKETS, registry=r)
    self.step_seconds = Histogram("mor_engine_step_seconds", "one engine step (admission + ticks + host work)",
                                  buckets=LATENCY_BUCKETS, registry=r)
    self.timeouts = Counter("mor_request_timeouts", "requests cancelled at their deadline", registry=r)
    self.cancelled = Counter("mor_cancelled_requests", "requests cancelled before they finished (client gone, stop "
                             "string)", registry=r)
    self.disconnects = Counter("mor_client_disconnects", "requests cancelled because the client went away",
                               registry=r)
    self._lock = threading.Lock()
    self._window: collections.deque = collections.deque()   # (time, tokens)
    self._n = self._rec = 0

  def step(self, seconds: float, busy: int, waiting: int) -> None:
    if seconds:
      self.step_seconds.observe(seconds)
    self.busy_slots.set(busy)
    self.queue_depth.set(waiting)

  def first_token(self, seconds: float) -> None:
    self.ttft.observe(seconds)

  def inter_token(self, seconds: float, n: int) -> None:
    for _ in range(n):
      self.itl.observe(seconds / n)

  def tokens(self, recursions) -> None:
    now, n = time.monotonic(), len(recursions)
    self.generated.inc(n)
    self.recursions.inc(sum(recursions))
    with self._lock:
      self._n, self._rec = self._n + n, self._rec + sum(recursions)
      self.mean_recursions.set(self._rec / max(1, self._n))
      self._window.append((now, n))

  def render(self) -> bytes:
    now = time.monotonic()
    with self._lock:
      while self._window and self._window[0][0] < now - 10:
        self._window.popleft()
      self.tokens_per_s.set(sum(n for _, n in self._window) / 10.0)
    return generate_latest(self.registry)
