"""Cached forward pass with causal routing: the core of prefill and token-by-token decoding.

`forward_cached(cfg, plan, variables, cache, tokens, positions, valid)` runs
T new tokens per sequence through the model, reading and extending the KV
caches, and returns their final-normed hidden states. It gives the same
result as `MoRLM.apply(..., routing_mode="causal")` over the whole sequence
(spec section 6), routing by the same decision functions (`mor_jax.model.routing.expert_decision`,
`token_choice_decision`):

- expert-choice: a token enters recursion r if it entered r-1 and the
  router of r says so (`sigmoid(z) >= threshold`; tanh/none: `>= 0`);
  recursion 0 with capacity 1 takes every token. The entering tokens get
  `h + w * block(h)`, `w = alpha * sigmoid(z)` as in training.
- token-choice: the router picks a depth d from the stage input; the token
  runs d+1 recursions and leaves with `h0 + w * state`.
  Inference processes every token to its depth: the training-time
  `capacity_factor` drop and the `bal_warmup_steps` forced depth do not
  apply (the full causal pass matches when capacity_factor = 1).
- only tokens that enter a recursion write its cache, and attention at that
  recursion reads only its cache; with recursive KV sharing, recursions >= 1
  attend to recursion 0's cache.

Everything is static-shaped (masks, not gathers), so the same code serves
prefill (T = prompt length) and decoding (T = 1). A recursion that no token
of the batch enters is skipped (`lax.cond`), which is where batch-1 decoding
saves compute. The parameters come in the decode layout (`weights.DecodeWeights`:
one entry per layer, fused q/k/v and gate/up kernels, the head as [D, V]) and
every layer runs through `layer_step`, whose pieces are the model's own
functions (RMSNorm, RoPE, SwiGLU from model/layers.py, `attend_cache` from
model/attention.py); the routers are the model's `Router` modules.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
from mor_jax.infer import weights as weights_lib
from mor_jax.infer.cache import CachePlan, KVCache
from mor_jax.infer.errors import InferenceError
from mor_jax.model import routing
from mor_jax.model.attention import attend_cache
from mor_jax.model.layers import apply_rope, rms_norm, rope_angles, swiglu


def check_supported(cfg: ModelConfig) -> None:
  if cfg.mor_enable and cfg.rand_router:
    raise InferenceError("mor.rand_router models route by random scores (an ablation); causal inference "
                         "routing is undefined for them. Generate with a model that has a learned router.")


def logits_fn(cfg: ModelConfig, weights, h_BTD):
  """float32 logits from final-normed hidden states (`weights`: DecodeWeights or the model's variables)."""
  return weights_lib.logits(cfg, weights_lib.prepare_weights(cfg, weights), h_BTD)


def write_kv(cache, new_BTKE, slot_BT, keys: bool):
  """Writes new keys [B, T, K, E] into a key cache [N, E, S] (keys=True), or values into a value cache [N, S, E],
  of N = B x K rows at entries slot_BT, in place."""
  B, T, K, _ = new_BTKE.shape
  rows = (jnp.arange(B)[:, None, None] * K + jnp.arange(K)[None, :, None])            # [B, K, 1]
  slots = jnp.broadcast_to(slot_BT[:, None, :], (B, K, T))
  new = new_BTKE.transpose(0, 2, 1, 3)                                                 # [B, K, T, E]
  return cache_lib.write_entries(cache, (rows, slice(None), slots) if keys else (rows, slots), new)


def layer_step(cfg: ModelConfig, w: dict, x_BTD, cos, sin, k_NES, v_NSE, slot_BT, mask_BTS):
  """One decoder layer (weights.DecodeWeights layer dict) on T new tokens per row with a decode cache
  (cache.KVCache: N = B x kv heads rows of S entries; keys transposed).

  slot_BT: where each new key/value goes in the cache (every slot must be in range: the caches keep a spare
  entry for tokens that write nothing, so that every write is in place); None: attend to the cache as it is
  (recursive KV sharing: the layer's own keys/values are not kept). mask_BTS: the cache entries each query sees
  (after the writes). Returns (x, k, v) with the updated cache arrays.
  """
  H, K, E, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
  B, T, _ = x_BTD.shape
  mm = functools.partial(weights_lib.matmul, nk=weights_lib.rows_out(cfg, w["qkv"].dtype))
  qkv = mm(rms_norm(x_BTD, w["in_norm"], cfg.rms_eps), w["qkv"])
  q = apply_rope(qkv[..., :H * E].reshape(B, T, H, E), cos, sin)
  if slot_BT is not None:
    k_NES = write_kv(k_NES, apply_rope(qkv[..., H * E:(H + K) * E].reshape(B, T, K, E), cos, sin), slot_BT, True)
    v_NSE = write_kv(v_NSE, qkv[..., (H + K) * E:].reshape(B, T, K, E), slot_BT, False)
  att = attend_cache(q, cache_lib.entries(k_NES), cache_lib.entries(v_NSE), mask_BTS).reshape(B, T, H * E)
  x_BTD = x_BTD + mm(att, w["o"], x_BTD.dtype)
  gu = mm(rms_norm(x_BTD, w["post_norm"], cfg.rms_eps), w["gate_up"])
  x_BTD = x_BTD + mm(swiglu(gu[..., :F], gu[..., F:]), w["down"], x_BTD.dtype)
  return x_BTD, k_NES, v_NSE


def _run_cached(cfg, layers, kv: KVCache, x, cos, sin, pos, enter):
  """Runs a stack of layers on the entering tokens, writing their keys/values into `kv`."""
  slot, admitted = kv.reserve(enter)
  kv = kv.record(slot, pos, admitted)
  mask = kv.mask(pos)
  ks, vs = list(kv.k), list(kv.v)
  for j, w in enumerate(layers):
    x, ks[j], vs[j] = layer_step(cfg, w, x, cos, sin, ks[j], vs[j], slot, mask)
  return x, kv.replace(k=tuple(ks), v=tuple(vs)), admitted


def _run_shared(cfg, layers, kv: KVCache, x, cos, sin, pos):
  """Runs a stack of layers attending to the keys/values already in `kv` (recursive KV sharing)."""
  mask = kv.mask(pos)
  for j, w in enumerate(layers):
    x, _, _ = layer_step(cfg, w, x, cos, sin, kv.k[j], kv.v[j], None, mask)
  return x


def _maybe(skip_if_empty: bool, fn, enter, x, kv):
  """fn(x, kv) -> (out, kv, admitted), skipped when no token enters (and `skip_if_empty`)."""
  if not skip_if_empty:
    return fn(x, kv)
  return jax.lax.cond(jnp.any(enter), lambda a: fn(*a), lambda a: (a[0], a[1], jnp.zeros_like(enter)), (x, kv))


def _expert_stage(cfg, plan, w, run_call, x, valid, threshold, skip_empty):
  """Expert-choice: a token enters recursion r if it entered r - 1 and r's router says so (routing.expert_decision);
  entering tokens get h + gate * block(h). Returns (x, entered per recursion)."""
  enter, entered = valid, []
  for call in plan.calls:
    r = call.recursion
    z = weights_lib.expert_router(cfg, w, x, r)
    enters, gate = routing.expert_decision(cfg, z, r, threshold)
    enter = enter & enters
    if cfg.kv_sharing and r == 0:
      # recursion 0 computes every token's keys/values (deeper recursions read them all)
      out, written = run_call(call, x, valid, False)
      admitted = enter & written
    else:
      out, admitted = run_call(call, x, enter, skip_empty and r > 0)
    x = jnp.where(admitted[..., None], x + gate[..., None].astype(x.dtype) * out, x)
    enter = admitted
    entered.append(admitted)
  return x, entered


def _token_stage(cfg, plan, w, run_call, x, valid, skip_empty):
  """Token-choice: the router's depth (routing.token_choice_decision, with the loss-free bias) from the stage
  input; the token runs depth + 1 recursions and leaves with h0 + gate * state. Returns (x, entered)."""
  z = weights_lib.token_router(cfg, w, x)                                  # [B, T, R]
  _, depth, gate = routing.token_choice_decision(cfg, z, w.router_bias)
  state, enter, entered = x, valid, []
  for call in plan.calls:
    enter = enter & (depth >= call.recursion)
    out, admitted = run_call(call, state, enter, skip_empty and call.recursion > 0)
    state = jnp.where(admitted[..., None], out, state)
    enter = admitted
    entered.append(admitted)
  return jnp.where(valid[..., None], x + gate[..., None].astype(x.dtype) * state, x), entered


def forward_cached(cfg: ModelConfig, plan: CachePlan, weights, cache: dict, tokens_BT, pos_BT, valid_BT, *,
                   threshold=None, skip_empty: bool = True):
  """T new tokens per row through the model with caches (see the module docstring).

  weights: the decode layout (weights.prepare_weights; the model's variables are arranged on the fly, which a
  loop should not pay every step). tokens_BT, pos_BT: the tokens and their positions; valid_BT: which of them
  are real (padding and finished rows write nothing). threshold: the expert-choice router threshold (default
  cfg.threshold).
  Returns (h_BTD final-normed, cache, info) where info['recursions'] [B, T]
  int32 counts the recursions each token ran and info['entered'] [R, B, T]
  says which recursions it entered.
  """
  w = weights_lib.prepare_weights(cfg, weights)
  R = cfg.recursions
  thr = cfg.threshold if threshold is None else threshold
  valid = valid_BT.astype(bool)
  pos = pos_BT.astype(jnp.int32)
  cos, sin = rope_angles(pos, cfg.head_dim, cfg.rope_theta)
  cache = dict(cache)
  stage = list(cache["stage"])
  x = weights_lib.embed(w, tokens_BT)

  if cfg.has_middle:
    x, cache["first"], _ = _run_cached(cfg, [w.first], cache["first"], x, cos, sin, pos, valid)

  def run_call(call, x_in, enter, skip):
    layers = w.block[call.layers[0]:call.layers[1]]
    if call.cache is None:   # KV sharing: attend to recursion `reads`'s cache, write nothing
      fn = lambda x_, kv_: (_run_shared(cfg, layers, kv_, x_, cos, sin, pos), kv_, enter)
      out, _, admitted = _maybe(skip, fn, enter, x_in, stage[call.reads])
      return out, admitted
    fn = lambda x_, kv_: _run_cached(cfg, layers, kv_, x_, cos, sin, pos, enter)
    out, stage[call.cache], admitted = _maybe(skip, fn, enter, x_in, stage[call.cache])
    return out, admitted

  if cfg.mor_enable and cfg.mor_type == "expert":
    x, entered = _expert_stage(cfg, plan, w, run_call, x, valid, thr, skip_empty)
  elif cfg.mor_enable:
    x, entered = _token_stage(cfg, plan, w, run_call, x, valid, skip_empty)
  else:
    entered = [None] * R
    for call in plan.calls:    # every token runs every call (sequence: layer-major order)
      x, admitted = run_call(call, x, valid, False)
      entered[call.recursion] = admitted if entered[call.recursion] is None else entered[call.recursion] & admitted

  if cfg.has_middle:
    x, cache["last"], _ = _run_cached(cfg, [w.last], cache["last"], x, cos, sin, pos, valid)
  cache["stage"] = tuple(stage)
  h = rms_norm(x, w.final_norm, cfg.rms_eps)
  entered = jnp.stack(entered)
  return h, cache, {"recursions": entered.sum(0, dtype=jnp.int32), "entered": entered}
