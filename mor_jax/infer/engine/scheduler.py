"""The engine's host side: the request queue, the step-wise loop and the `Engine` class.

Ticks run in a `lax.while_loop` until enough slots are free to be worth refilling (`refill_min`), a tick budget
is spent (`step(max_ticks)`, for streaming) or everything is done; the scheduler then collects finished
requests, prefills waiting ones (admit.py: the plain path's `forward_cached`, batched, prompt length bucketed)
into the free slots, and resumes. A server drives `start` / `submit` / `step` / `cancel` from one thread
(`step` returns the tokens each request made since the last step); `run` / `generate` drive it to completion.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.infer import prompts as prompts_lib
from mor_jax.infer.decode import check_supported
from mor_jax.infer.engine.admit import admit_requests
from mor_jax.infer.engine.layout import (DONE, EngineLayout, EngineState, expected_recursions, init_state, kv_bytes,
                                         live, make_layout)
from mor_jax.infer.engine.tick import run_ticks
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.generate import Generation
from mor_jax.infer.sampling import FINISH_REASONS, STOP, SamplingParams


@functools.lru_cache(maxsize=32)
def _run_program(cfg: ModelConfig, lay: EngineLayout):
  return jax.jit(functools.partial(run_ticks, cfg, lay), donate_argnums=(1,))


@functools.lru_cache(maxsize=32)
def _admit_program(cfg: ModelConfig, lay: EngineLayout):
  return jax.jit(functools.partial(admit_requests, cfg, lay), donate_argnums=(1,))


def _programs(cfg: ModelConfig, lay: EngineLayout):
  """Jitted (run_ticks, admit_requests) for one layout (admission does not depend on the entry/exit rows)."""
  return _run_program(cfg, lay), _admit_program(cfg, dataclasses.replace(lay, entry_rows=0, exit_rows=0))


@jax.jit
def _request_keys(seeds_B, rows_B):
  """Sampling key of each request: fold_in(PRNGKey(seed), row id), as the plain path's."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds_B, rows_B)


@dataclasses.dataclass
class Request:
  id: int
  prompt_tokens: list[int]
  max_new_tokens: int
  row_id: int
  prompt: str | None = None
  submitted: float = 0.0
  sampling: SamplingParams | None = None   # None: the session's
  seed: int | None = None                  # None: the session's


@dataclasses.dataclass
class Progress:
  """What `Engine.step` reports for one request: the tokens it made since the last step (with the recursions
  behind each), and its Generation once it is finished (or cancelled: finish_reason 'stop')."""
  id: int
  tokens: list[int]
  recursions: list[int]
  result: Generation | None = None


@dataclasses.dataclass
class _Run:
  """Host-side bookkeeping of one serving session (`start` ... `finish`)."""
  owner: list                      # per slot: the Request in it, or None
  sent: list                       # per slot: tokens of its request already reported
  sampling: SamplingParams
  seed: int
  args: tuple                      # (threshold, eos id): traced arguments of both programs
  stream: bool
  stats0: dict
  t0: float
  prompt_rec: dict = dataclasses.field(default_factory=dict)
  done: dict = dataclasses.field(default_factory=dict)
  admit_s: float = 0.0
  admit_calls: int = 0


