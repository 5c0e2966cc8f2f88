"""The engine's host side: admission (prefill into free slots), the request queue and the `Engine` class.

Ticks run in a `lax.while_loop` until enough slots are free to be worth refilling (`refill_min`) or everything
is done; the scheduler then collects finished requests, prefills waiting ones (the plain path's
`forward_cached`, batched, prompt length bucketed) and inserts their caches into the free slots, and resumes.
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
from mor_jax.infer import cache as cache_lib
from mor_jax.infer import prompts as prompts_lib
from mor_jax.infer.decode import check_supported, forward_cached, logits_fn
from mor_jax.infer.engine.layout import (DONE, ENTER, EngineLayout, EngineState, expected_recursions, init_state,
                                         kv_bytes, live, make_layout)
from mor_jax.infer.engine.tick import run_ticks
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.generate import Generation
from mor_jax.infer.sampling import FINISH_REASONS, RUNNING, SamplingParams, finish_code, sample_logits, sampling_arrays


def _insert_caches(cfg: ModelConfig, lay: EngineLayout, c, pc: dict, slots_B):
  """The prefill caches `pc` (the plain path's plan) moved into slots `slots_B` of the engine's caches `c`."""
  k, v, idx, ln = c.stage_k, c.stage_v, c.stage_index, c.stage_len
  for g, kv in enumerate(pc["stage"]):
    o, cap = lay.offsets[g], lay.capacity[g]
    k = k.at[:, slots_B, o:o + cap].set(kv.k, mode="drop")
    v = v.at[:, slots_B, o:o + cap].set(kv.v, mode="drop")
    idx = idx.at[slots_B, o:o + cap].set(kv.index, mode="drop")
    ln = ln.at[g, slots_B].set(kv.length, mode="drop")
  c = c.replace(stage_k=k, stage_v=v, stage_index=idx, stage_len=ln)

  def put_kv(dst, src):
    return dst.replace(k=dst.k.at[:, slots_B].set(src.k, mode="drop"), v=dst.v.at[:, slots_B].set(src.v, mode="drop"),
                       index=dst.index.at[slots_B].set(src.index, mode="drop"),
                       length=dst.length.at[slots_B].set(src.length, mode="drop"))
  if cfg.has_middle:
    c = c.replace(first=put_kv(c.first, pc["first"]), last=put_kv(c.last, pc["last"]))
  return c


def admit_requests(cfg: ModelConfig, lay: EngineLayout, variables, st: EngineState, tokens_BP, lengths_B, slots_B,
                   keys_B2, limits_B, reqs_B, threshold, sp, eos_id):
  """Prefills a batch of prompts (the plain path's forward_cached) and moves them into free slots.

  slots_B: the slot of each prompt (B = lay.slots for padding rows: nothing is written). The first token is
  sampled from the prompt's last position (key fold_in(key, 0)), as in the plain path.
  Returns (state, prompt recursions [Bp, P]).
  """
  Bp, P = tokens_BP.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (Bp, P))
  valid = pos < lengths_B[:, None]
  pc = cache_lib.init_cache(cfg, lay.plan, Bp)
  h, pc, info = forward_cached(cfg, lay.plan, variables, pc, tokens_BP, pos, valid, threshold=threshold)
  last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  tok = sample_logits(jax.vmap(jax.random.fold_in)(keys_B2, jnp.zeros((Bp,), jnp.int32)),
                      logits_fn(cfg, variables, last), sp)
  rec_last = jnp.take_along_axis(info["recursions"], (lengths_B - 1)[:, None], axis=1)[:, 0]
  c = _insert_caches(cfg, lay, st.cache, pc, slots_B)
  put = lambda a, x: a.at[slots_B].set(x.astype(a.dtype), mode="drop")
  finish = finish_code(tok, 1, limits_B, eos_id)
  st = st.replace(cache=c, phase=put(st.phase, jnp.where(finish != RUNNING, DONE, ENTER)), token=put(st.token, tok),
                  pos=put(st.pos, lengths_B), rec=put(st.rec, jnp.zeros_like(tok)), req=put(st.req, reqs_B),
                  count=put(st.count, jnp.ones_like(tok)), limit=put(st.limit, limits_B),
                  finish=put(st.finish, finish), keys=st.keys.at[slots_B].set(keys_B2, mode="drop"),
                  out=st.out.at[slots_B, 0].set(tok, mode="drop"),
                  out_rec=st.out_rec.at[slots_B, 0].set(rec_last, mode="drop"))
  return st, jnp.where(valid, info["recursions"], 0)


@functools.lru_cache(maxsize=32)
def _run_program(cfg: ModelConfig, lay: EngineLayout):
  return jax.jit(functools.partial(run_ticks, cfg, lay), donate_argnums=(1,))


@functools.lru_cache(maxsize=32)
def _admit_program(cfg: ModelConfig, lay: EngineLayout):
  return jax.jit(functools.partial(admit_requests, cfg, lay), donate_argnums=(1,))


def _programs(cfg: ModelConfig, lay: EngineLayout):
  """Jitted (run_ticks, admit_requests) for one layout (admission does not depend on the entry/exit rows)."""
  return _run_program(cfg, lay), _admit_program(cfg, dataclasses.replace(lay, entry_rows=0, exit_rows=0))


@dataclasses.dataclass
class Request:
  id: int
  prompt_tokens: list[int]
  max_new_tokens: int
  row_id: int
  prompt: str | None = None
  submitted: float = 0.0


@dataclasses.dataclass
class _Run:
  """Host-side bookkeeping of one `Engine.run` call."""
  owner: list                      # per slot: the Request in it, or None
  base_key: jax.Array
  args: tuple                      # (threshold, sampling arrays, eos id): traced arguments of both programs
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
    self.stats: dict = {}

  @property
  def slots(self) -> int:
    return self.layout.slots

  def kv_bytes(self) -> int:
    return kv_bytes(self.cfg, self.layout)

  # ------------------------------------------------------------------ requests
  def encode(self, prompt, i: int = 0) -> list[int]:
    return prompts_lib.encode_prompt(prompt, i, vocab_size=self.cfg.vocab_size, tokenizer=self.tokenizer,
                                     add_bos=self.add_bos)

  def submit(self, prompt, max_new_tokens: int | None = None, *, row_id: int | None = None) -> int:
    """Queues a request; returns its id. row_id fixes its sampling key (default: the id)."""
    rid = self._next_id
    t = self.encode(prompt, rid)
    n = self.layout.max_new if max_new_tokens is None else int(max_new_tokens)
    ctx = self.cfg.max_seq_len
    if n < 1:
      raise InferenceError(f"request {rid}: max_new_tokens must be >= 1, got {n}.")
    if n > self.layout.max_new:
      raise InferenceError(f"request {rid} asks for {n} new tokens but the engine was built for at most "
                           f"{self.layout.max_new} (Engine(max_new_tokens=...)).")
    if len(t) + n > ctx:
      raise InferenceError(f"request {rid}: prompt of {len(t)} tokens + {n} new tokens = {len(t) + n} exceeds the "
                           f"model's context of {ctx} tokens (model.max_seq_len). Shorten the prompt or ask for at "
                           f"most {max(0, ctx - len(t))} new tokens.")
    if len(t) + n - 1 > self.layout.max_len:
      raise InferenceError(f"request {rid}: prompt of {len(t)} tokens + {n} new tokens needs {len(t) + n - 1} cache "
                           f"positions but the engine holds {self.layout.max_len} (Engine(max_len=...)).")
    self._next_id += 1
    self.queue.append(Request(rid, t, n, rid if row_id is None else int(row_id),
                              prompt if isinstance(prompt, str) else None, time.perf_counter()))
    return rid

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
    for i, (r, b) in enumerate(zip(take, free)):
      tokens[i, :len(r.prompt_tokens)] = r.prompt_tokens
      lengths[i], slots_arr[i], limits[i] = len(r.prompt_tokens), b, r.max_new_tokens
      reqs[i], row_ids[i] = r.id, r.row_id
      run.owner[b] = r
    keys = jax.vmap(lambda i: jax.random.fold_in(run.base_key, i))(jnp.asarray(row_ids))
    ta = time.perf_counter()
    st, prec = admit(self.variables, st, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(slots_arr), keys,
                     jnp.asarray(limits), jnp.asarray(reqs), *run.args)
    prec, phase = jax.device_get((prec, st.phase))
    run.admit_s += time.perf_counter() - ta
    run.admit_calls += 1
    for i, r in enumerate(take):
      run.prompt_rec[r.id] = [int(x) for x in prec[i, :len(r.prompt_tokens)]]
    return st, phase

  def _collect(self, run: _Run, st: EngineState, phase) -> bool:
    """Moves the finished requests' results out of their slots; True if any finished."""
    fin = [b for b, r in enumerate(run.owner) if r is not None and phase[b] == DONE]
    if not fin:
      return False
    out, out_rec, count, finish = jax.device_get((st.out, st.out_rec, st.count, st.finish))
    for b in fin:
      r, n = run.owner[b], int(count[b])
      toks = [int(x) for x in out[b, :n]]
      run.done[r.id] = Generation(prompt_tokens=r.prompt_tokens, tokens=toks,
                                  recursions=[int(x) for x in out_rec[b, :n]],
                                  prompt_recursions=run.prompt_rec.pop(r.id),
                                  finish_reason=FINISH_REASONS[int(finish[b])],
                                  text=self.tokenizer.decode(toks) if self.tokenizer is not None else None,
                                  prompt=r.prompt)
      run.owner[b] = None
    return True

  def _record_stats(self, run: _Run, st: EngineState, stats0, wall: float) -> None:
    B = self.layout.slots
    s = {k: int(v) - int(stats0[k]) for k, v in jax.device_get(st.stats).items()}   # this call's counts
    ticks = max(1, s["ticks"])
    gen_tokens = sum(len(g.tokens) for g in run.done.values())
    self.stats = {**s, "wall_s": wall, "admit_s": run.admit_s, "admit_calls": run.admit_calls,
                  "generated_tokens": gen_tokens, "slot_utilisation": s["applied_rows"] / (ticks * B),
                  "block_row_occupancy": s["block_rows"] / (ticks * B),
                  "mean_recursions": (sum(sum(g.recursions) for g in run.done.values()) / max(1, gen_tokens)),
                  "tokens_per_tick": s["tokens"] / ticks}

  def run(self, *, sampling: SamplingParams = SamplingParams(), seed: int = 0, stop_at_eos: bool = True,
          max_ticks_per_call: int = 1 << 30) -> dict[int, Generation]:
    """Serves every queued request; returns {id: Generation} for those finished in this call."""
    cfg, lay = self.cfg, self.layout
    B = lay.slots
    ticks, admit = _programs(cfg, lay)
    eos_id = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
    run = _Run(owner=[None] * B, base_key=jax.random.PRNGKey(seed),
               args=(jnp.float32(self.threshold), sampling_arrays(sampling), jnp.int32(-1 if eos_id is None else eos_id)))
    st = jax.jit(functools.partial(init_state, cfg, lay))() if self._state is None else self._state
    self._state = None
    stats0 = jax.device_get(st.stats)
    t0 = time.perf_counter()
    while True:
      free = [b for b in range(B) if run.owner[b] is None]
      phase = None
      if self.queue and free:
        st, phase = self._admit(run, admit, st, free)
      if phase is None or np.any(live(phase)):
        refill_at = max(1, min(len(self.queue), self.refill_min)) if self.queue else B + 1
        st = ticks(self.variables, st, *run.args, jnp.int32(max_ticks_per_call), jnp.int32(refill_at))
        phase = np.asarray(st.phase)
      finished = self._collect(run, st, phase)
      if not self.queue and all(o is None for o in run.owner):
        break
      if not finished and not bool(np.any(live(phase))) and not self.queue:
        raise RuntimeError("engine stalled")   # cannot happen: live slots or a queue always make progress
    self._record_stats(run, st, stats0, time.perf_counter() - t0)
    self._state = st
    self.results.update(run.done)
    return run.done

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
