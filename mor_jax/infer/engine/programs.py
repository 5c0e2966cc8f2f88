"""The engine's compiled programs: each compiled once for the shapes it serves, ahead of time in a background
thread or on first use.

  ("ticks", layout, active)  one step of ticks at a cache capacity, on the first `active` slots (tick.run_step)
  ("resize", old, new)       the state moved between capacities (layout.resize)
  ("prefill", rows, P)       a prefill of `rows` prompts of up to P tokens (admit.prefill; independent of capacity)
  ("insert", layout, rows, P)   its requests moved into the state at a capacity (admit.insert)

A program needed before it is ready is compiled on the spot (or waited for, if the background thread is on it);
`ahead(key)` queues one for the background thread, so that the next capacity bucket is compiled while the engine
serves the current one instead of stalling every stream when a sequence crosses into it. Compilation goes through
JAX's AOT path (`jit(...).lower(shapes).compile()`), so JAX's persistent compilation cache applies, with the
XLA options `compilation.decode_options` gives for the rows of its products.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
import time

import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer import compilation
from mor_jax.infer.engine import admit, layout as layout_lib
from mor_jax.infer.engine.tick import run_step


def _shape(a):
  return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _scalar(dtype):
  return jax.ShapeDtypeStruct((), dtype)


def _rows(n: int, dtype, *tail):
  return jax.ShapeDtypeStruct((n,) + tail, dtype)


def _sampling(n: int) -> dict:
  return {"temperature": _rows(n, jnp.float32), "top_k": _rows(n, jnp.int32), "top_p": _rows(n, jnp.float32)}


class Programs:
  """The compiled programs of one engine (model config, weights' shapes and dtype); thread-safe."""

  def __init__(self, cfg: ModelConfig, weights):
    self.cfg = cfg
    self.w = jax.tree.map(_shape, weights)
    self.dtype = weights.dtype
    self._ready: dict = {}
    self._pending: dict = {}
    self._lock = threading.Lock()
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mor-engine-compile")
    self.compile_s = 0.0          # seconds spent compiling on the caller's thread (stalls)
    self.compiled: list = []      # keys in the order they were compiled

  def get(self, key):
    """The compiled program for `key`: ready, waited for, or compiled now."""
    key = _normal(key)
    with self._lock:
      if key in self._ready:
        return self._ready[key]
      fut = self._pending.get(key)
    if fut is None:
      t = time.perf_counter()
      prog = self._build(key)
      self.compile_s += time.perf_counter() - t
      logging.info("engine: compiled %s on first use in %.1fs", describe(key), time.perf_counter() - t)
    else:
      prog = fut.result()
    with self._lock:
      self._ready[key] = prog
      self._pending.pop(key, None)
    return prog

  def ahead(self, key) -> None:
    """Queues `key` for the background thread (nothing if it is ready or queued)."""
    key = _normal(key)
    with self._lock:
      if key in self._ready or key in self._pending:
        return
      self._pending[key] = self._pool.submit(self._build, key)

  def known(self, key) -> bool:
    """Is `key` compiled or queued?"""
    key = _normal(key)
    with self._lock:
      return key in self._ready or key in self._pending

  def wait(self) -> None:
    """Waits for the programs queued so far."""
    with self._lock:
      futures = list(self._pending.values())
    concurrent.futures.wait(futures)

  def _build(self, key):
    kind, rows = key[0], 0
    if kind == "ticks":
      lay, active = key[1], key[2]
      rows = active
      fn = jax.jit(functools.partial(run_step, self.cfg, lay, active), donate_argnums=(1,))
      i32 = _scalar(jnp.int32)
      args = (self.w, self.state(lay), _scalar(jnp.float32), i32, i32, i32, i32)
    elif kind == "resize":
      old, new = key[1], key[2]
      fn, args = jax.jit(functools.partial(layout_lib.resize, old, new)), (self.state(old),)
    elif kind == "prefill":
      n, P = key[1], key[2]
      rows = n * P
      fn = jax.jit(functools.partial(admit.prefill, self.cfg, key[3]))
      args = (self.w, _rows(n, jnp.int32, P), _rows(n, jnp.int32), _rows(n, jnp.uint32, 2), _sampling(n),
              _scalar(jnp.float32))
    elif kind == "insert":
      lay, n, P = key[1], key[2], key[3]
      fn = jax.jit(functools.partial(admit.insert, self.cfg, lay), donate_argnums=(0,))
      i = lambda: _rows(n, jnp.int32)
      args = (self.state(lay), self.prefilled(lay, n, P), i(), i(), i(), _rows(n, jnp.uint32, 2), i(), i(),
              _sampling(n), _scalar(jnp.int32))
    else:
      raise ValueError(f"unknown engine program {key!r}")
    prog = fn.lower(*args).compile(compiler_options=compilation.decode_options(self.dtype, rows) or None)
    with self._lock:
      self.compiled.append(key)
    return prog

  def state(self, lay):
    return jax.eval_shape(functools.partial(layout_lib.init_state, self.cfg, lay, self.dtype))

  def prefilled(self, lay, n: int, P: int):
    """Shapes of a prefill's caches (the first output of admit.prefill)."""
    out = jax.eval_shape(functools.partial(admit.prefill, self.cfg, lay), self.w, _rows(n, jnp.int32, P),
                         _rows(n, jnp.int32), _rows(n, jnp.uint32, 2), _sampling(n), _scalar(jnp.float32))
    return out[0]


def _normal(key):
  """Only the decode step depends on the entry/exit sub-batch sizes: other programs are keyed without them."""
  if key[0] == "ticks":
    return key
  return tuple(k.rows_free() if isinstance(k, layout_lib.EngineLayout) else k for k in key)


def describe(key) -> str:
  kind = key[0]
  if kind == "ticks":
    return f"the decode step at {key[1].capacity} positions per sequence on {key[2]} slot(s)"
  if kind == "resize":
    return f"the cache resize {key[1].capacity} -> {key[2].capacity}"
  if kind == "prefill":
    return f"the prefill of {key[1]} prompt(s) of up to {key[2]} tokens"
  return f"the admission of {key[2]} prompt(s) of up to {key[3]} tokens at {key[1].capacity} positions"


def next_keys(lay, actives, shapes_used) -> list:
  """What an engine at layout `lay` may need next, to compile in the background so that neither a sequence that
  outgrows the caches nor an admission waits for a compilation: the decode steps (on `actives` slots) and the
  resize of the next capacity bucket, the resize back to the smallest (idle caches shrink), and the admission of
  every prefill shape (rows, P) used so far at the current, the next and the smallest capacity (a shape first used
  at one capacity comes back at the others)."""
  nxt = lay.at_capacity(layout_lib.bucket(lay.capacity + 1, lay.max_len))
  smallest = lay.at_capacity(layout_lib.bucket(1, lay.max_len))
  keys = []
  if nxt.capacity > lay.capacity:
    keys += [("ticks", nxt, a) for a in actives] + [("resize", lay, nxt)]
  if smallest.capacity < lay.capacity:
    keys.append(("resize", lay, smallest))
  for at in {smallest.capacity: smallest, lay.capacity: lay, nxt.capacity: nxt}.values():
    keys += [("insert", at, n, P) for n, P in sorted(shapes_used) if at.capacity >= layout_lib.bucket(P, lay.max_len)]
  return keys