class Engine:
  """Continuous depth-wise batching decode engine (see the package docstring).

  slots: sequences in flight; max_len: positions per sequence (default: the model's context); max_new_tokens:
  the most tokens one request may generate; threshold / kv_capacity / add_bos: as in `Generator`;
  entry_rows / exit_rows: sub-batch of the first layer / last layer + head per tick (default: all slots;
  `auto`: about 1.25 x slots / expected recursions per token); refill_min: free slots that end the tick loop to
  admit waiting requests (default max(1, slots // 8)); prefill_rows: prompts per admission call, a fixed
  batch (one compilation per prompt-length bucket); default: the waiting requests that fit, padded to a power
  of two.
  """

  def __init__(self, cfg: ModelConfig, variables, tokenizer=None, *, slots: int = 8, max_len: int | None = None,
               max_new_tokens: int = 128, threshold: float | None = None, kv_capacity="full",
               entry_rows: int | str | None = None, exit_rows: int | str | None = None,
               refill_min: int | None = None, prefill_rows: int | None = None, add_bos: bool = False):
    check_supported(cfg)
    if slots < 1:
      raise InferenceError(f"slots must be >= 1, got {slots}.")
    if max_new_tokens < 1:
      raise InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    ctx = cfg.max_seq_len
    max_len = ctx if max_len is None else int(max_len)
    if not 1 < max_len <= ctx:
      raise InferenceError(f"max_len must be in [2, {ctx}] (the model's context), got {max_len}.")
    prompts_lib.check_tokenizer(cfg.vocab_size, tokenizer, add_bos)
    expected = expected_recursions(cfg)
    auto = lambda v: max(1, int(np.ceil(1.25 * slots / expected))) if v == "auto" else v
    self.cfg, self.variables, self.tokenizer, self.add_bos = cfg, variables, tokenizer, add_bos
    self.threshold = float(cfg.threshold if threshold is None else threshold)
    self.layout = make_layout(cfg, slots, max_len, min(max_new_tokens, max_len), kv_capacity,
                              auto(entry_rows), auto(exit_rows))
    self.refill_min = max(1, slots // 8) if refill_min is None else max(1, int(refill_min))
    self.prefill_rows = None if prefill_rows is None else max(1, min(slots, int(prefill_rows)))
    self.queue: collections.deque[Request] = collections.deque()
    self.results: dict[int, Generation] = {}
    self._next_id = 0
    self._state: EngineState | None = None
    self._run: _Run | None = None
    self.stats: dict = {}

  @property
  def slots(self) -> int:
    return self.layout.slots

  @property
  def busy(self) -> int:
    """Slots holding a request of the open session."""
    run = self._run   # (read once: a server's health check reads it from another thread)
    return 0 if run is None else sum(r is not None for r in run.owner)

  @property
  def idle(self) -> bool:
    return not self.queue and self.busy == 0

  def kv_bytes(self) -> int:
    return kv_bytes(self.cfg, self.layout)

  # ------------------------------------------------------------------ requests
  def encode(self, prompt, i: int = 0) -> list[int]:
    return prompts_lib.encode_prompt(prompt, i, vocab_size=self.cfg.vocab_size, tokenizer=self.tokenizer,
                                     add_bos=self.add_bos)

  def check_request(self, prompt_len: int, n: int, who: str = "request") -> None:
    """Raises InferenceError when a prompt of `prompt_len` tokens asking for `n` new tokens does not fit."""
    ctx = self.cfg.max_seq_len
    if n < 1:
      raise InferenceError(f"{who}: max_new_tokens must be >= 1, got {n}.")
    if n > self.layout.max_new:
      raise InferenceError(f"{who} asks for {n} new tokens but the engine was built for at most "
                           f"{self.layout.max_new} (Engine(max_new_tokens=...)).")
    if prompt_len + n > ctx:
      raise InferenceError(f"{who}: prompt of {prompt_len} tokens + {n} new tokens = {prompt_len + n} exceeds the "
                           f"model's context of {ctx} tokens (model.max_seq_len). Shorten the prompt or ask for at "
                           f"most {max(0, ctx - prompt_len)} new tokens.")
    if prompt_len + n - 1 > self.layout.max_len:
      raise InferenceError(f"{who}: prompt of {prompt_len} tokens + {n} new tokens needs {prompt_len + n - 1} cache "
                           f"positions but the engine holds {self.layout.max_len} (Engine(max_len=...)).")

  def submit(self, prompt, max_new_tokens: int | None = None, *, row_id: int | None = None,
             sampling: SamplingParams | None = None, seed: int | None = None) -> int:
    """Queues a request; returns its id. row_id fixes its sampling key (default: the id); sampling / seed:
    its own (default: those of the session that serves it). May be called while a session runs."""
    rid = self._next_id
    t = self.encode(prompt, rid)
    n = self.layout.max_new if max_new_tokens is None else int(max_new_tokens)
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
    for b, r in enumerate(run.owner if run is not None else ()):
      if r is not None and r.id == rid:
        st = self._state
        self._state = st.replace(phase=st.phase.at[b].set(DONE), finish=st.finish.at[b].set(STOP))
        return True
    return False

  # ------------------------------------------------------------------ running
  def _admit(self, run: _Run, admit, st: EngineState, free: list[int]):
    """Prefills waiting requests into the free slots; returns (state, phase of every slot)."""
    B, P_cap = self.layout.slots, self.cfg.max_seq_len
    cap = len(free) if self.prefill_rows is None else min(len(free), self.prefill_rows)
    take = [self.queue.popleft() for _ in range(min(cap, len(self.queue)))]
    Bp = prompts_lib.batch_rows(len(take), B) if self.prefill_rows is None else self.prefill_rows
    P = prompts_lib.bucket_length(max(len(r.prompt_tokens) for r in take), P_cap)
    tokens = np.zeros((Bp, P), np.int32)
    lengths, limits = np.ones((Bp,), np.int32), np.ones((Bp,), np.int32)
    slots_arr, reqs, row_ids = np.full((Bp,), B, np.int32), np.full((Bp,), -1, np.int32), np.zeros((Bp,), np.int32)
    seeds, sp = np.zeros((Bp,), np.int32), {"temperature": np.zeros((Bp,), np.float32),
                                            "top_k": np.zeros((Bp,), np.int32), "top_p": np.ones((Bp,), np.float32)}
    for i, (r, b) in enumerate(zip(take, free)):
      tokens[i, :len(r.prompt_tokens)] = r.prompt_tokens
      lengths[i], slots_arr[i], limits[i] = len(r.prompt_tokens), b, r.max_new_tokens
      reqs[i], row_ids[i], seeds[i] = r.id, r.row_id, run.seed if r.seed is None else r.seed
      rs = r.sampling or run.sampling
      sp["temperature"][i], sp["top_k"][i], sp["top_p"][i] = rs.temperature, rs.top_k, rs.top_p
      run.owner[b], run.sent[b] = r, 0
    ta = time.perf_counter()
    st, prec = admit(self.variables, st, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(slots_arr),
                     _request_keys(jnp.asarray(seeds), jnp.asarray(row_ids)), jnp.asarray(limits),
                     jnp.asarray(reqs), jax.tree.map(jnp.asarray, sp), *run.args)
    prec, phase = jax.device_get((prec, st.phase))
    run.admit_s += time.perf_counter() - ta
    run.admit_calls += 1
    for i, r in enumerate(take):
      run.prompt_rec[r.id] = [int(x) for x in prec[i, :len(r.prompt_tokens)]]
    return st, phase

  def _generation(self, run: _Run, r: Request, toks: list[int], recs: list[int], finish: int) -> Generation:
    return Generation(prompt_tokens=r.prompt_tokens, tokens=toks, recursions=recs,
                      prompt_recursions=run.prompt_rec.pop(r.id), finish_reason=FINISH_REASONS[finish],
                      text=(self.tokenizer.decode([t for t in toks if t != self.tokenizer.eos_id])   # EOS: no text
                            if self.tokenizer is not None else None), prompt=r.prompt)

  def _collect(self, run: _Run, st: EngineState, phase) -> list[Progress]:
    """New tokens of the requests in flight (streaming sessions) and the finished requests' results, whose
    slots become free."""
    owned = [b for b, r in enumerate(run.owner) if r is not None]
    fin = [b for b in owned if phase[b] == DONE]
    if not fin and not (run.stream and owned):
      return []
    out, out_rec, count, finish = jax.device_get((st.out, st.out_rec, st.count, st.finish))
    events = []
    for b in owned if run.stream else fin:
      r, n, k = run.owner[b], int(count[b]), run.sent[b]
      ev = Progress(r.id, [int(x) for x in out[b, k:n]], [int(x) for x in out_rec[b, k:n]])
      run.sent[b] = n
      if phase[b] == DONE:
        ev.result = run.done[r.id] = self._generation(run, r, [int(x) for x in out[b, :n]],
                                                      [int(x) for x in out_rec[b, :n]], int(finish[b]))
        run.owner[b] = None
      if ev.tokens or ev.result is not None:
        events.append(ev)
    return events

  def _record_stats(self, run: _Run, st: EngineState, wall: float) -> None:
    B = self.layout.slots
    s = {k: int(v) - int(run.stats0[k]) for k, v in jax.device_get(st.stats).items()}   # this session's counts
    ticks = max(1, s["ticks"])
    gen_tokens = sum(len(g.tokens) for g in run.done.values())
    self.stats = {**s, "wall_s": wall, "admit_s": run.admit_s, "admit_calls": run.admit_calls,
                  "generated_tokens": gen_tokens, "slot_utilisation": s["applied_rows"] / (ticks * B),
                  "block_row_occupancy": s["block_rows"] / (ticks * B),
                  "mean_recursions": (sum(sum(g.recursions) for g in run.done.values()) / max(1, gen_tokens)),
                  "tokens_per_tick": s["tokens"] / ticks}

  def start(self, *, sampling: SamplingParams = SamplingParams(), seed: int = 0, stop_at_eos: bool = True,
            stream: bool = False) -> None:
    """Opens a serving session: `step` serves the queued requests and those submitted later. sampling / seed:
    defaults of requests that give none; stream: `step` also reports the tokens of unfinished requests."""
    if self._run is not None:
      raise InferenceError("the engine already serves a session; call finish() before start().")
    cfg, lay = self.cfg, self.layout
    eos_id = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
    if self._state is None:
      self._state = jax.jit(functools.partial(init_state, cfg, lay))()
    self._run = _Run(owner=[None] * lay.slots, sent=[0] * lay.slots, sampling=sampling, seed=int(seed),
                     args=(jnp.float32(self.threshold), jnp.int32(-1 if eos_id is None else eos_id)), stream=stream,
                     stats0=jax.device_get(self._state.stats), t0=time.perf_counter())

  def step(self, max_ticks: int = 1 << 30) -> list[Progress]:
    """Admits waiting requests into free slots, runs up to `max_ticks` ticks (fewer once enough slots are free to
    admit the waiting ones, or nothing is live) and reports progress (see `Progress`)."""
    run, st, B = self._run, self._state, self.layout.slots
    if run is None:
      raise InferenceError("no session: call start() before step().")
    ticks, admit = _programs(self.cfg, self.layout)
    free = [b for b in range(B) if run.owner[b] is None]
    phase = None
    if self.queue and free:
      st, phase = self._admit(run, admit, st, free)
    if phase is None or np.any(live(phase)):
      refill_at = max(1, min(len(self.queue), self.refill_min)) if self.queue else B + 1
      st = ticks(self.variables, st, *run.args, jnp.int32(max(1, max_ticks)), jnp.int32(refill_at))
      phase = np.asarray(st.phase)
    self._state = st
    return self._collect(run, st, phase)

  def finish(self) -> dict[int, Generation]:
    """Closes the session (the slots keep their buffers for the next); returns {id: Generation} of its requests."""
    run, self._run = self._run, None
    if run is None:
      return {}
    self._record_stats(run, self._state, time.perf_counter() - run.t0)
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
