"""The engine's host side: the request queue, the step-wise loop and the `Engine` class.

A step admits waiting requests into free slots (admit.py: the plain path's `forward_cached`, batched: the rows
that arrived padded to a power of two, the prompt length bucketed), then runs ticks in a `lax.while_loop` until
enough slots are free to refill, the step's token budget is spent, a slot filled its read-back window, a token
reached the allocated capacity, or nothing is live; it reads back only the tokens made in the step. The caches
grow (and shrink) in capacity buckets with the longest live sequence (layout.resize), so their memory and the
attention's work follow the requests, not the model's context. A server drives `start` / `submit` / `step` /
`cancel` from one thread (`step` returns the tokens each request made since the last step); `run` / `generate`
drive it to completion.
"""

from __future__ import annotations

import collections
import functools
import logging
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.infer import prompts as prompts_lib
from mor_jax.infer import weights as weights_lib
from mor_jax.infer.decode import check_supported
from mor_jax.infer.engine import layout as layout_lib
from mor_jax.infer.engine import programs as programs_lib
from mor_jax.infer.engine.programs import Programs
from mor_jax.infer.engine.session import Progress, Request, Session, Slot, auto_rows, mib, request_keys
from mor_jax.infer.engine.layout import DONE, EngineLayout, EngineState, expected_recursions, init_state, live
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.generate import Generation
from mor_jax.infer.sampling import STOP, SamplingParams


