"""One engine tick: the entry phase, one batched shared-block pass at mixed depths, the exit phase.

`tick` is a pure, static-shaped function of an explicit state pytree (layout.EngineState); `run_ticks` loops it
in a `lax.while_loop`. Routing goes through the decision functions of `mor_jax.model.routing`, as in training
and the cached decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
# the shared inference helpers: layer config, block params and the model's own modules through MoRLM.apply
from mor_jax.infer.decode import _block_params, _embed, _expert_router, _final_norm, _layer_cfg, _token_router  # pylint: disable=protected-access
from mor_jax.infer.decode import logits_fn
from mor_jax.infer.engine.layout import BLOCK, DONE, ENTER, EXIT, EngineLayout, EngineState, live
from mor_jax.infer.sampling import RUNNING, finish_code, sample_logits
from mor_jax.model import routing
from mor_jax.model.layers import causal_mask, rope_angles
from mor_jax.model.recursion import Block
from mor_jax.model.transformer import MoRLM

SKIP_EMPTY_PHASES = True   # lax.cond around phases no slot is in


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



def _entry(cfg: ModelConfig, lay: EngineLayout, variables, threshold, enter: _Rows, st: EngineState, cache):
  """ENTER rows: embedding, unique first layer, the first routing decision (run recursion 0, or exit)."""
  model = MoRLM(cfg)
  sel = enter.sel
  tok, pos = enter.take(st.token), enter.take(st.pos)
  x = model.apply(variables, tok[:, None], method=_embed)
  first = cache.first
  if cfg.has_middle:
    x, first = _run_kv(_layer_cfg(cfg), _unique(variables["params"], "first"), first, x, pos, enter, sel)
  zero = jnp.zeros_like(tok)
  admit0 = _admit(lay, cache.stage_len, zero, enter.rows)
  h0 = x[:, 0]
  target, gate = zero, jnp.zeros(tok.shape, jnp.float32)
  run = apply = sel & admit0
  if cfg.mor_enable and cfg.mor_type == "expert":
    z = model.apply(variables, x, 0, method=_expert_router)[:, 0, 0]
    want, gate = routing.expert_decision(cfg, z, 0, threshold)
    apply = sel & admit0 & want
    if not cfg.kv_sharing:   # with KV sharing recursion 0 writes every token's keys/values; the entering ones apply
      run = apply
  elif cfg.mor_enable:
    z = model.apply(variables, x, method=_token_router)[:, 0]
    _, target, gate = routing.token_choice_decision(cfg, z, routing.router_bias(cfg, variables))
  st = st.replace(phase=enter.put(st.phase, jnp.where(run, BLOCK, EXIT)), h=enter.put(st.h, h0),
                  h0=enter.put(st.h0, h0), depth=enter.put(st.depth, zero), apply=enter.put(st.apply, apply),
                  target=enter.put(st.target, target), gate=enter.put(st.gate, gate), rec=enter.put(st.rec, zero))
  return st, cache.replace(first=first)


def _block_pass(cfg: ModelConfig, lay: EngineLayout, variables, threshold, blk, st: EngineState, cache):
  """BLOCK rows: one pass of the shared block, every row at its own depth and region, then the next decision."""
  R, B = cfg.recursions, lay.slots
  depth = st.depth
  region = jnp.asarray(lay.region_of, jnp.int32)[depth]
  write = blk & jnp.asarray(lay.writes)[depth]
  off = jnp.asarray(lay.offsets, jnp.int32)[region]
  b = jnp.arange(B)
  whole = len(lay.capacity) == 1 and lay.window == lay.width
  out, k, v, idx = _cached_layers(_layer_cfg(cfg), _block_params(variables["params"]), cache.stage_k, cache.stage_v,
                                  cache.stage_index, st.h[:, None], st.pos, off_M=None if whole else off,
                                  len_M=cache.stage_len[region, b], write_M=write, window=lay.window)
  stage_len = cache.stage_len.at[region, b].add(write.astype(jnp.int32))
  cache = cache.replace(stage_k=k, stage_v=v, stage_index=idx, stage_len=stage_len)
  out = out[:, 0]
  applied = blk & st.apply
  expert = cfg.mor_enable and cfg.mor_type == "expert"
  h_new = st.h + st.gate[:, None].astype(st.h.dtype) * out if expert else out
  h = jnp.where(applied[:, None], h_new, st.h)
  nxt = depth + 1
  cont = applied & _admit(lay, stage_len, nxt)
  gate = st.gate
  if expert:
    z = jnp.take_along_axis(_routers(cfg, MoRLM(cfg), variables, h[:, None]), jnp.minimum(nxt, R - 1)[:, None],
                            -1)[:, 0]
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


def sample_rows(keys_B2, logits_BV, temperature_B, top_k_B, top_p_B):
  """`sample_logits` with each row's own sampling parameters (argmax for all rows when every row is greedy)."""
  def one(key, logits, t, k, p):
    return sample_logits(key[None], logits[None], {"temperature": t, "top_k": k, "top_p": p})[0]
  return jax.lax.cond(jnp.all(temperature_B <= 0), lambda: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32),
                      lambda: jax.vmap(one)(keys_B2, logits_BV, temperature_B, top_k_B, top_p_B))


