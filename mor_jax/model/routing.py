"""Mixture-of-Recursions routers and routed recursion stages.

Expert-choice (spec section 3): one router per recursion picks the top
`k_r = max(1, floor(c_r T))` of the tokens that reached recursion r-1; the
shared block runs on those tokens alone and its output is added back with the
router's gate. Token-choice (spec section 4): one router assigns every token
a depth; recursion r runs the block on the tokens whose depth is >= r.

Shapes are static so the step compiles once. Two selection forms exist:
- gathered: the k_r chosen tokens are gathered into a [B, k_r] buffer (the
  block runs on k_r tokens: real compute savings);
- masked: all T positions stay in place with a validity mask (capacity
  warm-up, where k changes every step, and causal inference routing).

`block_fn(x, index, positions, segments, valid, shared_kv)` runs the shared
block on a token subset and returns (out, kv).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from mor_jax.config import ModelConfig
from mor_jax.model.layers import normal_init


class Router(nn.Module):
  """Linear (D -> n) or MLP (D -> 2D -> GELU(erf) -> n) router without biases, in float32."""
  cfg: ModelConfig
  out_features: int = 1

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    init = lambda axes: normal_init(cfg.init_std, axes)  # noqa: E731
    x = x.astype(jnp.float32) / cfg.router_temperature
    if cfg.router_type == "linear":
      return nn.Dense(self.out_features, use_bias=False, kernel_init=init(("embed", "router")), name="dense")(x)
    h = nn.Dense(2 * cfg.hidden_size, use_bias=False, kernel_init=init(("embed", "router")), name="fc1")(x)
    h = nn.gelu(h, approximate=False)
    return nn.Dense(self.out_features, use_bias=False, kernel_init=init(("router", None)), name="fc2")(h)


# ----------------------------------------------------------------------------------------------- decisions
# The routing decisions as pure functions of the router logits: training (the stages below), the cached
# decoder (infer/decode.py) and the depth-wise batching engine (infer/engine/) all route through these.


def gate_scores(cfg: ModelConfig, z):
  """Expert-choice (g, p): g the router function, p = alpha * g the score/gate."""
  if cfg.router_func == "sigmoid":
    g = jax.nn.sigmoid(z)
  elif cfg.router_func == "tanh":
    g = jnp.tanh(z)
  else:
    g = z
  return g, (cfg.alpha * g if cfg.router_func != "none" else g)


def passes_threshold(cfg: ModelConfig, g, threshold):
  """Causal test: does the router say 'continue'? (sigmoid: g >= thr; tanh/none: >= 0)."""
  return g >= (threshold if cfg.router_func == "sigmoid" else 0.0)


def gate_of(cfg: ModelConfig, w):
  """The weight a routed block output is added with: w (gating 'weighted') or 1 ('identity')."""
  return jnp.ones_like(w) if cfg.gating == "identity" else w


def expert_enters(cfg: ModelConfig, r, g, threshold):
  """Causal expert-choice: does a token that reached recursion r - 1 enter recursion r?

  The router of r says so (`passes_threshold`); recursion 0 at capacity 1 takes every token. `r` is a Python
  int or an int array (one recursion per row).
  """
  passes = passes_threshold(cfg, g, threshold)
  if cfg.selected_fractions[0] < 1:
    return passes
  return passes | (jnp.asarray(r) == 0)


def expert_decision(cfg: ModelConfig, z, r, threshold):
  """Causal expert-choice decision from the logit z of recursion r's router: (enters, gate)."""
  g, p = gate_scores(cfg, z)
  return expert_enters(cfg, r, g, threshold), gate_of(cfg, p)


def token_probs(cfg: ModelConfig, z_R):
  """Token-choice scores p = alpha * softmax(z) (router_func 'softmax') or alpha * sigmoid(z), over the last axis."""
  return cfg.alpha * (jax.nn.softmax(z_R, -1) if cfg.router_func == "softmax" else jax.nn.sigmoid(z_R))


