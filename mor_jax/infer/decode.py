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
saves compute. The model's own modules are reused: embedding, routers and
head through `MoRLM.apply(method=...)`, layers through `Block.apply` on the
model's (stacked) parameters.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer.cache import CachePlan, KVCache
from mor_jax.infer.errors import InferenceError
from mor_jax.model import routing
from mor_jax.model.layers import rope_angles
from mor_jax.model.recursion import Block, stack_unrolled_params
from mor_jax.model.transformer import MoRLM


def check_supported(cfg: ModelConfig) -> None:
  if cfg.mor_enable and cfg.rand_router:
    raise InferenceError("mor.rand_router models route by random scores (an ablation); causal inference "
                         "routing is undefined for them. Generate with a model that has a learned router.")


def _layer_cfg(cfg: ModelConfig) -> ModelConfig:
  # inference runs the layers scanned and without rematerialisation (no gradients; same numbers)
  return dataclasses.replace(cfg, scan_layers=True)   # modules run kernels.policy.for_decoding() (their default)


def _block_params(params) -> dict:
  """The shared block's parameters in the scanned layout {'layers': stacked on axis 0}."""
  bp = params["block"]
  return bp if "layers" in bp else stack_unrolled_params(bp)


def _embed(m, tokens):
  return m.embed(tokens)


def _final_norm(m, x):
  return m.final_norm(x)


def _logits(m, h):
  return m.logits(h)


def _expert_router(m, x, r):
  return m.routers[r](x)


def _token_router(m, x):
  return m.router(x)


def logits_fn(cfg: ModelConfig, variables, h_BTD):
  """float32 logits from final-normed hidden states."""
  return MoRLM(cfg).apply(variables, h_BTD, method=_logits)


def _run_cached(lcfg, layer_params, kv: KVCache, x, cos, sin, pos, enter):
  """Runs a stack of layers on the entering tokens, writing their keys/values into `kv`."""
  slot, admitted = kv.reserve(enter)
  kv = kv.record(slot, pos, admitted)
  n = jax.tree.leaves(layer_params)[0].shape[0]
  out, (k, v) = Block(lcfg, n).apply({"params": layer_params}, x, cos, sin, kv.mask(pos), None, (kv.k, kv.v, slot))
  return out, kv.replace(k=k, v=v), admitted


def _run_shared(lcfg, layer_params, kv: KVCache, x, cos, sin, pos):
  """Runs a stack of layers attending to the keys/values already in `kv` (recursive KV sharing)."""
  n = jax.tree.leaves(layer_params)[0].shape[0]
  out, _ = Block(lcfg, n).apply({"params": layer_params}, x, cos, sin, kv.mask(pos), (kv.k, kv.v), None)
  return out


def _maybe(skip_if_empty: bool, fn, enter, x, kv):
  """fn(x, kv) -> (out, kv, admitted), skipped when no token enters (and `skip_if_empty`)."""
  if not skip_if_empty:
    return fn(x, kv)
  return jax.lax.cond(jnp.any(enter), lambda a: fn(*a), lambda a: (a[0], a[1], jnp.zeros_like(enter)), (x, kv))


def _expert_stage(cfg, plan, model, variables, run_call, x, valid, threshold, skip_empty):
  """Expert-choice: a token enters recursion r if it entered r - 1 and r's router says so (routing.expert_decision);
  entering tokens get h + gate * block(h). Returns (x, entered per recursion)."""
  enter, entered = valid, []
  for call in plan.calls:
    r = call.recursion
    z = model.apply(variables, x, r, method=_expert_router)[..., 0]
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


def _token_stage(cfg, plan, model, variables, run_call, x, valid, skip_empty):
  """Token-choice: the router's depth (routing.token_choice_decision, with the loss-free bias) from the stage
  input; the token runs depth + 1 recursions and leaves with h0 + gate * state. Returns (x, entered)."""
  z = model.apply(variables, x, method=_token_router)                      # [B, T, R]
  _, depth, gate = routing.token_choice_decision(cfg, z, routing.router_bias(cfg, variables))
  state, enter, entered = x, valid, []
  for call in plan.calls:
    enter = enter & (depth >= call.recursion)
    out, admitted = run_call(call, state, enter, skip_empty and call.recursion > 0)
    state = jnp.where(admitted[..., None], out, state)
    enter = admitted
    entered.append(admitted)
  return jnp.where(valid[..., None], x + gate[..., None].astype(x.dtype) * state, x), entered


def forward_cached(cfg: ModelConfig, plan: CachePlan, variables, cache: dict, tokens_BT, pos_BT, valid_BT, *,
                   threshold=None, skip_empty: bool = True):
  """T new tokens per row through the model with caches (see the module docstring).

  tokens_BT, pos_BT: the tokens and their positions; valid_BT: which of them
  are real (padding and finished rows write nothing). threshold: the
  expert-choice router threshold (default cfg.threshold).
  Returns (h_BTD final-normed, cache, info) where info['recursions'] [B, T]
  int32 counts the recursions each token ran and info['entered'] [R, B, T]
  says which recursions it entered.
  """
  model = MoRLM(cfg)
  lcfg = _layer_cfg(cfg)
  params = variables["params"]
  R = cfg.recursions
  thr = cfg.threshold if threshold is None else threshold
  valid = valid_BT.astype(bool)
  pos = pos_BT.astype(jnp.int32)
  cos, sin = rope_angles(pos, cfg.head_dim, cfg.rope_theta)
  cache = dict(cache)
  stage = list(cache["stage"])
  x = model.apply(variables, tokens_BT, method=_embed)

  if cfg.has_middle:
    first = jax.tree.map(lambda a: a[None], params["first"])
    x, cache["first"], _ = _run_cached(lcfg, {"layers": first}, cache["first"], x, cos, sin, pos, valid)

  bparams = _block_params(params)

  def run_call(call, x_in, enter, skip):
    lp = bparams if call.layers == (0, cfg.base_depth) else jax.tree.map(lambda a: a[call.layers[0]:call.layers[1]], bparams)
    if call.cache is None:   # KV sharing: attend to recursion `reads`'s cache, write nothing
      kv = stage[call.reads]
      fn = lambda x_, kv_: (_run_shared(lcfg, lp, kv_, x_, cos, sin, pos), kv_, enter)
      out, _, admitted = _maybe(skip, fn, enter, x_in, kv)
      return out, admitted
    fn = lambda x_, kv_: _run_cached(lcfg, lp, kv_, x_, cos, sin, pos, enter)
    out, stage[call.cache], admitted = _maybe(skip, fn, enter, x_in, stage[call.cache])
    return out, admitted

  if cfg.mor_enable and cfg.mor_type == "expert":
    x, entered = _expert_stage(cfg, plan, model, variables, run_call, x, valid, thr, skip_empty)
  elif cfg.mor_enable:
    x, entered = _token_stage(cfg, plan, model, variables, run_call, x, valid, skip_empty)
  else:
    entered = [None] * R
    for call in plan.calls:    # every token runs every call (sequence: layer-major order)
      x, admitted = run_call(call, x, valid, False)
      entered[call.recursion] = admitted if entered[call.recursion] is None else entered[call.recursion] & admitted

  if cfg.has_middle:
    last = jax.tree.map(lambda a: a[None], params["last"])
    x, cache["last"], _ = _run_cached(lcfg, {"layers": last}, cache["last"], x, cos, sin, pos, valid)
  cache["stage"] = tuple(stage)
  h = model.apply(variables, x, method=_final_norm)
  entered = jnp.stack(entered)
  return h, cache, {"recursions": entered.sum(0, dtype=jnp.int32), "entered": entered}
