"""One engine tick: the entry phase, one batched shared-block pass at mixed depths, the exit phase.

`tick` is a pure, static-shaped function of an explicit state pytree (layout.EngineState); `run_ticks` loops it
in a `lax.while_loop` for one step. Layers run through the cached decoder's `layer_step` on the decode weights
(weights.DecodeWeights), routing through the decision functions of `mor_jax.model.routing`, as in training and
the cached decoder. Every cache write is in place (rows that write nothing write a spare entry), and the block's
attention reads the regions side by side with a mask (no per-row windows are gathered).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
from mor_jax.infer import weights as weights_lib
from mor_jax.infer.decode import layer_step
from mor_jax.infer.engine.layout import (BLOCK, DONE, ENTER, EXIT, EngineLayout, EngineState, live, put_slots,
                                         take_slots)
from mor_jax.infer.sampling import RUNNING, finish_code, sample_logits
from mor_jax.model import routing
from mor_jax.model.layers import rms_norm, rope_angles

SKIP_EMPTY_PHASES = True   # lax.cond around phases no slot is in


class _Rows:
  """Which slots a phase runs on: all of them (masked), or a compacted sub-batch of M slots.

  Compaction picks up to M slots where `mask` holds, in a priority that rotates with the tick (no slot waits
  forever); the M slots are distinct, and those not selected (`sel` False) keep their values and write only
  spare cache entries.
  """

  def __init__(self, mask, M: int, tick):
    B = mask.shape[0]
    if M >= B:
      self.rows, self.sel = None, mask
    else:
      slot = jnp.arange(B, dtype=jnp.int32)
      prio = jnp.where(mask, (slot - tick) % B, B + slot)
      _, order = jax.lax.top_k(-prio, M)
      self.rows = order.astype(jnp.int32)
      self.sel = mask[self.rows]

  def take(self, x):
    return x if self.rows is None else x[self.rows]

  def put(self, x, v):
    sel = self.sel.reshape(self.sel.shape + (1,) * (x.ndim - 1))
    if self.rows is None:
      return jnp.where(sel, v.astype(x.dtype), x)
    return x.at[self.rows].set(jnp.where(sel, v.astype(x.dtype), x[self.rows]), mode="promise_in_bounds")


def _unique_layer(cfg: ModelConfig, w: dict, kv: cache_lib.KVCache, x_M1D, pos_M, rows: _Rows, write_M):
  """A unique layer (first / last) on the rows of a phase, with its cache (written in place: on the whole cache,
  or for a compacted sub-batch on a gathered copy of its rows whose new entries are scattered back)."""
  K, C = cfg.num_kv_heads, kv.capacity
  M = x_M1D.shape[0]
  pos = pos_M.astype(jnp.int32)
  length = rows.take(kv.length)
  slot = jnp.where(write_M, length, C).astype(jnp.int32)             # C: the spare entry
  cos, sin = rope_angles(pos[:, None], cfg.head_dim, cfg.rope_theta)
  m = jnp.arange(M)
  r = m if rows.rows is None else rows.rows
  index = kv.index.at[r, slot].set(pos, mode="promise_in_bounds")
  seen = (jnp.arange(C + 1)[None, :] < (length + write_M.astype(jnp.int32))[:, None])
  if rows.rows is None:
    mask = seen & (index <= pos[:, None])
    x, k, v = layer_step(cfg, w, x_M1D, cos, sin, kv.k[0], kv.v[0], slot[:, None], mask[:, None])
  else:
    nrows = (r[:, None] * K + jnp.arange(K)[None, :]).reshape(-1)   # the sub-batch's cache rows
    mask = seen & (index[r] <= pos[:, None])
    x, kg, vg = layer_step(cfg, w, x_M1D, cos, sin, kv.k[0][nrows], kv.v[0][nrows], slot[:, None], mask[:, None])
    at = jnp.repeat(slot, K)
    local = jnp.arange(M * K)
    k = cache_lib.write_entries(kv.k[0], (nrows, slice(None), at), kg[local, :, at])     # (keys: [N, E, S])
    v = cache_lib.write_entries(kv.v[0], (nrows, at), vg[local, at])
  length = kv.length.at[r].add(write_M.astype(jnp.int32), mode="promise_in_bounds")
  return x, kv.replace(k=(k,), v=(v,), index=index, length=length)


def _room(lay: EngineLayout, stage_len, r_B, slots=None):
  """Can the token of each row enter recursion r (room in its region, or a pass that writes nothing)?"""
  R = len(lay.region_of)
  r = jnp.clip(r_B, 0, R - 1)
  region = jnp.asarray(lay.region_of, jnp.int32)[r]
  writes = jnp.asarray(lay.writes)[r]
  cap = jnp.asarray(lay.caps, jnp.int32)[region]
  b = jnp.arange(stage_len.shape[1]) if slots is None else slots
  return ~writes | (stage_len[region, b] < cap)


def _entry(cfg: ModelConfig, lay: EngineLayout, w, threshold, enter: _Rows, st: EngineState, cache):
  """ENTER rows: embedding, unique first layer, the first routing decision (run recursion 0, or exit)."""
  sel = enter.sel
  tok, pos = enter.take(st.token), enter.take(st.pos)
  x = weights_lib.embed(w, tok[:, None])
  first = cache.first
  if cfg.has_middle:
    x, first = _unique_layer(cfg, w.first, first, x, pos, enter, sel)
  zero = jnp.zeros_like(tok)
  room0 = _room(lay, cache.stage_len, zero, enter.rows)
  h0 = x[:, 0]
  target, gate = zero, jnp.zeros(tok.shape, jnp.float32)
  run = apply = sel & room0
  if cfg.mor_enable and cfg.mor_type == "expert":
    want, gate = routing.expert_decision(cfg, weights_lib.expert_router(cfg, w, h0, 0), 0, threshold)
    apply = sel & room0 & want
    if not cfg.kv_sharing:   # with KV sharing recursion 0 writes every token's keys/values; the entering ones apply
      run = apply
  elif cfg.mor_enable:
    _, target, gate = routing.token_choice_decision(cfg, weights_lib.token_router(cfg, w, h0), w.router_bias)
  st = st.replace(phase=enter.put(st.phase, jnp.where(run, BLOCK, EXIT)), h=enter.put(st.h, h0),
                  h0=enter.put(st.h0, h0), depth=enter.put(st.depth, zero), apply=enter.put(st.apply, apply),
                  target=enter.put(st.target, target), gate=enter.put(st.gate, gate), rec=enter.put(st.rec, zero))
  return st, cache.replace(first=first)


def _block_pass(cfg: ModelConfig, lay: EngineLayout, w, threshold, blk, st: EngineState, cache):
  """BLOCK rows: one pass of the shared block, every row at its own depth and region, then the next decision."""
  R, B, width = cfg.recursions, lay.slots, lay.width
  depth, pos, b = st.depth, st.pos, jnp.arange(B)
  region = jnp.asarray(lay.region_of, jnp.int32)[depth]
  write = blk & jnp.asarray(lay.writes)[depth]
  off = jnp.asarray(lay.offsets, jnp.int32)[region]
  length = cache.stage_len[region, b]
  slot = jnp.where(write, off + length, width - 1).astype(jnp.int32)     # width - 1: the spare entry
  index = cache.stage_index.at[b, slot].set(pos, mode="promise_in_bounds")
  e = jnp.arange(width)[None, :]
  mask = (e >= off[:, None]) & (e < (off + length + write.astype(jnp.int32))[:, None]) & (index <= pos[:, None])
  cos, sin = rope_angles(pos[:, None], cfg.head_dim, cfg.rope_theta)
  x, ks, vs = st.h[:, None], list(cache.stage_k), list(cache.stage_v)
  if lay.gather:
    x, ks, vs = _gathered_block(cfg, lay, w, x, cos, sin, ks, vs, index, off, length, write, slot, pos)
  else:
    for l, wl in enumerate(w.block):
      x, ks[l], vs[l] = layer_step(cfg, wl, x, cos, sin, ks[l], vs[l], slot[:, None], mask[:, None])
  stage_len = cache.stage_len.at[region, b].add(write.astype(jnp.int32))
  cache = cache.replace(stage_k=tuple(ks), stage_v=tuple(vs), stage_index=index, stage_len=stage_len)
  out = x[:, 0]
  applied = blk & st.apply
  expert = cfg.mor_enable and cfg.mor_type == "expert"
  h_new = st.h + st.gate[:, None].astype(st.h.dtype) * out if expert else out
  h = jnp.where(applied[:, None], h_new, st.h)
  nxt = depth + 1
  cont = applied & _room(lay, stage_len, nxt)
  gate = st.gate
  if expert:
    z = jnp.stack([weights_lib.expert_router(cfg, w, h, r) for r in range(R)], axis=-1)
    z = jnp.take_along_axis(z, jnp.minimum(nxt, R - 1)[:, None], -1)[:, 0]
    enters, gate_next = routing.expert_decision(cfg, z, nxt, threshold)
    cont = cont & (nxt < R) & enters
    gate = jnp.where(cont, gate_next, gate)
  elif cfg.mor_enable:
    cont = cont & (nxt <= st.target)
  else:
    cont = cont & (nxt < R)
  st = st.replace(h=h, depth=jnp.where(cont, nxt, depth), gate=gate,
                  phase=jnp.where(blk, jnp.where(cont, BLOCK, EXIT), st.phase), rec=st.rec + applied.astype(jnp.int32))
  return st, cache


def _gathered_block(cfg, lay: EngineLayout, w, x, cos, sin, ks, vs, index, off, length, write, slot, pos):
  """The block's layers with each row attending to its own region only: the region (`lay.span` entries from `off`)
  is gathered per layer, the layer runs on the copy, and the row's new key/value goes back to `slot` (in place)."""
  B, K, span = lay.slots, cfg.num_kv_heads, lay.span

  def window(a, axis):   # a [B, ..., entries (axis), ...] -> each row's window of `span` entries from `off`
    return jax.vmap(lambda row, o: jax.lax.dynamic_slice_in_dim(row, o, span, axis=axis - 1))(a, off)
  idx = window(index, 1)                                                    # [B, span] positions in the window
  j = jnp.arange(span)[None, :]
  mask = (j < (length + write.astype(jnp.int32))[:, None]) & (idx <= pos[:, None])
  local = jnp.minimum(length, span - 1)                                     # (a row that writes nothing: masked)
  nrows = jnp.arange(B * K)
  at, tgt = jnp.repeat(local, K), jnp.repeat(slot, K)
  E = cfg.head_dim
  for l, wl in enumerate(w.block):
    kw = window(ks[l].reshape(B, K, E, -1), 3).reshape(B * K, E, span)       # keys [N, E, S]
    vw = window(vs[l].reshape(B, K, -1, E), 2).reshape(B * K, span, E)
    x, kw, vw = layer_step(cfg, wl, x, cos, sin, kw, vw, local[:, None], mask[:, None])
    ks[l] = cache_lib.write_entries(ks[l], (nrows, slice(None), tgt), kw[nrows, :, at])
    vs[l] = cache_lib.write_entries(vs[l], (nrows, tgt), vw[nrows, at])
  return x, ks, vs


