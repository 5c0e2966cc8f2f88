"""Continuous depth-wise batching: a MoR decode engine with sequence slots and a request queue.

    eng = Engine(cfg, variables, tokenizer, slots=32, max_new_tokens=128)
    outs = eng.generate(prompts, max_new_tokens=[...], sampling=SamplingParams(temperature=0.0))
    # or: ids = [eng.submit(p, max_new_tokens=n) for p, n in ...]; results = eng.run()

Why it is fast (spec section 6): the shared block has the same parameters at
every recursion, so one batched call of the block can advance token states
that sit at *different* recursion depths, from different sequences. The engine
keeps `slots` sequences in flight. Every slot holds exactly one token in
flight, in one of these phases:

    ENTER  a freshly sampled token: embedding, unique first layer, router 0
    BLOCK  the token has entered recursion `depth` and waits for its block pass
    EXIT   the token is done recursing: unique last layer, final norm, head, sampling
    DONE / EMPTY   the slot is free (DONE: its finished request is not collected yet)

One *tick* (a jitted, static-shaped function of an explicit state pytree) does
(1) the entry phase for up to `entry_rows` ENTER slots, (2) one pass of the
shared block over all `slots` rows at once, each row at its own depth, reading
and writing its own recursion's KV cache, followed by the router of the next
recursion (continue, or exit), and (3) the exit phase for up to `exit_rows`
EXIT slots, whose sampled token re-enters at the next tick. A token that runs k
recursions occupies its slot for k ticks; a token that exits early frees its
row for the slot's next token at once instead of idling behind deeper tokens.
When `entry_rows` / `exit_rows` are below `slots`, the first layer, last layer
and head run on a compacted sub-batch (about slots / mean recursions rows
leave per tick), which is where most of the saving over a per-step decoder
comes from; ENTER / EXIT slots that do not fit wait a tick (rotating priority).

Ticks run in a `lax.while_loop` until enough slots are free to be worth
refilling (`refill_min`) or everything is done; a thin Python scheduler then
collects finished requests, prefills waiting ones (the plain path's
`forward_cached`, batched, prompt length bucketed) and inserts their caches
into the free slots, and resumes the loop.

KV caches (recursion-wise, as in `mor_jax.infer.cache`): the shared block's
caches for all recursions live in one array [base_depth, slots, C, K, E]; the
recursion regions (the plan's capacities, 'full' or 'routed') are laid side by
side along C, and a row gathers the window of its own region for attention and
writes its new key/value into it. With recursive KV sharing there is one region
(recursion 0's), which deeper recursions read without writing. The unique first
and last layers have one cache each.

Routing is the causal inference routing of `forward_cached` (threshold for
expert-choice, the router's depth for token-choice; non-routed recursive and
vanilla models run every recursion), so for the same requests greedy outputs
equal the plain generation path's (`Generator`) token for token. Sampling
uses the same per-request keys (`fold_in(PRNGKey(seed), row_id)`, then the
index of the generated token), so seeded sampling matches too.

Supported: vanilla (strategy 'none') and the cycle / middle_cycle strategies
(expert-choice, token-choice, KV sharing, or no routing). The sequence
strategies run different layers at each depth (no shared block to batch
across depths) and are rejected.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
from mor_jax.infer.decode import InferenceError, check_supported, forward_cached, logits_fn
# the model's own modules, reached through MoRLM.apply(method=...)
from mor_jax.infer.decode import _embed, _expert_router, _final_norm, _token_router  # pylint: disable=protected-access
from mor_jax.infer.generate import FINISH_REASONS, Generation, SamplingParams, sample_logits, sampling_arrays
from mor_jax.model import routing
from mor_jax.model.layers import causal_mask, rope_angles
from mor_jax.model.recursion import Block, stack_unrolled_params
from mor_jax.model.transformer import MoRLM

EMPTY, ENTER, BLOCK, EXIT, DONE = range(5)
SKIP_EMPTY_PHASES = True   # lax.cond around phases no slot is in
PHASES = ("empty", "enter", "block", "exit", "done")
_RUNNING, _EOS, _LENGTH = 0, 1, 2   # FINISH_REASONS indices


# ----------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class EngineLayout:
  """Static shapes of one engine (hashable: one compilation per layout)."""
  slots: int
  max_len: int                  # positions a sequence may occupy (prompt + generated - 1 fed tokens)
  max_new: int                  # output columns per slot
  plan: cache_lib.CachePlan     # the plain path's cache plan (prefill uses it; its capacities size the regions)
  region_of: tuple[int, ...]    # per recursion: the stage region its pass reads
  writes: tuple[bool, ...]      # per recursion: does its pass write its region (False: KV sharing, r >= 1)
  offsets: tuple[int, ...]      # per region: first entry along C
  capacity: tuple[int, ...]     # per region: entries
  width: int                    # C: all regions side by side
  window: int                   # entries a row gathers (the largest region)
  entry_rows: int
  exit_rows: int


def make_layout(cfg: ModelConfig, slots: int, max_len: int, max_new: int, kv_capacity="full",
                entry_rows: int | None = None, exit_rows: int | None = None) -> EngineLayout:
  """Shapes of an engine: its cache plan (the plain path's, `kv_capacity` 'full' / 'routed' / fractions) and the
  recursion regions of the shared block's cache laid side by side."""
  plan = cache_lib.make_plan(cfg, max_len, kv_capacity)
  R = cfg.recursions
  one_block_per_recursion = len(plan.calls) == R and all(
      c.recursion == r and c.layers == (0, cfg.base_depth) for r, c in enumerate(plan.calls))
  if cfg.strategy in ("sequence", "middle_sequence") or not one_block_per_recursion:
    raise InferenceError("the depth-wise batching engine needs one shared block per recursion (strategies 'none', "
                         f"'cycle', 'middle_cycle'); strategy {cfg.strategy!r} runs different layers at each depth. "
                         "Use the plain Generator for it.")
  region_of = tuple(c.reads if c.cache is None else c.cache for c in plan.calls)
  writes = tuple(c.cache is not None for c in plan.calls)
  caps = plan.stage_capacity
  # regions in ascending capacity: the window (largest capacity) that starts at any region stays inside C
  order = sorted(range(len(caps)), key=lambda g: (caps[g], g))
  offsets, at = [0] * len(caps), 0
  for g in order:
    offsets[g], at = at, at + caps[g]
  entry_rows = slots if not entry_rows else max(1, min(slots, int(entry_rows)))
  exit_rows = slots if not exit_rows else max(1, min(slots, int(exit_rows)))
  return EngineLayout(slots=int(slots), max_len=int(max_len), max_new=int(max_new), plan=plan, region_of=region_of,
                      writes=writes, offsets=tuple(offsets), capacity=tuple(caps), width=at, window=max(caps),
                      entry_rows=entry_rows, exit_rows=exit_rows)


# ----------------------------------------------------------------------------------------------- state
@flax.struct.dataclass
class EngineCache:
  stage_k: jax.Array       # [n, B, C, K, E]   n = base_depth; recursion regions side by side along C
  stage_v: jax.Array
  stage_index: jax.Array   # [B, C] int32 position of each entry
  stage_len: jax.Array     # [G, B] int32 entries filled per region
  first: cache_lib.KVCache | None
  last: cache_lib.KVCache | None

  @property
  def nbytes(self) -> int:
    n = sum(int(a.nbytes) for a in (self.stage_k, self.stage_v, self.stage_index, self.stage_len))
    return n + sum(c.nbytes for c in (self.first, self.last) if c is not None)


@flax.struct.dataclass
class EngineState:
  cache: EngineCache
  phase: jax.Array     # [B] int32 (EMPTY, ENTER, BLOCK, EXIT, DONE)
  h: jax.Array         # [B, D] the token's hidden state (token-choice: its running block state)
  h0: jax.Array        # [B, D] token-choice: the stage input (the exit adds the gated state to it)
  depth: jax.Array     # [B] int32 recursion of the pending block pass
  apply: jax.Array     # [B] bool the pending pass updates the state (KV sharing: a write-only pass may not)
  target: jax.Array    # [B] int32 token-choice: the token's last recursion
  gate: jax.Array      # [B] float32 gate of the pending pass (expert), of the exit (token-choice)
  token: jax.Array     # [B] int32 the token in flight
  pos: jax.Array       # [B] int32 its position
  rec: jax.Array       # [B] int32 recursions it has run
  req: jax.Array       # [B] int32 request id (-1: none)
  count: jax.Array     # [B] int32 tokens generated for the request
  limit: jax.Array     # [B] int32 tokens it may generate
  finish: jax.Array    # [B] int32 FINISH_REASONS index
  keys: jax.Array      # [B, 2] uint32 sampling key of the request
  out: jax.Array       # [B, N] int32 generated tokens
  out_rec: jax.Array   # [B, N] int32 recursions behind each
  stats: dict          # int32 counters (see STATS)


STATS = ("ticks", "block_rows", "applied_rows", "entry_rows", "exit_rows", "entry_waits", "exit_waits",
         "mixed_depth_ticks", "mixed_exit_ticks", "tokens")


def _live(phase):
  return (phase == ENTER) | (phase == BLOCK) | (phase == EXIT)


def init_state(cfg: ModelConfig, lay: EngineLayout) -> EngineState:
  """Empty caches and free slots. (Run it under jax.jit: the programs donate the state, and jit gives every leaf
  its own buffer.)"""
  B, D = lay.slots, cfg.hidden_size
  n, K, E, dt = cfg.base_depth, cfg.num_kv_heads, cfg.head_dim, cfg.compute_dtype
  big = np.iinfo(np.int32).max
  cache = EngineCache(
      stage_k=jnp.zeros((n, B, lay.width, K, E), dt), stage_v=jnp.zeros((n, B, lay.width, K, E), dt),
      stage_index=jnp.full((B, lay.width), big, jnp.int32), stage_len=jnp.zeros((len(lay.capacity), B), jnp.int32),
      first=cache_lib.empty_cache(cfg, 1, B, lay.max_len) if cfg.has_middle else None,
      last=cache_lib.empty_cache(cfg, 1, B, lay.max_len) if cfg.has_middle else None)
  zi = jnp.zeros((B,), jnp.int32)
  return EngineState(cache=cache, phase=zi, h=jnp.zeros((B, D), dt), h0=jnp.zeros((B, D), dt), depth=zi,
                     apply=jnp.zeros((B,), bool), target=zi, gate=jnp.zeros((B,), jnp.float32), token=zi, pos=zi,
                     rec=zi, req=jnp.full((B,), -1, jnp.int32), count=zi, limit=zi, finish=zi,
                     keys=jnp.zeros((B, 2), jnp.uint32), out=jnp.zeros((B, lay.max_new), jnp.int32),
                     out_rec=jnp.zeros((B, lay.max_new), jnp.int32), stats={k: jnp.int32(0) for k in STATS})


def kv_bytes(cfg: ModelConfig, lay: EngineLayout) -> int:
  """Bytes of the engine's KV caches (keys, values, positions, fill counts) without allocating them."""
  st = jax.eval_shape(lambda: init_state(cfg, lay).cache)
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(st))


