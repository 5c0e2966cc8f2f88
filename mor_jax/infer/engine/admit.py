"""Admission: prompts prefilled (the plain path's `forward_cached`, batched) and moved into free engine slots."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
from mor_jax.infer.decode import forward_cached, logits_fn
from mor_jax.infer.engine.layout import DONE, ENTER, EngineLayout, EngineState
from mor_jax.infer.engine.tick import sample_rows
from mor_jax.infer.sampling import RUNNING, finish_code


def prefill_plan(lay: EngineLayout, P: int) -> cache_lib.CachePlan:
  """The cache plan of a prefill of P positions: the engine's regions, each at most P entries."""
  return dataclasses.replace(lay.plan, max_len=int(P), stage_capacity=tuple(min(c, P) for c in lay.plan.stage_capacity))


def _targets(K: int, slots_B, real_B, entries: int, first_entry: int, spare: int):
  """Cache rows and entries that entries 0..entries-1 of each prefill row go to: (slot's rows, first_entry + j), or
  for padding rows (slot 0's rows, the spare entry). Shapes [Bp, K, entries]."""
  Bp = slots_B.shape[0]
  slot = jnp.where(real_B, slots_B, 0)
  rows = jnp.broadcast_to((slot[:, None] * K + jnp.arange(K))[:, :, None], (Bp, K, entries))
  at = jnp.where(real_B[:, None, None], first_entry + jnp.arange(entries)[None, None, :], spare)
  return rows, jnp.broadcast_to(at, (Bp, K, entries))


def _put(dst, src, rows, at, entries: int, keys: bool):
  """Entries 0..entries-1 of the prefill cache `src` into `dst` at (rows, at): keys [N, E, S], values [N, S, E]."""
  Bp, K = rows.shape[:2]
  if keys:
    new = src[:, :, :entries].reshape(Bp, K, -1, entries).transpose(0, 1, 3, 2)
    return cache_lib.write_entries(dst, (rows, slice(None), at), new)
  new = src[:, :entries].reshape(Bp, K, entries, -1)
  return cache_lib.write_entries(dst, (rows, at), new)


def _insert_caches(cfg: ModelConfig, lay: EngineLayout, c, pc: dict, slots_B, real_B):
  """The prefill caches `pc` moved into slots `slots_B` of the engine's caches `c` (in place)."""
  K = cfg.num_kv_heads
  ks, vs, idx, ln = list(c.stage_k), list(c.stage_v), c.stage_index, c.stage_len
  spare = lay.width - 1
  for g, kv in enumerate(pc["stage"]):
    n = kv.capacity
    rows, at = _targets(K, slots_B, real_B, n, lay.offsets[g], spare)
    for l in range(len(ks)):
      ks[l], vs[l] = _put(ks[l], kv.k[l], rows, at, n, True), _put(vs[l], kv.v[l], rows, at, n, False)
    idx = idx.at[rows[:, 0] // K, at[:, 0]].set(kv.index[:, :n], mode="promise_in_bounds")
    ln = ln.at[g, slots_B].set(kv.length, mode="drop")
  c = c.replace(stage_k=tuple(ks), stage_v=tuple(vs), stage_index=idx, stage_len=ln)

  def put_kv(dst: cache_lib.KVCache, src: cache_lib.KVCache):
    n = src.capacity
    rows, at = _targets(K, slots_B, real_B, n, 0, dst.capacity)
    return dst.replace(k=(_put(dst.k[0], src.k[0], rows, at, n, True),),
                       v=(_put(dst.v[0], src.v[0], rows, at, n, False),),
                       index=dst.index.at[rows[:, 0] // K, at[:, 0]].set(src.index[:, :n], mode="promise_in_bounds"),
                       length=dst.length.at[slots_B].set(src.length, mode="drop"))
  if cfg.has_middle:
    c = c.replace(first=put_kv(c.first, pc["first"]), last=put_kv(c.last, pc["last"]))
  return c


def prefill(cfg: ModelConfig, lay: EngineLayout, w, tokens_BP, lengths_B, keys_B2, sp_B, threshold):
  """Prefills a batch of prompts (the plain path's forward_cached, the engine's regions at the prompt bucket P).

  The first token is sampled from the prompt's last position (key fold_in(key, 0)), as in the plain path; sp_B:
  each prompt's sampling parameters ({"temperature", "top_k", "top_p"}: [Bp] arrays). Depends on (Bp, P) only,
  not on the engine's capacity. Returns (caches, prompt recursions [Bp, P], first token [Bp], its recursions [Bp]).
  """
  Bp, P = tokens_BP.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (Bp, P))
  valid = pos < lengths_B[:, None]
  plan = prefill_plan(lay, P)
  pc = cache_lib.init_cache(cfg, plan, Bp, w.dtype)
  h, pc, info = forward_cached(cfg, plan, w, pc, tokens_BP, pos, valid, threshold=threshold)
  last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  tok = sample_rows(keys_B2, jnp.zeros((Bp,), jnp.int32), logits_fn(cfg, w, last), sp_B["temperature"],
                    sp_B["top_k"], sp_B["top_p"])
  rec_last = jnp.take_along_axis(info["recursions"], (lengths_B - 1)[:, None], axis=1)[:, 0]
  return pc, jnp.where(valid, info["recursions"], 0), tok, rec_last


def insert(cfg: ModelConfig, lay: EngineLayout, st: EngineState, pc: dict, tok_B, lengths_B, slots_B, keys_B2,
           limits_B, reqs_B, sp_B, eos_id):
  """Moves prefilled requests into free slots (in place): caches, first token, limits, sampling parameters.

  slots_B: the slot of each prompt (lay.slots for padding rows: nothing is kept). The prompt bucket must fit the
  engine's capacity.
  """
  c = _insert_caches(cfg, lay, st.cache, pc, slots_B, slots_B < lay.slots)
  put = lambda a, x: a.at[slots_B].set(x.astype(a.dtype), mode="drop")
  finish = finish_code(tok_B, 1, limits_B, eos_id)
  one = jnp.ones_like(tok_B)
  return st.replace(cache=c, phase=put(st.phase, jnp.where(finish != RUNNING, DONE, ENTER)), token=put(st.token, tok_B),
                    pos=put(st.pos, lengths_B), rec=put(st.rec, jnp.zeros_like(tok_B)), req=put(st.req, reqs_B),
                    count=put(st.count, one), base=put(st.base, one), limit=put(st.limit, limits_B),
                    finish=put(st.finish, finish), keys=st.keys.at[slots_B].set(keys_B2, mode="drop"),
                    temperature=put(st.temperature, sp_B["temperature"]), top_k=put(st.top_k, sp_B["top_k"]),
                    top_p=put(st.top_p, sp_B["top_p"]))