def token_choice_decision(cfg: ModelConfig, z_R, bias_R=None, step=None):
  """Token-choice decision from the router logits [..., R]: (p, depth, gate).

  depth = argmax(p + bias) (bias: the loss-free balancing bias, or None) is the last recursion the token runs
  (0-based); during the balancing warm-up (`step` < bal_warmup_steps; step None: inference) every token runs
  all R. gate = p[depth] without the bias (1 with gating 'identity'), shape [...].
  """
  p = token_probs(cfg, z_R)
  depth = jnp.argmax(p + (0.0 if bias_R is None else bias_R), axis=-1).astype(jnp.int32)
  if cfg.bal_warmup_steps > 0 and step is not None:
    depth = jnp.where(step < cfg.bal_warmup_steps, cfg.recursions - 1, depth)
  w = jnp.take_along_axis(p, depth[..., None], axis=-1)[..., 0]
  return p, depth, gate_of(cfg, w)


def router_bias(cfg: ModelConfig, variables):
  """The token-choice router bias of `variables` (loss-free balancing), or None."""
  if not (cfg.mor_enable and cfg.mor_type == "token" and cfg.balancing == "loss_free"):
    return None
  return variables.get("router_bias", {}).get("bias")


def warmup_capacity(c: float, step, warmup_steps: int):
  """Capacity at optimizer step t: cosine from 1 down to c over `warmup_steps`."""
  frac = jnp.minimum(1.0, step.astype(jnp.float32) / max(1, warmup_steps))
  return c + (1.0 - c) * 0.5 * (1.0 + jnp.cos(math.pi * frac))


def _take(x, idx_BK):
  """Per-row gather along the token axis (x: [B, T, ...], idx: [B, K])."""
  return jnp.take_along_axis(x, idx_BK.reshape(idx_BK.shape + (1,) * (x.ndim - 2)), axis=1)


def _scatter_add(h_BTD, idx_BK, upd_BKD):
  b = jnp.arange(h_BTD.shape[0])[:, None]
  return h_BTD.at[b, idx_BK].add(upd_BKD.astype(h_BTD.dtype))


def _bce_with_logits(z, target):
  return jnp.maximum(z, 0) - z * target + jnp.log1p(jnp.exp(-jnp.abs(z)))


def expert_choice_stage(cfg: ModelConfig, routers, block_fn, h_BTD, index_BT, pos_BT, seg_BT, *,
                        mode: str, step=None, threshold=None, rng=None):
  """Runs the recursion stage with expert-choice routing.

  mode: 'topk' (training/eval as the reference: gathered top-k),
        'topk_warmup' (capacity warm-up: masked top-k with k from `step`),
        'causal' (inference: threshold routing, masked).
  Returns (h, aux) with aux holding losses and per-recursion statistics.
  """
  B, T, _ = h_BTD.shape
  R = cfg.recursions
  caps = cfg.selected_fractions
  ks = cfg.selected_tokens(T)
  threshold = cfg.threshold if threshold is None else threshold
  masked = mode in ("topk_warmup", "causal")

  cand = index_BT                      # candidates' sequence indices [B, n]
  cand_valid = jnp.ones((B, T), bool)  # masked form only
  sampling_losses, accs, z_losses, frac_tokens, sel_out, logits_out, entered = [], [], [], [], [], [], []
  kv0 = None
  for r in range(R):
    x_cand = h_BTD if masked or r == 0 else _take(h_BTD, cand)
    if cfg.rand_router:
      z = jax.random.uniform(jax.random.fold_in(rng, r), x_cand.shape[:2] + (1,))
      g, p = z[..., 0], z[..., 0]
    else:
      z = routers[r](x_cand)
      g, p = gate_scores(cfg, z[..., 0])
    logits_out.append(z)
    n = cand.shape[1]
    everyone = False
    if masked:
      if mode == "causal":
        chosen = cand_valid & expert_enters(cfg, r, g, threshold)
      else:
        chosen = cand_valid & _warmup_topk(p, cand_valid, caps[r], step, cfg.cap_warmup_steps)
      target = chosen.astype(jnp.float32)
      count = jnp.maximum(cand_valid.sum(), 1)
      weight = cand_valid.astype(jnp.float32)
      sel, sel_valid = index_BT, chosen
      w = p
    else:
      everyone = ks[r] == n   # capacity 1 at this recursion: the sorted top-k is the identity, skip gather/scatter
      w, sel, target = (p, cand, jnp.ones((B, n), jnp.float32)) if everyone else _topk(p, cand, ks[r])
      sel_valid = None
      count = B * n
      weight = jnp.ones((B, n), jnp.float32)
    # auxiliary statistics over the candidates of this recursion
    if not cfg.rand_router:
      zc = z[..., 0]
      sampling_losses.append(jnp.sum(_bce_with_logits(zc, target) * weight) / count)
      accs.append(jnp.sum((passes_threshold(cfg, g, 0.5).astype(jnp.float32) == target) * weight) / count)
      z_losses.append(jnp.sum(zc * zc * weight) / count)
    frac_tokens.append((sel_valid.mean() if masked else jnp.float32(sel.shape[1] / T)))
    sel_out.append(sel)
    if masked:
      entered.append(sel_valid)
    # run the shared block on the selected tokens and add its gated output
    h_BTD, kv = _add_routed(cfg, block_fn, h_BTD, index_BT, pos_BT, seg_BT, sel, sel_valid, gate_of(cfg, w),
                            everyone and sel is index_BT, kv0)
    kv0 = kv if r == 0 else kv0
    if masked:
      cand_valid = sel_valid
    else:
      cand = sel
  aux = {"router_logits": logits_out, "selected": sel_out,
         "tokens_per_recursion": jnp.stack(frac_tokens),
         "mean_recursions": jnp.sum(jnp.stack(frac_tokens))}
  if masked:   # recursions each token entered [B, T]
    aux["recursions"] = jnp.stack(entered).sum(0, dtype=jnp.int32)
  return h_BTD, _expert_losses(cfg, mode, aux, sampling_losses, accs, z_losses)