def sample_rows(keys_B2, index_B, logits_BV, temperature_B, top_k_B, top_p_B):
  """`sample_logits` with each row's own sampling parameters and key fold_in(key, index) (argmax for all rows when
  every row is greedy: then no key is derived)."""
  def one(key, i, logits, t, k, p):
    return sample_logits(jax.random.fold_in(key, i)[None], logits[None], {"temperature": t, "top_k": k, "top_p": p})[0]
  return jax.lax.cond(jnp.all(temperature_B <= 0), lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32),
                      lambda: jax.vmap(one)(keys_B2, index_B, logits_BV, temperature_B, top_k_B, top_p_B))


def _exit(cfg: ModelConfig, lay: EngineLayout, w, eos_id, leave: _Rows, st: EngineState, cache):
  """EXIT rows: unique last layer, final norm, head, sampling; the new token re-enters (or the request is done)."""
  sel = leave.sel
  x = leave.take(st.h)
  if cfg.mor_enable and cfg.mor_type == "token":
    x = leave.take(st.h0) + leave.take(st.gate)[:, None].astype(x.dtype) * x
  x = x[:, None]
  pos = leave.take(st.pos)
  last = cache.last
  if cfg.has_middle:
    x, last = _unique_layer(cfg, w.last, last, x, pos, leave, sel)
  logits = weights_lib.logits(cfg, w, rms_norm(x[:, 0], w.final_norm, cfg.rms_eps))
  count = leave.take(st.count)
  tok = sample_rows(leave.take(st.keys), count, logits, leave.take(st.temperature), leave.take(st.top_k),
                    leave.take(st.top_p))
  rows = jnp.arange(lay.slots) if leave.rows is None else leave.rows
  col = jnp.clip(count - leave.take(st.base), 0, lay.window - 1)
  recent = st.recent.at[rows, col].set(jnp.where(sel, tok, st.recent[rows, col]))
  recent_rec = st.recent_rec.at[rows, col].set(jnp.where(sel, leave.take(st.rec), st.recent_rec[rows, col]))
  count = count + 1
  finish = finish_code(tok, count, leave.take(st.limit), eos_id)
  st = st.replace(recent=recent, recent_rec=recent_rec, count=leave.put(st.count, count),
                  finish=leave.put(st.finish, finish),
                  phase=leave.put(st.phase, jnp.where(finish != RUNNING, DONE, ENTER)),
                  token=leave.put(st.token, tok), pos=leave.put(st.pos, pos + 1))
  return st, cache.replace(last=last)