# ----------------------------------------------------------------------------------------------- rows
class _Rows:
  """Which slots a phase runs on: all of them (masked), or a compacted sub-batch of M slots.

  Compaction picks up to M slots where `mask` holds, in a priority that rotates with the tick (no slot waits
  forever); the unused rows point at slot B (out of range: reads clip, writes drop).
  """

  def __init__(self, mask, M: int, tick):
    B = mask.shape[0]
    self.B = B
    if M >= B:
      self.rows, self.sel = None, mask
    else:
      slot = jnp.arange(B, dtype=jnp.int32)
      prio = jnp.where(mask, (slot - tick) % B, B + slot)
      _, order = jax.lax.top_k(-prio, M)
      self.sel = mask[order]
      self.rows = jnp.where(self.sel, order, B).astype(jnp.int32)

  def take(self, x):
    return x if self.rows is None else x.at[self.rows].get(mode="clip")

  def put(self, x, v):
    if self.rows is None:
      return jnp.where(self.sel.reshape(self.sel.shape + (1,) * (x.ndim - 1)), v.astype(x.dtype), x)
    return x.at[self.rows].set(v.astype(x.dtype), mode="drop")


def _window(a_BC, off_B, window: int):
  """Per-row contiguous windows a[b, off_b : off_b + window] of a [B, C, ...] array (a gather of B slices)."""
  return jax.vmap(lambda row, o: jax.lax.dynamic_slice_in_dim(row, o, window, axis=0))(a_BC, off_B)