class Engine:
  """Continuous depth-wise batching decode engine (see the package docstring).

  slots: sequences in flight (a step runs on the live ones: 1, a quarter of the slots, or all); max_len: positions
  one sequence may occupy (default: the model's context; the caches are allocated for what the live requests need,
  in buckets, never more); max_new_tokens: the most tokens one request may generate (default: max_len); threshold
  / kv_capacity / add_bos / dtype: as in `Generator`; entry_rows / exit_rows: sub-batch of the first layer / last
  layer + head per tick (None: all slots; 'auto', the default: `auto_rows`); refill_min: free slots that end a step
  to admit waiting requests (default max(1, slots // 8)); prefill_rows: prompts per prefill call (default 4: one
  request is prefilled alone, more in batches of prefill_rows, so each prompt-length bucket has two programs);
  window: tokens a slot may produce per step (the read-back buffer); step_tokens: tokens all slots together produce
  per `step()` (scaled to the live slots; default: no limit besides the window); compile_ahead: compile the next
  cache size's programs in a background thread while serving the current one (a server: no stall when a sequence
  outgrows the caches; `compile_ahead()` queues prompt buckets too); block_attention: how the shared block attends
  to its recursion regions ('auto' / 'masked' / 'gather', `layout.make_layout`).
  """

  def __init__(self, cfg: ModelConfig, variables, tokenizer=None, *, slots: int = 8, max_len: int | None = None,
               max_new_tokens: int | None = None, threshold: float | None = None, kv_capacity="full",
               entry_rows: int | str | None = "auto", exit_rows: int | str | None = "auto", block_attention="auto",
               refill_min: int | None = None, prefill_rows: int | None = None, add_bos: bool = False,
               dtype: str = "float32", window: int = 16, step_tokens: int | None = None, compile_ahead: bool = False):
    check_supported(cfg)
    if slots < 1:
      raise InferenceError(f"slots must be >= 1, got {slots}.")
    ctx = cfg.max_seq_len
    max_len = ctx if max_len is None else int(max_len)
    if not 1 < max_len <= ctx:
      raise InferenceError(f"max_len must be in [2, {ctx}] (the model's context), got {max_len}.")
    max_new = max_len if max_new_tokens is None else int(max_new_tokens)
    if max_new < 1:
      raise InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    prompts_lib.check_tokenizer(cfg.vocab_size, tokenizer, add_bos)
    expected = expected_recursions(cfg)
    auto = lambda v: auto_rows(slots, expected) if v == "auto" else v
    self.cfg, self.tokenizer, self.add_bos = cfg, tokenizer, add_bos
    self.threshold = float(cfg.threshold if threshold is None else threshold)
    self.max_new_tokens = min(max_new, max_len)
    self.layout = layout_lib.make_layout(cfg, slots, max_len, kv_capacity, auto(entry_rows), auto(exit_rows),
                                         window=window, block_attention=block_attention)
    self.weights = weights_lib.prepare_weights(cfg, variables, dtype)
    self.programs = Programs(cfg, self.weights)
    self.ahead = bool(compile_ahead)
    self._shapes_used: set = set()                # (rows, P) of the prefills so far, and those compiled ahead
    self.refill_min = max(1, slots // 8) if refill_min is None else max(1, int(refill_min))
    self.prefill_rows = max(1, min(slots, int(prefill_rows or 4)))
    self.step_tokens = None if not step_tokens else max(1, int(step_tokens))
    self.queue: collections.deque[Request] = collections.deque()
    self.results: dict[int, Generation] = {}
    self._next_id = 0
    self._state: EngineState | None = None
    self._run: Session | None = None
    self._pos = np.zeros((slots,), np.int64)      # position of each slot's token in flight (host copy)
    self.stats: dict = {}

  @property
  def _prefill_layout(self) -> EngineLayout:
    """The layout prefill programs are keyed by (they do not depend on the capacity)."""
    return self.layout.at_capacity(self.max_len)

  @property
  def slots(self) -> int:
    return self.layout.slots

  @property
  def max_len(self) -> int:
    return self.layout.max_len

  @property
  def context(self) -> int:
    """Tokens (prompt + generated) one sequence may hold in this engine: the model's context, or max_len + 1."""
    return min(self.cfg.max_seq_len, self.max_len + 1)

  def default_new_tokens(self, prompt_len: int) -> int:
    """New tokens a request of `prompt_len` tokens gets when it names no limit: what fits, at most max_new_tokens."""
    return max(1, min(self.max_new_tokens, self.context - prompt_len))

  @property
  def capacity(self) -> int:
    """Positions per sequence the caches hold now (a bucket that follows the live requests)."""
    return self.layout.capacity

  @property
  def busy(self) -> int:
    """Slots holding a request of the open session."""
    run = self._run   # (read once: a server's health check reads it from another thread)
    return 0 if run is None else sum(r is not None for r in run.owner)

  @property
  def idle(self) -> bool:
    return not self.queue and self.busy == 0

  def kv_bytes(self, capacity: int | None = None) -> int:
    """Bytes of the KV caches now (or at `capacity` positions per sequence)."""
    lay = self.layout if capacity is None else self.layout.at_capacity(layout_lib.bucket(capacity, self.max_len))
    return layout_lib.kv_bytes(self.cfg, lay, self.weights.dtype)

  # ------------------------------------------------------------------ requests
  def encode(self, prompt, i: int = 0) -> list[int]:
    return prompts_lib.encode_prompt(prompt, i, vocab_size=self.cfg.vocab_size, tokenizer=self.tokenizer,
                                     add_bos=self.add_bos)

  def check_request(self, prompt_len: int, n: int, who: str = "request") -> None:
    """Raises InferenceError when a prompt of `prompt_len` tokens asking for `n` new tokens does not fit."""
    ctx = self.cfg.max_seq_len
    if n < 1:
      raise InferenceError(f"{who}: max_new_tokens must be >= 1, got {n}.")
    if n > self.max_new_tokens:
      raise InferenceError(f"{who} asks for {n} new tokens but the engine allows at most {self.max_new_tokens} "
                           "(Engine(max_new_tokens=...)).")
    if prompt_len + n > ctx:
      raise InferenceError(f"{who}: prompt of {prompt_len} tokens + {n} new tokens = {prompt_len + n} exceeds the "
                           f"model's context of {ctx} tokens (model.max_seq_len). Shorten the prompt or ask for at "
                           f"most {max(0, ctx - prompt_len)} new tokens.")
    if prompt_len + n - 1 > self.max_len:
      raise InferenceError(f"{who}: prompt of {prompt_len} tokens + {n} new tokens needs {prompt_len + n - 1} cache "
                           f"positions but the engine holds {self.max_len} (Engine(max_len=...), the server's "
                           "--max_model_len).")

  def submit(self, prompt, max_new_tokens: int | None = None, *, row_id: int | None = None,
             sampling: SamplingParams | None = None, seed: int | None = None) -> int:
    """Queues a request; returns its id. row_id fixes its sampling key (default: the id); sampling / seed:
    its own (default: those of the session that serves it). May be called while a session runs."""
    rid = self._next_id
    t = self.encode(prompt, rid)
    n = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
    self.check_request(len(t), n, f"request {rid}")
    self._next_id += 1
    self.queue.append(Request(rid, t, n, rid if row_id is None else int(row_id),
                              prompt if isinstance(prompt, str) else None, time.perf_counter(), sampling,
                              None if seed is None else int(seed)))
    return rid

  def cancel(self, rid: int) -> bool:
    """Drops a waiting request, or ends a running one at the next step (its slot is freed there; its result
    has finish_reason 'stop'). False if the request is unknown or already finished."""
    for r in self.queue:
      if r.id == rid:
        self.queue.remove(r)
        return True
    run = self._run
    for b, s in enumerate(run.owner if run is not None else ()):
      if s is not None and s.req.id == rid:
        st = self._state
        self._state = st.replace(phase=st.phase.at[b].set(DONE), finish=st.finish.at[b].set(STOP))
        return True
    return False

  # ------------------------------------------------------------------ capacity
  def _fit(self, run: Session, need: int) -> None:
    """Moves the caches to the bucket of `need` positions when it is larger, or at most a quarter of them, or
    smaller while no slot holds a request."""
    lay = self.layout
    new = layout_lib.bucket(need, lay.max_len)
    idle = all(s is None for s in run.owner)
    if new == lay.capacity or (lay.capacity // 4 < new < lay.capacity and not idle):
      return
    logging.info("engine: KV caches %s from %d to %d positions per sequence (%s)", "grow" if new > lay.capacity
                 else "shrink", lay.capacity, new, mib(self.kv_bytes(new)))
    new_lay = lay.at_capacity(new)
    self._state = self.programs.get(("resize", lay, new_lay))(self._state)
    self.layout = new_lay
    run.resizes += 1
    self._compile_next()

  def _active(self, n: int) -> int:
    """Slots a step runs on when slots 0..n-1 may be live: 1 (a lone request), a quarter of the slots, or all (three
    decode programs per cache size)."""
    return next(a for a in (1, max(1, self.slots // 4), self.slots) if a >= n)

  def _compile_next(self) -> None:
    """Queues what the engine may need next for the background compiler (programs.next_keys)."""
    if self.ahead:
      actives = sorted({self._active(1), self._active(self.slots // 4), self.slots})
      for key in programs_lib.next_keys(self.layout, actives, self._shapes_used):
        self.programs.ahead(key)

  def compile_ahead(self, prompt_lengths: Sequence[int] = (), wait: bool = False) -> None:
    """Queues the programs for prompts of these lengths (one and `prefill_rows` at a time) and the decode step at
    the current capacity for the background compiler; `wait` blocks until they are ready. Their shapes count as
    seen from then on: the admission of each follows the caches to every size they take (`_compile_next`)."""
    keys = [("ticks", self.layout, a) for a in sorted({self._active(1), self._active(self.slots // 4), self.slots})]
    for P in sorted({prompts_lib.prompt_length(int(n), self.max_len) for n in prompt_lengths}):
      for n in sorted({1, self.prefill_rows}):
        keys += [("prefill", n, P, self._prefill_layout), ("insert", self.layout.at_capacity(
            layout_lib.bucket(P + 1, self.max_len)), n, P)]
        self._shapes_used.add((n, P))
    for key in keys:
      self.programs.ahead(key)
    if wait:
      self.programs.wait()
    self._compile_next()

  def _live_need(self, run: Session) -> int:
    """Positions the live slots need now (their token in flight included)."""
    owned = [b for b, s in enumerate(run.owner) if s is not None]
    return max((int(self._pos[b]) + 1 for b in owned), default=1)

  # ------------------------------------------------------------------ running
  def _admit(self, run: Session, free: list[int]) -> list[Progress]:
    """Prefills waiting requests into the free slots, up to `prefill_rows` per call; reports their first tokens."""
    events = []
    while self.queue and free:
      k = min(len(free), len(self.queue), self.prefill_rows)
      take = [self.queue.popleft() for _ in range(k)]
      events += self._prefill_into(run, take, free[:k])
      free = free[k:]
    return events

  def _prefill_into(self, run: Session, take: list[Request], slots: list[int]) -> list[Progress]:
    """One prefill call (one row, or a batch of `prefill_rows`: two programs per prompt-length bucket) and the
    insertion of its requests into `slots`."""
    B = self.layout.slots
    Bp = 1 if len(take) == 1 else self.prefill_rows
    longest = max(len(r.prompt_tokens) for r in take)
    P = prompts_lib.prompt_length(longest, self.max_len)
    self._fit(run, max(P, longest + 1, self._live_need(run)))
    tokens = np.zeros((Bp, P), np.int32)
    lengths, limits = np.ones((Bp,), np.int32), np.ones((Bp,), np.int32)
    slots_arr, reqs, row_ids = np.full((Bp,), B, np.int32), np.full((Bp,), -1, np.int32), np.zeros((Bp,), np.int32)
    seeds, sp = np.zeros((Bp,), np.int32), {"temperature": np.zeros((Bp,), np.float32),
                                            "top_k": np.zeros((Bp,), np.int32), "top_p": np.ones((Bp,), np.float32)}
    for i, (r, b) in enumerate(zip(take, slots)):
      tokens[i, :len(r.prompt_tokens)] = r.prompt_tokens
      lengths[i], slots_arr[i], limits[i] = len(r.prompt_tokens), b, r.max_new_tokens
      reqs[i], row_ids[i], seeds[i] = r.id, r.row_id, run.seed if r.seed is None else r.seed
      rs = r.sampling or run.sampling
      sp["temperature"][i], sp["top_k"][i], sp["top_p"][i] = rs.temperature, rs.top_k, rs.top_p
    ta = time.perf_counter()
    keys, lengths, sp = request_keys(jnp.asarray(seeds), jnp.asarray(row_ids)), jnp.asarray(lengths), \
        jax.tree.map(jnp.asarray, sp)
    new_shape = (Bp, P) not in self._shapes_used
    self._shapes_used.add((Bp, P))
    pc, prec, tok, rec = self.programs.get(("prefill", Bp, P, self._prefill_layout))(
        self.weights, jnp.asarray(tokens), lengths, keys, sp, run.args[0])
    self._state = self.programs.get(("insert", self.layout, Bp, P))(
        self._state, pc, tok, lengths, jnp.asarray(slots_arr), keys, jnp.asarray(limits), jnp.asarray(reqs), sp,
        run.args[1])
    if new_shape:
      self._compile_next()
    prec, tok, rec = jax.device_get((prec, tok, rec))
    run.admit_s += time.perf_counter() - ta
    run.admit_calls += 1
    events = []
    for i, (r, b) in enumerate(zip(take, slots)):
      s = run.owner[b] = Slot(r, [int(tok[i])], [int(rec[i])],
                               prompt_rec=[int(x) for x in prec[i, :len(r.prompt_tokens)]])
      self._pos[b] = len(r.prompt_tokens)
      if run.stream:
        events.append(Progress(r.id, list(s.tokens), list(s.recursions)))
        s.sent = 1
    return events

  def _collect(self, run: Session, phase, count, finish, recent, recent_rec, events: list[Progress]) -> list[Progress]:
    """Adds the step's new tokens to each request, reports them (streaming sessions) and the finished requests'
    results, whose slots become free."""
    by_id = {e.id: e for e in events}
    for b, s in enumerate(run.owner):
      if s is None:
        continue
      n_new = int(count[b]) - len(s.tokens) if count is not None else 0
      if n_new > 0:
        s.tokens += [int(x) for x in recent[b, :n_new]]
        s.recursions += [int(x) for x in recent_rec[b, :n_new]]
      ev = by_id.get(s.req.id)
      if run.stream and len(s.tokens) > s.sent:
        if ev is None:
          ev = by_id[s.req.id] = Progress(s.req.id, [], [])
          events.append(ev)
        ev.tokens += s.tokens[s.sent:]
        ev.recursions += s.recursions[s.sent:]
        s.sent = len(s.tokens)
      if phase[b] == DONE:
        if ev is None:
          ev = by_id[s.req.id] = Progress(s.req.id, [], [])
          events.append(ev)
        ev.result = run.done[s.req.id] = s.generation(self.tokenizer, int(finish[b]))
        run.owner[b] = None
    return [e for e in events if e.tokens or e.result is not None]

  def start(self, *, sampling: SamplingParams = SamplingParams(), seed: int = 0, stop_at_eos: bool = True,
            stream: bool = False) -> None:
    """Opens a serving session: `step` serves the queued requests and those submitted later. sampling / seed:
    defaults of requests that give none; stream: `step` also reports the tokens of unfinished requests."""
    if self._run is not None:
      raise InferenceError("the engine already serves a session; call finish() before start().")
    cfg, lay = self.cfg, self.layout
    eos_id = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
    if self._state is None:
      self._state = jax.jit(functools.partial(init_state, cfg, lay, self.weights.dtype))()
      self._compile_next()
    self._run = Session(owner=[None] * lay.slots, sampling=sampling, seed=int(seed),
                     args=(jnp.float32(self.threshold), jnp.int32(-1 if eos_id is None else eos_id)), stream=stream,
                     stats0=jax.device_get(self._state.stats), t0=time.perf_counter())

  def step(self, max_ticks: int = 1 << 30, max_tokens: int | None = None) -> list[Progress]:
    """Admits waiting requests into free slots, runs ticks until `max_ticks` ran or `max_tokens` tokens were made
    (default: the engine's step_tokens), fewer once enough slots are free to admit the waiting ones, a slot filled
    its window, or nothing is live, and reports progress (see `Progress`)."""
    run, B = self._run, self.layout.slots
    if run is None:
      raise InferenceError("no session: call start() before step().")
    events: list[Progress] = []
    free = [b for b in range(B) if run.owner[b] is None]
    if self.queue and free:
      events = self._admit(run, free)
    self._fit(run, self._live_need(run))
    st = self._state
    phase, finish = jax.device_get((st.phase, st.finish))
    if not np.any(live(phase)):
      return self._collect(run, phase, None, finish, None, None, events)
    if run.stream and any(e.tokens for e in events):
      return self._collect(run, phase, None, finish, None, None, events)   # first tokens out before decoding on
    active = self._active(max(b for b in range(B) if run.owner[b] is not None) + 1)
    budget = max_tokens or (self.step_tokens * active // B if self.step_tokens else 0) or (1 << 30)
    refill_at = max(1, min(len(self.queue), self.refill_min)) if self.queue else B + 1
    st = self._state = self.programs.get(("ticks", self.layout, active))(
        self.weights, st, *run.args, jnp.int32(max(1, max_ticks)), jnp.int32(refill_at), jnp.int32(max(1, budget)))
    phase, count, finish, pos, recent, recent_rec = jax.device_get(
        (st.phase, st.count, st.finish, st.pos, st.recent, st.recent_rec))
    self._pos[:] = pos
    return self._collect(run, phase, count, finish, recent, recent_rec, events)

  def finish(self) -> dict[int, Generation]:
    """Closes the session (the slots keep their buffers for the next); returns {id: Generation} of its requests."""
    run, self._run = self._run, None
    if run is None:
      return {}
    self.stats = run.summary(jax.device_get(self._state.stats), self.layout.slots, self.layout.capacity,
                             time.perf_counter() - run.t0)
    self.results.update(run.done)
    return run.done

  def run(self, *, sampling: SamplingParams = SamplingParams(), seed: int = 0, stop_at_eos: bool = True,
          max_ticks_per_call: int = 1 << 30) -> dict[int, Generation]:
    """Serves every queued request; returns {id: Generation} for those finished in this call."""
    self.start(sampling=sampling, seed=seed, stop_at_eos=stop_at_eos)
    try:
      while not self.idle:
        self.step(max_ticks_per_call)
    except BaseException:
      self._run = None
      raise
    return self.finish()

  def generate(self, prompts: Sequence, *, max_new_tokens: int | Sequence[int] = 128,
               sampling: SamplingParams = SamplingParams(), seed: int = 0, stop_at_eos: bool = True,
               row_ids: Sequence[int] | None = None) -> list[Generation]:
    """Serves `prompts` (one max_new_tokens, or one per prompt) and returns their generations in order.

    With the same seed and row ids (default 0..n-1), the results equal `Generator.generate`'s.
    """
    n = len(prompts)
    if n == 0:
      raise InferenceError("no prompts given.")
    lims = [int(max_new_tokens)] * n if np.isscalar(max_new_tokens) else [int(x) for x in max_new_tokens]
    if len(lims) != n:
      raise InferenceError(f"max_new_tokens has {len(lims)} entries for {n} prompts.")
    rows = list(range(n)) if row_ids is None else [int(x) for x in row_ids]
    ids = [self.submit(p, m, row_id=r) for p, m, r in zip(prompts, lims, rows)]
    done = self.run(sampling=sampling, seed=seed, stop_at_eos=stop_at_eos)
    return [done[i] for i in ids]