def _warmup_topk(p, cand_valid, c: float, step, warmup_steps: int):
  """Masked top-k with the warm-up capacity of `step`: is each candidate among the k highest scores?"""
  T = p.shape[1]
  k_dyn = jnp.maximum(1, jnp.floor(warmup_capacity(c, step, warmup_steps) * T + 1e-6)).astype(jnp.int32)
  score = jnp.where(cand_valid, p, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-score, axis=1, stable=True), axis=1, stable=True)
  return rank < k_dyn


def _topk(p, cand, k: int):
  """Gathered top-k of the candidates, in sequence order: (gate scores, selected indices, BCE target [B, n])."""
  B, n = p.shape
  top_p, top_i = jax.lax.top_k(p, k)
  order = jnp.argsort(top_i, axis=1)
  top_i = jnp.take_along_axis(top_i, order, axis=1)
  w = jnp.take_along_axis(top_p, order, axis=1)
  target = jnp.zeros((B, n), jnp.float32).at[jnp.arange(B)[:, None], top_i].set(1.0)
  return w, jnp.take_along_axis(cand, top_i, axis=1), target


def _add_routed(cfg: ModelConfig, block_fn, h_BTD, index_BT, pos_BT, seg_BT, sel, sel_valid, gate, in_place: bool,
                kv0):
  """Runs the shared block on the selected tokens and adds its gated output; returns (h, this call's kv).

  Masked form: sel_valid [B, T]; gathered: sel [B, k] indices (in_place: every token, in order)."""
  if cfg.kv_sharing:
    out, kv = block_fn(h_BTD, index_BT, pos_BT, seg_BT, None, kv0)
    if sel_valid is not None:
      return h_BTD + jnp.where(sel_valid, gate, 0.0)[..., None].astype(h_BTD.dtype) * out, kv
    if in_place:
      return h_BTD + gate[..., None].astype(h_BTD.dtype) * out, kv
    return _scatter_add(h_BTD, sel, gate[..., None] * _take(out, sel)), kv
  if sel_valid is not None:
    out, _ = block_fn(h_BTD, index_BT, pos_BT, seg_BT, sel_valid, None)
    return h_BTD + jnp.where(sel_valid, gate, 0.0)[..., None].astype(h_BTD.dtype) * out, None
  if in_place:
    out, _ = block_fn(h_BTD, index_BT, pos_BT, seg_BT, None, None)
    return h_BTD + gate[..., None].astype(h_BTD.dtype) * out, None
  y = _take(h_BTD, sel)
  out, _ = block_fn(y, sel, _take(pos_BT, sel), None if seg_BT is None else _take(seg_BT, sel), None, None)
  return _scatter_add(h_BTD, sel, gate[..., None] * out), None