def _cached_layers(lcfg, layer_params, k_all, v_all, index_all, x_M1D, pos_M, *, len_M, write_M, window,
                   rows=None, off_M=None):
  """Runs a stack of layers (the model's own, with its decode-cache hook) on one token per row.

  Row m is slot rows[m] of the cache (rows None: slot m) and attends to entries [off, off + window) of it
  (off None: 0 and window = C), of which the first len are valid; when write, its key/value goes to entry len
  of that window. The layers run one at a time (a Python loop, not a scan over layers: in decoding that avoids
  copying the stacked caches in and out of the scan, ~25% of a block pass on CPU); each gathers its rows'
  windows and scatters back only the new entries. Returns (out [M, 1, D], k_all, v_all, index_all).
  """
  n, B, C = k_all.shape[:3]
  M = x_M1D.shape[0]
  pos = pos_M.astype(jnp.int32)
  slot = jnp.where(write_M, len_M, window).astype(jnp.int32)      # window: writes nothing
  r = jnp.arange(B, dtype=jnp.int32) if rows is None else rows
  off = 0 if off_M is None else off_M

  def view(a):   # [B, C, ...] -> the rows' windows [M, window, ...]
    a = a if rows is None else a.at[rows].get(mode="clip")
    return a if off_M is None else _window(a, off_M, window)

  m = jnp.arange(M)
  idx_g = view(index_all).at[m, slot].set(pos, mode="drop")
  valid = jnp.arange(window, dtype=jnp.int32)[None, :] < (len_M + write_M.astype(jnp.int32))[:, None]
  mask = causal_mask(pos[:, None], idx_g, k_valid_BS=valid)
  cos, sin = rope_angles(pos[:, None], lcfg.head_dim, lcfg.rope_theta)
  sc = jnp.minimum(slot, window - 1)
  tgt = jnp.where(write_M, slot + off, C)                          # C: dropped
  x = x_M1D
  for l in range(n):
    lp = jax.tree.map(lambda a, l=l: a[l:l + 1], layer_params)
    x, (k_u, v_u) = Block(lcfg, 1).apply({"params": lp}, x, cos, sin, mask, None,
                                         (view(k_all[l])[None], view(v_all[l])[None], slot[:, None]))
    k_all = k_all.at[l, r, tgt].set(k_u[0, m, sc], mode="drop")
    v_all = v_all.at[l, r, tgt].set(v_u[0, m, sc], mode="drop")
  index_all = index_all.at[r, tgt].set(pos, mode="drop")
  return x, k_all, v_all, index_all