def _exit(cfg: ModelConfig, lay: EngineLayout, variables, eos_id, leave: _Rows, st: EngineState, cache):
  """EXIT rows: unique last layer, final norm, head, sampling; the new token re-enters (or the request is done)."""
  model = MoRLM(cfg)
  sel = leave.sel
  x = leave.take(st.h)
  if cfg.mor_enable and cfg.mor_type == "token":
    x = leave.take(st.h0) + leave.take(st.gate)[:, None].astype(x.dtype) * x
  x = x[:, None]
  pos = leave.take(st.pos)
  last = cache.last
  if cfg.has_middle:
    x, last = _run_kv(_layer_cfg(cfg), _unique(variables["params"], "last"), last, x, pos, leave, sel)
  logits = logits_fn(cfg, variables, model.apply(variables, x, method=_final_norm)[:, 0])
  count = leave.take(st.count)
  tok = sample_rows(jax.vmap(jax.random.fold_in)(leave.take(st.keys), count), logits, leave.take(st.temperature),
                    leave.take(st.top_k), leave.take(st.top_p))
  rows = jnp.where(sel, jnp.arange(lay.slots), lay.slots) if leave.rows is None else leave.rows
  out = st.out.at[rows, count].set(tok, mode="drop")
  out_rec = st.out_rec.at[rows, count].set(leave.take(st.rec), mode="drop")
  count = count + 1
  finish = finish_code(tok, count, leave.take(st.limit), eos_id)
  st = st.replace(out=out, out_rec=out_rec, count=leave.put(st.count, count), finish=leave.put(st.finish, finish),
                  phase=leave.put(st.phase, jnp.where(finish != RUNNING, DONE, ENTER)),
                  token=leave.put(st.token, tok), pos=leave.put(st.pos, pos + 1))
  return st, cache.replace(last=last)


def _maybe(pred, fn, operand):
  return jax.lax.cond(pred, lambda a: fn(*a), lambda a: a, operand) if SKIP_EMPTY_PHASES else fn(*operand)


def _spread(sel, values, lo, hi):
  """Do the selected rows hold two or more different values (values in [lo, hi])?"""
  return jnp.max(jnp.where(sel, values, lo - 1)) > jnp.min(jnp.where(sel, values, hi + 1))


def tick(cfg: ModelConfig, lay: EngineLayout, variables, st: EngineState, threshold, eos_id) -> EngineState:
  """One step of the engine: entry phase, one batched block pass at mixed depths, exit phase."""
  R = cfg.recursions
  stats = dict(st.stats)
  t = stats["ticks"]
  cache = st.cache

  enter = _Rows(st.phase == ENTER, lay.entry_rows, t)
  st, cache = _maybe(jnp.any(enter.sel), lambda s, c: _entry(cfg, lay, variables, threshold, enter, s, c),
                     (st, cache))
  stats["entry_rows"] += enter.sel.sum(dtype=jnp.int32)
  stats["entry_waits"] += (st.phase == ENTER).sum(dtype=jnp.int32)

  blk = st.phase == BLOCK
  stats["mixed_depth_ticks"] += _spread(blk, st.depth, 0, R).astype(jnp.int32)
  st, cache = _maybe(jnp.any(blk), lambda s, c: _block_pass(cfg, lay, variables, threshold, blk, s, c), (st, cache))
  stats["block_rows"] += blk.sum(dtype=jnp.int32)
  stats["applied_rows"] += (blk & st.apply).sum(dtype=jnp.int32)   # (the pass leaves `apply` as it was)

  leave = _Rows(st.phase == EXIT, lay.exit_rows, t)
  # statistics of the exiting tokens: did tokens of different depths leave in this tick?
  mixed_exit = _spread(leave.sel, leave.take(st.rec), 0, R)
  st, cache = _maybe(jnp.any(leave.sel), lambda s, c: _exit(cfg, lay, variables, eos_id, leave, s, c),
                     (st, cache))
  stats["exit_rows"] += leave.sel.sum(dtype=jnp.int32)
  stats["tokens"] += leave.sel.sum(dtype=jnp.int32)
  stats["exit_waits"] += (st.phase == EXIT).sum(dtype=jnp.int32)
  stats["mixed_exit_ticks"] += mixed_exit.astype(jnp.int32)
  stats["ticks"] = t + 1
  return st.replace(cache=cache, stats=stats)


def run_ticks(cfg: ModelConfig, lay: EngineLayout, variables, st: EngineState, threshold, eos_id, max_ticks,
              refill_at) -> EngineState:
  """Ticks until `max_ticks` ran, no slot is live, or at least `refill_at` slots are free."""
  B = lay.slots
  stop_at = st.stats["ticks"] + max_ticks

  def cond(s):
    alive = live(s.phase)
    return (s.stats["ticks"] < stop_at) & jnp.any(alive) & (B - alive.sum() < refill_at)

  return jax.lax.while_loop(cond, lambda s: tick(cfg, lay, variables, s, threshold, eos_id), st)