def _expert_losses(cfg: ModelConfig, mode: str, aux: dict, sampling_losses, accs, z_losses) -> dict:
  """The router losses of an expert-choice stage (summed over recursions) and their weighted sum `aux_loss`."""
  zero = jnp.float32(0.0)
  aux["sampling_loss"] = sum(sampling_losses) if sampling_losses else zero
  aux["sampling_acc"] = sum(accs) / len(accs) if accs else zero
  aux["z_loss"] = sum(z_losses) if z_losses else zero
  weighted = zero
  if mode != "causal":
    if cfg.expert_router_loss == "bce" and not cfg.rand_router:
      weighted = weighted + cfg.aux_coeff * aux["sampling_loss"]
    if cfg.z_loss and not cfg.rand_router:
      weighted = weighted + cfg.z_coeff * aux["z_loss"]
  aux["aux_loss"] = weighted
  return aux


def token_choice_stage(cfg: ModelConfig, router, bias_R, block_fn, h_BTD, index_BT, pos_BT, seg_BT, *,
                       step=None):
  """Runs the recursion stage with token-choice routing (depth per token)."""
  B, T, _ = h_BTD.shape
  R = cfg.recursions
  z = router(h_BTD)                                   # [B, T, R] float32
  p, depth, gate = token_choice_decision(cfg, z, bias_R, step)
  gate = gate[..., None]                              # [B, T, 1]
  cap = T if cfg.token_buffer_fraction >= 1 else max(1, int(math.ceil(cfg.token_buffer_fraction * T)))
  state, out_BTD = h_BTD, h_BTD
  frac, dropped = [], []
  for r in range(R):
    active = depth >= r
    if r == 0:
      state, _ = block_fn(state, index_BT, pos_BT, seg_BT, None, None)
      processed = active
    else:
      order = jnp.argsort(~active, axis=1, stable=True)[:, :cap]   # active tokens first, in order
      valid = jnp.take_along_axis(active, order, axis=1)
      idx = jnp.where(valid, order, T + jnp.arange(cap)[None])  # distinct fill indices for empty slots
      idx_c = jnp.minimum(idx, T - 1)
      y = _take(state, idx_c)
      o, _ = block_fn(y, jnp.where(valid, order, -1), _take(pos_BT, idx_c),
                      None if seg_BT is None else _take(seg_BT, idx_c), valid, None)
      b = jnp.arange(B)[:, None]
      state = state.at[b, idx].set(jnp.where(valid[..., None], o, y), mode="drop")
      processed = jnp.zeros((B, T), bool).at[b, idx].set(valid, mode="drop")
      dropped.append(jnp.sum(active & ~processed))
    frac.append(processed.mean())
    out_BTD = jnp.where((depth == r)[..., None], h_BTD + gate.astype(h_BTD.dtype) * state, out_BTD)
  load = jnp.stack([jnp.mean(depth == i) for i in range(R)])
  P = jnp.mean(p, axis=(0, 1))
  bal_loss = jnp.sum(P * load * R)
  z_loss = jnp.mean(jax.nn.logsumexp(z, axis=-1) ** 2)
  weighted = jnp.float32(0.0)
  if cfg.balancing == "loss":
    weighted = weighted + cfg.bal_coeff * bal_loss
  if cfg.z_loss:
    weighted = weighted + cfg.z_coeff * z_loss
  aux = {"router_logits": [z], "depth": depth, "balancing_loss": bal_loss, "balancing_ratio": load,
         "z_loss": z_loss, "aux_loss": weighted, "tokens_per_recursion": jnp.stack(frac),
         "mean_recursions": jnp.sum(jnp.stack(frac)),
         "dropped_tokens": sum(dropped) if dropped else jnp.int32(0)}
  return out_BTD, aux


def loss_free_bias_update(bias_R, load_R, rate: float):
  """Loss-free balancing: push the bias of over-loaded depths down, under-loaded up."""
  return bias_R + rate * jnp.sign(jnp.mean(load_R) - load_R)