def _run_kv(lcfg, layer_params, kv: cache_lib.KVCache, x_M1D, pos_M, rows: _Rows, write_M):
  """A unique layer (first / last) on the rows of a phase, with its cache."""
  length = rows.take(kv.length)
  out, k, v, idx = _cached_layers(lcfg, layer_params, kv.k, kv.v, kv.index, x_M1D, pos_M, rows=rows.rows,
                                  len_M=length, write_M=write_M, window=kv.capacity)
  if rows.rows is None:
    new_len = kv.length + write_M.astype(jnp.int32)
  else:
    new_len = kv.length.at[rows.rows].add(write_M.astype(jnp.int32), mode="drop")
  return out, kv.replace(k=k, v=v, index=idx, length=new_len)


# ----------------------------------------------------------------------------------------------- the tick


def _layer_cfg(cfg: ModelConfig) -> ModelConfig:
  return dataclasses.replace(cfg, scan_layers=True, remat_policy="none")   # as forward_cached: same numbers


def _block_params(params) -> dict:
  """The shared block's parameters in the scanned layout {'layers': stacked on axis 0}."""
  bp = params["block"]
  return bp if "layers" in bp else stack_unrolled_params(bp)


def _unique(params, name):
  return {"layers": jax.tree.map(lambda a: a[None], params[name])}


def _routers(cfg, model, variables, x_B1D):
  """Expert-choice router logits of every recursion: [B, R] float32."""
  return jnp.stack([model.apply(variables, x_B1D, r, method=_expert_router)[:, 0, 0] for r in range(cfg.recursions)],
                   axis=-1)


def _admit(lay: EngineLayout, stage_len, r_B, slots=None):
  """Can the token of each row enter recursion r (room in its region, or a pass that writes nothing)?"""
  R = len(lay.region_of)
  r = jnp.clip(r_B, 0, R - 1)
  region = jnp.asarray(lay.region_of, jnp.int32)[r]
  writes = jnp.asarray(lay.writes)[r]
  cap = jnp.asarray(lay.capacity, jnp.int32)[region]
  b = jnp.arange(stage_len.shape[1]) if slots is None else slots
  return ~writes | (stage_len.at[region, b].get(mode="clip") < cap)