def _maybe(pred, fn, operand):
  return jax.lax.cond(pred, lambda a: fn(*a), lambda a: a, operand) if SKIP_EMPTY_PHASES else fn(*operand)


def _spread(sel, values, lo, hi):
  """Do the selected rows hold two or more different values (values in [lo, hi])?"""
  return jnp.max(jnp.where(sel, values, lo - 1)) > jnp.min(jnp.where(sel, values, hi + 1))


def tick(cfg: ModelConfig, lay: EngineLayout, w, st: EngineState, threshold, eos_id) -> EngineState:
  """One step of the engine: entry phase, one batched block pass at mixed depths, exit phase."""
  R = cfg.recursions
  stats = dict(st.stats)
  t = stats["ticks"]
  cache = st.cache
  stats["live_rows"] += live(st.phase).sum(dtype=jnp.int32)

  enter = _Rows(st.phase == ENTER, lay.entry_rows, t)
  st, cache = _maybe(jnp.any(enter.sel), lambda s, c: _entry(cfg, lay, w, threshold, enter, s, c), (st, cache))
  stats["entry_rows"] += enter.sel.sum(dtype=jnp.int32)
  stats["entry_waits"] += (st.phase == ENTER).sum(dtype=jnp.int32)

  blk = st.phase == BLOCK
  stats["mixed_depth_ticks"] += _spread(blk, st.depth, 0, R).astype(jnp.int32)
  st, cache = _maybe(jnp.any(blk), lambda s, c: _block_pass(cfg, lay, w, threshold, blk, s, c), (st, cache))
  stats["block_rows"] += blk.sum(dtype=jnp.int32)
  stats["applied_rows"] += (blk & st.apply).sum(dtype=jnp.int32)   # (the pass leaves `apply` as it was)

  leave = _Rows(st.phase == EXIT, lay.exit_rows, t)
  # statistics of the exiting tokens: did tokens of different depths leave in this tick?
  mixed_exit = _spread(leave.sel, leave.take(st.rec), 0, R)
  st, cache = _maybe(jnp.any(leave.sel), lambda s, c: _exit(cfg, lay, w, eos_id, leave, s, c), (st, cache))
  stats["exit_rows"] += leave.sel.sum(dtype=jnp.int32)
  stats["tokens"] += leave.sel.sum(dtype=jnp.int32)
  stats["exit_waits"] += (st.phase == EXIT).sum(dtype=jnp.int32)
  stats["mixed_exit_ticks"] += mixed_exit.astype(jnp.int32)
  stats["ticks"] = t + 1
  return st.replace(cache=cache, stats=stats)


