"""Admission: prompts prefilled (the plain path's `forward_cached`, batched) and moved into free engine slots."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
from mor_jax.infer.decode import forward_cached, logits_fn
from mor_jax.infer.engine.layout import DONE, ENTER, EngineLayout, EngineState
from mor_jax.infer.engine.tick import sample_rows
from mor_jax.infer.sampling import RUNNING, finish_code


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
                   keys_B2, limits_B, reqs_B, sp_B, threshold, eos_id):
  """Prefills a batch of prompts (the plain path's forward_cached) and moves them into free slots.

  slots_B: the slot of each prompt (B = lay.slots for padding rows: nothing is written). The first token is
  sampled from the prompt's last position (key fold_in(key, 0)), as in the plain path; sp_B: each prompt's
  sampling parameters ({"temperature", "top_k", "top_p"}: [Bp] arrays), kept in its slot.
  Returns (state, prompt recursions [Bp, P]).
  """
  Bp, P = tokens_BP.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (Bp, P))
  valid = pos < lengths_B[:, None]
  pc = cache_lib.init_cache(cfg, lay.plan, Bp)
  h, pc, info = forward_cached(cfg, lay.plan, variables, pc, tokens_BP, pos, valid, threshold=threshold)
  last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  tok = sample_rows(jax.vmap(jax.random.fold_in)(keys_B2, jnp.zeros((Bp,), jnp.int32)),
                    logits_fn(cfg, variables, last), sp_B["temperature"], sp_B["top_k"], sp_B["top_p"])
  rec_last = jnp.take_along_axis(info["recursions"], (lengths_B - 1)[:, None], axis=1)[:, 0]
  c = _insert_caches(cfg, lay, st.cache, pc, slots_B)
  put = lambda a, x: a.at[slots_B].set(x.astype(a.dtype), mode="drop")
  finish = finish_code(tok, 1, limits_B, eos_id)
  st = st.replace(cache=c, phase=put(st.phase, jnp.where(finish != RUNNING, DONE, ENTER)), token=put(st.token, tok),
                  pos=put(st.pos, lengths_B), rec=put(st.rec, jnp.zeros_like(tok)), req=put(st.req, reqs_B),
                  count=put(st.count, jnp.ones_like(tok)), limit=put(st.limit, limits_B),
                  finish=put(st.finish, finish), keys=st.keys.at[slots_B].set(keys_B2, mode="drop"),
                  temperature=put(st.temperature, sp_B["temperature"]), top_k=put(st.top_k, sp_B["top_k"]),
                  top_p=put(st.top_p, sp_B["top_p"]),
                  out=st.out.at[slots_B, 0].set(tok, mode="drop"),
                  out_rec=st.out_rec.at[slots_B, 0].set(rec_last, mode="drop"))
  return st, jnp.where(valid, info["recursions"], 0)