def tick(cfg: ModelConfig, lay: EngineLayout, variables, st: EngineState, threshold, sp, eos_id) -> EngineState:
  """One step of the engine: entry phase, one batched block pass at mixed depths, exit phase."""
  model = MoRLM(cfg)
  lcfg = _layer_cfg(cfg)
  params = variables["params"]
  R, B = cfg.recursions, lay.slots
  expert = cfg.mor_enable and cfg.mor_type == "expert"
  token_choice = cfg.mor_enable and cfg.mor_type == "token"
  stats = dict(st.stats)
  t = stats["ticks"]
  cache = st.cache

  # ---------------------------------------------------------------- entry: embed, first layer, first routing
  enter = _Rows(st.phase == ENTER, lay.entry_rows, t)

  def entry(st_cache):
    st, cache = st_cache
    sel = enter.sel
    tok, pos = enter.take(st.token), enter.take(st.pos)
    x = model.apply(variables, tok[:, None], method=_embed)
    first = cache.first
    if cfg.has_middle:
      x, first = _run_kv(lcfg, _unique(params, "first"), first, x, pos, enter, sel)
    zero = jnp.zeros_like(tok)
    admit0 = _admit(lay, cache.stage_len, zero, enter.rows)
    h0 = x[:, 0]
    target, gate = zero, jnp.zeros(tok.shape, jnp.float32)
    if expert:
      z = model.apply(variables, x, 0, method=_expert_router)[:, 0, 0]
      g, p = routing.gate_scores(cfg, z)
      want = routing.passes_threshold(cfg, g, threshold) if cfg.capacities[0] < 1 else jnp.ones_like(sel)
      gate = jnp.ones_like(p) if cfg.gating == "identity" else p
      if cfg.kv_sharing:   # recursion 0 writes every token's keys/values; only the entering ones are updated
        run, apply = sel & admit0, sel & admit0 & want
      else:
        run = apply = sel & want & admit0
    elif token_choice:
      z = model.apply(variables, x, method=_token_router)[:, 0]
      p = cfg.alpha * (jax.nn.softmax(z, -1) if cfg.router_func == "softmax" else jax.nn.sigmoid(z))
      bias = variables.get("router_bias", {}).get("bias") if cfg.balancing == "loss_free" else None
      target = jnp.argmax(p + (0.0 if bias is None else bias), axis=-1).astype(jnp.int32)
      w = jnp.take_along_axis(p, target[:, None], axis=-1)[:, 0]
      gate = jnp.ones_like(w) if cfg.gating == "identity" else w
      run = apply = sel & admit0
    else:
      run = apply = sel & admit0
    phase = jnp.where(run, BLOCK, EXIT)
    st = st.replace(phase=enter.put(st.phase, phase), h=enter.put(st.h, h0), h0=enter.put(st.h0, h0),
                    depth=enter.put(st.depth, zero), apply=enter.put(st.apply, apply),
                    target=enter.put(st.target, target), gate=enter.put(st.gate, gate), rec=enter.put(st.rec, zero))
    return st, cache.replace(first=first)

  st, cache = _maybe(jnp.any(enter.sel), entry, (st, cache))
  stats["entry_rows"] += enter.sel.sum(dtype=jnp.int32)
  stats["entry_waits"] += (st.phase == ENTER).sum(dtype=jnp.int32)

  # ---------------------------------------------------------------- the shared block, every row at its own depth
  blk = st.phase == BLOCK
  stats["mixed_depth_ticks"] += _mixed_depths(blk, st.depth, R).astype(jnp.int32)

  def block_pass(st_cache):
    st, cache = st_cache
    depth = st.depth
    region = jnp.asarray(lay.region_of, jnp.int32)[depth]
    write = blk & jnp.asarray(lay.writes)[depth]
    off = jnp.asarray(lay.offsets, jnp.int32)[region]
    b = jnp.arange(B)
    length = cache.stage_len[region, b]
    whole = len(lay.capacity) == 1 and lay.window == lay.width
    out, k, v, idx = _cached_layers(lcfg, _block_params(params), cache.stage_k, cache.stage_v, cache.stage_index,
                                    st.h[:, None], st.pos, off_M=None if whole else off, len_M=length, write_M=write,
                                    window=lay.window)
    stage_len = cache.stage_len.at[region, b].add(write.astype(jnp.int32))
    cache = cache.replace(stage_k=k, stage_v=v, stage_index=idx, stage_len=stage_len)
    out = out[:, 0]
    applied = blk & st.apply
    if expert:
      h_new = st.h + st.gate[:, None].astype(st.h.dtype) * out
    else:
      h_new = out
    h = jnp.where(applied[:, None], h_new, st.h)
    nxt = depth + 1
    admit = _admit(lay, stage_len, nxt)
    gate = st.gate
    if expert:
      z = jnp.take_along_axis(_routers(cfg, model, variables, h[:, None]), jnp.minimum(nxt, R - 1)[:, None], -1)[:, 0]
      g, p = routing.gate_scores(cfg, z)
      cont = applied & (nxt < R) & routing.passes_threshold(cfg, g, threshold) & admit
      gate = jnp.where(cont, jnp.ones_like(p) if cfg.gating == "identity" else p, gate)
    elif token_choice:
      cont = applied & (nxt <= st.target) & admit
    else:
      cont = applied & (nxt < R) & admit
    phase = jnp.where(blk, jnp.where(cont, BLOCK, EXIT), st.phase)
    st = st.replace(h=h, depth=jnp.where(cont, nxt, depth), gate=gate, phase=phase,
                    rec=st.rec + applied.astype(jnp.int32))
    return st, cache

  st, cache = _maybe(jnp.any(blk), block_pass, (st, cache))
  stats["block_rows"] += blk.sum(dtype=jnp.int32)
  stats["applied_rows"] += (blk & st.apply).sum(dtype=jnp.int32)   # (the pass leaves `apply` as it was)

  # ---------------------------------------------------------------- exit: last layer, head, sampling
  leave = _Rows(st.phase == EXIT, lay.exit_rows, t)

  def exit_phase(st_cache):
    st, cache = st_cache
    sel = leave.sel
    x = leave.take(st.h)
    if token_choice:
      x = leave.take(st.h0) + leave.take(st.gate)[:, None].astype(x.dtype) * x
    x = x[:, None]
    pos = leave.take(st.pos)
    last = cache.last
    if cfg.has_middle:
      x, last = _run_kv(lcfg, _unique(params, "last"), last, x, pos, leave, sel)
    hn = model.apply(variables, x, method=_final_norm)
    logits = logits_fn(cfg, variables, hn[:, 0])
    count = leave.take(st.count)
    keys = jax.vmap(jax.random.fold_in)(leave.take(st.keys), count)
    tok = sample_logits(keys, logits, sp)
    rec = leave.take(st.rec)
    if leave.rows is None:
      rows, col = jnp.where(sel, jnp.arange(B), B), count
    else:
      rows, col = leave.rows, count
    out = st.out.at[rows, col].set(tok, mode="drop")
    out_rec = st.out_rec.at[rows, col].set(rec, mode="drop")
    count = count + 1
    finish = jnp.where(tok == eos_id, _EOS, jnp.where(count >= leave.take(st.limit), _LENGTH, _RUNNING))
    phase = jnp.where(finish != _RUNNING, DONE, ENTER)
    st = st.replace(out=out, out_rec=out_rec, count=leave.put(st.count, count), finish=leave.put(st.finish, finish),
                    phase=leave.put(st.phase, phase), token=leave.put(st.token, tok),
                    pos=leave.put(st.pos, pos + 1))
    return st, cache.replace(last=last)

  # statistics of the exiting tokens: did tokens of different depths leave in this tick?
  ex = leave.sel
  ex_rec = leave.take(st.rec)
  mixed_exit = jnp.max(jnp.where(ex, ex_rec, -1)) > jnp.min(jnp.where(ex, ex_rec, R + 1))
  st, cache = _maybe(jnp.any(leave.sel), exit_phase, (st, cache))
  stats["exit_rows"] += leave.sel.sum(dtype=jnp.int32)
  stats["tokens"] += leave.sel.sum(dtype=jnp.int32)
  stats["exit_waits"] += (st.phase == EXIT).sum(dtype=jnp.int32)
  stats["mixed_exit_ticks"] += mixed_exit.astype(jnp.int32)
  stats["ticks"] = t + 1
  return st.replace(cache=cache, stats=stats)