def run_ticks(cfg: ModelConfig, lay: EngineLayout, w, st: EngineState, threshold, eos_id, max_ticks, refill_at,
              token_budget) -> EngineState:
  """One step: ticks until `max_ticks` ran, no slot is live, at least `refill_at` slots are free, `token_budget`
  tokens were generated, a slot filled its read-back window (`lay.window` tokens), or a token reached the
  allocated capacity (the caches must grow first)."""
  B = lay.slots
  stop_at = st.stats["ticks"] + max_ticks
  st = st.replace(base=st.count)

  def cond(s):
    alive = live(s.phase)
    made = s.count - s.base
    room = jnp.all(~alive | (made < lay.window)) & jnp.all(~alive | (s.pos < lay.capacity))
    budget = jnp.sum(jnp.where(s.req >= 0, made, 0)) < token_budget
    return (s.stats["ticks"] < stop_at) & jnp.any(alive) & (B - alive.sum() < refill_at) & room & budget

  return jax.lax.while_loop(cond, lambda s: tick(cfg, lay, w, s, threshold, eos_id), st)


def run_step(cfg: ModelConfig, lay: EngineLayout, active: int, w, st: EngineState, threshold, eos_id, max_ticks,
             refill_at, token_budget) -> EngineState:
  """One step on slots 0..active-1 (the others are empty): with fewer than all slots live, the ticks run on a copy
  of those slots' state (taken and put back once per step), so a lone request costs a batch of one, not of
  `lay.slots`."""
  if active >= lay.slots:
    return run_ticks(cfg, lay, w, st, threshold, eos_id, max_ticks, refill_at, token_budget)
  part_lay = dataclasses.replace(lay, slots=active, entry_rows=active, exit_rows=active)
  part = take_slots(st, active, cfg.num_kv_heads)
  part = run_ticks(cfg, part_lay, w, part, threshold, eos_id, max_ticks, refill_at, token_budget)
  return put_slots(st, part, cfg.num_kv_heads)