def _maybe(pred, fn, operand):
  return jax.lax.cond(pred, fn, lambda a: a, operand) if SKIP_EMPTY_PHASES else fn(operand)


def _mixed_depths(blk, depth, R):
  """Did the block pass run rows at two or more different depths?"""
  return jnp.max(jnp.where(blk, depth, -1)) > jnp.min(jnp.where(blk, depth, R + 1))


def run_ticks(cfg: ModelConfig, lay: EngineLayout, variables, st: EngineState, threshold, sp, eos_id, max_ticks,
              refill_at) -> EngineState:
  """Ticks until `max_ticks` ran, no slot is live, or at least `refill_at` slots are free."""
  B = lay.slots
  stop_at = st.stats["ticks"] + max_ticks

  def cond(s):
    live = _live(s.phase)
    return (s.stats["ticks"] < stop_at) & jnp.any(live) & (B - live.sum() < refill_at)

  return jax.lax.while_loop(cond, lambda s: tick(cfg, lay, variables, s, threshold, sp, eos_id), st)


def admit_requests(cfg: ModelConfig, lay: EngineLayout, variables, st: EngineState, tokens_BP, lengths_B, slots_B,
                   keys_B2, limits_B, reqs_B, threshold, sp, eos_id):
  """Prefills a batch of prompts (the plain path's forward_cached) and moves them into free slots.

  slots_B: the slot of each prompt (B = lay.slots for padding rows: nothing is written). The first token is
  sampled from the prompt's last position (key fold_in(key, 0)), as in the plain path.
  Returns (state, prompt recursions [Bp, P]).
  """
  plan = lay.plan
  Bp, P = tokens_BP.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (Bp, P))
  valid = pos < lengths_B[:, None]
  pc = cache_lib.init_cache(cfg, plan, Bp)
  h, pc, info = forward_cached(cfg, plan, variables, pc, tokens_BP, pos, valid, threshold=threshold)
  last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  logits = logits_fn(cfg, variables, last)
  tok = sample_logits(jax.vmap(jax.random.fold_in)(keys_B2, jnp.zeros((Bp,), jnp.int32)), logits, sp)
  rec_last = jnp.take_along_axis(info["recursions"], (lengths_B - 1)[:, None], axis=1)[:, 0]
  c = st.cache
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
  put = lambda a, x: a.at[slots_B].set(x.astype(a.dtype), mode="drop")
  finish = jnp.where(tok == eos_id, _EOS, jnp.where(limits_B <= 1, _LENGTH, _RUNNING))
  st = st.replace(cache=c, phase=put(st.phase, jnp.where(finish != _RUNNING, DONE, ENTER)), token=put(st.token, tok),
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


# ----------------------------------------------------------------------------------------------- scheduler
@dataclasses.dataclass
class Request:
  id: int
  prompt_tokens: list[int]
  max_new_tokens: int
  row_id: int
  prompt: str | None = None
  submitted: float = 0.0


def _bucket(n: int, cap: int, minimum: int = 16) -> int:
  b = minimum
  while b < n:
    b *= 2
  return min(b, cap)


class Engine:
  """Continuous depth-wise batching decode engine (see the module docstring).

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
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
      raise InferenceError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                           f"{cfg.vocab_size}: they do not belong together.")
    if add_bos and (tokenizer is None or tokenizer.bos_id is None):
      raise InferenceError("add_bos needs a tokenizer with a BOS token.")
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
    if isinstance(prompt, str):
      if self.tokenizer is None:
        raise InferenceError("text prompts need a tokenizer; pass token ids or a tokenizer.")
      t = self.tokenizer.encode(prompt)
    else:
      t = [int(x) for x in prompt]
    if not t:
      raise InferenceError(f"prompt {i} is empty: the model needs at least one token to condition on.")
    if self.add_bos:
      t = [self.tokenizer.bos_id] + t
    bad = [x for x in t if not 0 <= x < self.cfg.vocab_size]
    if bad:
      raise InferenceError(f"prompt {i} has token ids outside the model's vocabulary [0, {self.cfg.vocab_size}): "
                           f"{bad[:5]}; tokenizer and model do not match.")
    return t

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
  def run(self, *, sampling: SamplingParams = SamplingParams(), seed: int = 0, stop_at_eos: bool = True,
          max_ticks_per_call: int = 1 << 30) -> dict[int, Generation]:
    """Serves every queued request; returns {id: Generation} for those finished in this call."""
    cfg, lay = self.cfg, self.layout
    B = lay.slots
    run, admit = _programs(cfg, lay)
    thr, sp = jnp.float32(self.threshold), sampling_arrays(sampling)
    eos_id = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    base = jax.random.PRNGKey(seed)
    st = jax.jit(functools.partial(init_state, cfg, lay))() if self._state is None else self._state
    self._state = None
    stats0 = jax.device_get(st.stats)
    owner: list[Request | None] = [None] * B
    prompt_rec: dict[int, list[int]] = {}
    done: dict[int, Generation] = {}
    t_admit = 0.0
    n_admit = 0
    t0 = time.perf_counter()
    while True:
      free = [b for b in range(B) if owner[b] is None]
      if self.queue and free:
        cap = len(free) if self.prefill_rows is None else min(len(free), self.prefill_rows)
        take = [self.queue.popleft() for _ in range(min(cap, len(self.queue)))]
        slots_used = free[:len(take)]
        Bp = 1
        while Bp < len(take):
          Bp *= 2
        Bp = min(Bp, B) if self.prefill_rows is None else self.prefill_rows
        P = _bucket(max(len(r.prompt_tokens) for r in take), cfg.max_seq_len)
        tokens = np.zeros((Bp, P), np.int32)
        lengths = np.ones((Bp,), np.int32)
        slots_arr = np.full((Bp,), B, np.int32)
        limits = np.ones((Bp,), np.int32)
        reqs = np.full((Bp,), -1, np.int32)
        row_ids = np.zeros((Bp,), np.int32)
        for i, (r, b) in enumerate(zip(take, slots_used)):
          tokens[i, :len(r.prompt_tokens)] = r.prompt_tokens
          lengths[i], slots_arr[i], limits[i] = len(r.prompt_tokens), b, r.max_new_tokens
          reqs[i], row_ids[i] = r.id, r.row_id
          owner[b] = r
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids))
        ta = time.perf_counter()
        st, prec = admit(self.variables, st, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(slots_arr), keys,
                         jnp.asarray(limits), jnp.asarray(reqs), thr, sp, eos)
        prec, phase = jax.device_get((prec, st.phase))
        t_admit += time.perf_counter() - ta
        n_admit += 1
        for i, r in enumerate(take):
          prompt_rec[r.id] = [int(x) for x in prec[i, :len(r.prompt_tokens)]]
      else:
        phase = None
      if phase is None or np.any(_live(phase)):
        refill_at = max(1, min(len(self.queue), self.refill_min)) if self.queue else B + 1
        st = run(self.variables, st, thr, sp, eos, jnp.int32(max_ticks_per_call), jnp.int32(refill_at))
        phase = np.asarray(st.phase)
      fin = [b for b in range(B) if owner[b] is not None and phase[b] == DONE]
      if fin:
        out, out_rec, count, finish = jax.device_get((st.out, st.out_rec, st.count, st.finish))
        for b in fin:
          r = owner[b]
          n = int(count[b])
          toks = [int(x) for x in out[b, :n]]
          text = self.tokenizer.decode(toks) if self.tokenizer is not None else None
          done[r.id] = Generation(prompt_tokens=r.prompt_tokens, tokens=toks,
                                  recursions=[int(x) for x in out_rec[b, :n]],
                                  prompt_recursions=prompt_rec.pop(r.id), finish_reason=FINISH_REASONS[int(finish[b])],
                                  text=text, prompt=r.prompt)
          owner[b] = None
      if not self.queue and all(o is None for o in owner):
        break
      if not fin and not bool(np.any(_live(phase))) and not self.queue:
        raise RuntimeError("engine stalled")   # cannot happen: live slots or a queue always make progress
    wall = time.perf_counter() - t0
    s = {k: int(v) - int(stats0[k]) for k, v in jax.device_get(st.stats).items()}   # this call's counts
    ticks = max(1, s["ticks"])
    gen_tokens = sum(len(g.tokens) for g in done.values())
    self.stats = {**s, "wall_s": wall, "admit_s": t_admit, "admit_calls": n_admit, "generated_tokens": gen_tokens,
                  "slot_utilisation": s["applied_rows"] / (ticks * B),
                  "block_row_occupancy": s["block_rows"] / (ticks * B),
                  "mean_recursions": (sum(sum(g.recursions) for g in done.values()) / max(1, gen_tokens)),
                  "tokens_per_tick": s["tokens"] / ticks}
    self._state = st
    self.results.update(done)
    return done

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


def expected_recursions(cfg: ModelConfig) -> float:
  """Recursions per token the routing is trained for (expert: sum of capacities; else all of them)."""
  if cfg.mor_enable and cfg.mor_type == "expert":
    return float(sum(cfg.capacities))
  if cfg.mor_enable:
    return (cfg.recursions + 1) / 2
  return float(cfg.recursions)

