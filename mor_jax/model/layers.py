"""Llama building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Attention takes explicit token positions (for RoPE) and an explicit boolean
mask, so the same layer serves full sequences, gathered token subsets (MoR
routing) and cached decoding. Shape suffixes: B batch, T query tokens,
S key tokens, D hidden, H query heads, K kv heads, G heads per kv head,
E head dim, F ffn width.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from mor_jax.config import ModelConfig
from mor_jax.model import fused_attention

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


@jax.custom_vjp
def _linear(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _linear_fwd(x, w):
  return _linear(x, w), (x, w)


def _linear_bwd(res, g):
  x, w = res
  x2 = x.reshape(-1, x.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  # dW = x^T g contracts over the token axis; XLA:CPU runs that form slowly, so
  # the transpose is materialised (the barrier keeps XLA from folding it back).
  dw = jnp.dot(jax.lax.optimization_barrier(x2.T), g2).astype(w.dtype)
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ()))).astype(x.dtype)
  return dx, dw


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
  """nn.Dense's dot_general with a backward pass that is fast on CPU (see _linear_bwd)."""
  (lc, rc), (lb, rb) = dimension_numbers
  if tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb and rhs.ndim == 2 \
      and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype \
      and jax.default_backend() == "cpu":   # the layout trick is for XLA:CPU; GPUs pick their own layouts
    return _linear(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kw)


def dense(features: int, cfg: ModelConfig, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(cfg.init_std), name=name, dot_general=linear_dot_general)


class Kernel(nn.Module):
  """A bare [in, out] weight named like nn.Dense's ('<name>/kernel')."""
  shape: tuple
  init_std: float

  @nn.compact
  def __call__(self):
    return self.param("kernel", nn.initializers.normal(self.init_std), self.shape, jnp.float32)


def fused_projections(x_BTD, widths: dict, cfg: ModelConfig, norm_scale=None, split: bool = True,
                      direct_dw: bool = False):
  """Several bias-free projections of the same input as ONE matmul.

  The kernels stay separate parameters named as nn.Dense would name them
  (`<name>/kernel`), so checkpoints and the reference mapping are unchanged;
  they are concatenated for the call, which gives one larger matmul forward
  and one each for dX and dW backward instead of one per projection.
  With `norm_scale`, x is the un-normalised residual stream and the RMSNorm
  in front of the projections is part of the same call (see _norm_linear).
  `direct_dw` picks the weight-gradient form of the fused norm (see _weight_grad).
  Returns one output per projection, or (split=False) their concatenation.
  """
  D = x_BTD.shape[-1]
  dt = cfg.compute_dtype
  kernels = tuple(Kernel((D, n), cfg.init_std, name=name)().astype(dt) for name, n in widths.items())
  if norm_scale is not None:
    y = _norm_linear(x_BTD.astype(dt), norm_scale, kernels, cfg.rms_eps, direct_dw)
  else:
    w = jnp.concatenate(kernels, axis=1)
    y = linear_dot_general(x_BTD.astype(dt), w, (((x_BTD.ndim - 1,), (0,)), ((), ())))
  if not split:
    return y
  return _split_widths(y, widths.values())


def _split_widths(y, widths):
  """y cut along its last axis into consecutive pieces of the given widths.

  jnp.split rather than slices: its gradient is one concatenate, where slices'
  would be a sum of zero-padded arrays.
  """
  return jnp.split(y, list(itertools.accumulate(widths))[:-1], axis=-1)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learned scale.

  `scale_only=True` returns just the scale parameter, for a caller that fuses
  the normalisation into its projection (`fused_projections(norm_scale=...)`).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x_BTD, scale_only: bool = False):
    scale = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), jnp.float32)
    if scale_only:
      return scale
    return _rms_normalise(x_BTD, scale, self.eps)


def _rms_normalise(x_BTD, scale, eps):
  x32 = x_BTD.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x_BTD.dtype) * scale.astype(x_BTD.dtype)


def fuse_norms_and_activations() -> bool:
  """Whether layers use the fused norm->projection and SwiGLU->down-projection VJPs below.

  They exist for XLA:CPU, where training is bound by memory traffic: the scan
  over layers stacks every residual of the backward pass, and these two
  functions keep only their inputs (x and its rstd; the gate/up output)
  instead of four to six activations of the same size, recomputing the cheap
  elementwise parts in the backward pass. GPUs keep XLA's own fusion.
  """
  return jax.default_backend() == "cpu"


def _mm(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _weight_grad(x, g, direct: bool = False):
  """x^T g over all leading axes.

  XLA:CPU's matmul runs the token-contracting form at very different speeds
  per shape: for the qkv, o_proj and head shapes a materialised x^T (see
  _linear_bwd) is faster, for the MLP's gate/up and down shapes the direct
  contraction is (measured per core, transposed -> direct: gate/up 80 -> 90,
  down 56 -> 62 GFLOP/s; qkv 75 -> 57), and it saves writing the transpose.
  `direct` picks the direct form.
  """
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  if direct:
    return jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
  return jnp.dot(jax.lax.optimization_barrier(x2.T), g2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _norm_linear(x, scale, kernels, eps, direct_dw):
  """RMSNorm(x; scale) @ concat(kernels), whose backward pass recomputes the normalised x from x and rstd.

  The kernels come in separately and are concatenated inside, forward and
  backward: the residuals are then the layer's own parameters, which a scan
  over layers forwards as they are, rather than a concatenated copy that it
  would stack per layer (and zero-fill) every step.
  """
  return _mm(_rms_normalise(x, scale, eps), jnp.concatenate(kernels, axis=1))


def _norm_linear_fwd(x, scale, kernels, eps, direct_dw):
  x32 = x.astype(jnp.float32)
  rstd = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  n = (x32 * rstd).astype(x.dtype) * scale.astype(x.dtype)
  return _mm(n, jnp.concatenate(kernels, axis=1)), (x, rstd, scale, kernels)


def _norm_linear_bwd(eps, direct_dw, res, g):
  del eps
  x, rstd, scale, kernels = res
  w = jnp.concatenate(kernels, axis=1)
  xhat = x.astype(jnp.float32) * rstd
  n = xhat.astype(x.dtype) * scale.astype(x.dtype)
  dws = _split_widths(_weight_grad(n, g, direct_dw).astype(w.dtype), [k.shape[1] for k in kernels])
  dn = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  lead = tuple(range(x.ndim - 1))
  dscale = jnp.sum(dn * xhat.astype(x.dtype).astype(jnp.float32), axis=lead).astype(scale.dtype)
  dxhat = dn * scale.astype(jnp.float32)
  dx = rstd * (dxhat - xhat * jnp.mean(dxhat * xhat, axis=-1, keepdims=True))
  return dx.astype(x.dtype), dscale, tuple(dws)


_norm_linear.defvjp(_norm_linear_fwd, _norm_linear_bwd)


@jax.custom_vjp
def _swiglu_down(gu, w):
  """(silu(g) * u) @ w for gu = [g, u]; the backward pass recomputes the activation from gu."""
  n = w.shape[0]
  return _mm(nn.silu(gu[..., :n]) * gu[..., n:], w)


def _swiglu_down_fwd(gu, w):
  return _swiglu_down(gu, w), (gu, w)


def _swiglu_down_bwd(res, dy):
  gu, w = res
  n = w.shape[0]
  g, u = gu[..., :n], gu[..., n:]
  h = nn.silu(g) * u
  dw = _weight_grad(h, dy, direct=True).astype(w.dtype)
  dh = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  g32, u32 = g.astype(jnp.float32), u.astype(jnp.float32)
  sg = jax.nn.sigmoid(g32)
  dg = dh * u32 * sg * (1 + g32 * (1 - sg))
  du = dh * g32 * sg
  return jnp.concatenate([dg, du], axis=-1).astype(gu.dtype), dw


_swiglu_down.defvjp(_swiglu_down_fwd, _swiglu_down_bwd)


def rope_angles(positions_BT, head_dim: int, theta: float):
  """cos, sin of shape [B, T, E] for the rotate-half convention (float32)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BTNE, cos_BTE, sin_BTE):
  """Rotate-half RoPE, written per half: [x1 cos - x2 sin, x2 cos + x1 sin].

  The same products as x * cos + rotate_half(x) * sin (cos and sin repeat
  over the two halves), but the halves come from jnp.split and meet in a
  concatenate, so the gradient is a concatenate too rather than a sum of
  zero-padded arrays (which XLA:CPU fused with the q/k/v split's gradient
  into one slow loop over every padded branch).
  """
  x1, x2 = jnp.split(x_BTNE.astype(jnp.float32), 2, axis=-1)
  half = x1.shape[-1]
  cos, sin = cos_BTE[:, :, None, :half], sin_BTE[:, :, None, :half]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNE.dtype)


def causal_mask(q_index_BT, k_index_BS, q_segment_BT=None, k_segment_BS=None, k_valid_BS=None):
  """Boolean [B, T, S]: key s is visible to query t.

  Causality is decided on the tokens' original sequence indices, so it holds
  for gathered subsets too; segments (packed documents) and key validity
  (routing masks, cache fill) are optional. None when it is plain causal in
  the local order (same sorted indices for queries and keys, nothing else):
  fused attention then needs no dense mask (see fused_attention.py).
  """
  if q_index_BT is k_index_BS and q_segment_BT is None and k_segment_BS is None and k_valid_BS is None:
    return None
  m = q_index_BT[:, :, None] >= k_index_BS[:, None, :]
  if q_segment_BT is not None:
    m &= q_segment_BT[:, :, None] == k_segment_BS[:, None, :]
  if k_valid_BS is not None:
    m &= k_valid_BS[:, None, :]
  return m


class Attention(nn.Module):
  """Grouped-query attention with RoPE at explicit positions.

  Returns (output, (k, v)) where k already carries RoPE, so callers can cache
  or share keys/values. If `shared_kv` is given, the layer attends to those
  keys/values instead of its own (recursive KV sharing). If `cache` =
  (k_BSKE, v_BSKE, slot_BT) is given, the new keys/values are first written
  into the cache at `slot` (a slot >= S writes nothing) and attention runs
  over the whole cache with `mask_BTS`; the updated cache is returned as kv.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv=None, cache=None, norm_scale=None):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T, _ = x_BTD.shape
    q, k, v = fused_projections(x_BTD, {"q_proj": H * E, "k_proj": K * E, "v_proj": K * E}, cfg, norm_scale)
    q, k, v = q.reshape(B, T, H, E), k.reshape(B, T, K, E), v.reshape(B, T, K, E)
    q = apply_rope(q, cos_BTE, sin_BTE)
    k = apply_rope(k, cos_BTE, sin_BTE)
    if cache is not None:
      k_cache, v_cache, slot = cache
      b = jnp.arange(B)[:, None]
      k = k_cache.at[b, slot].set(k.astype(k_cache.dtype), mode="drop")
      v = v_cache.at[b, slot].set(v.astype(v_cache.dtype), mode="drop")
    if shared_kv is not None:
      k, v = shared_kv
    if fused_attention.use_fused(cfg.attention_impl, cache):   # jax.nn.dot_product_attention (cuDNN on GPU)
      out = fused_attention.attention(q, k, v, mask_BTS)
    else:
      out = dot_product_attention(q, k, v, mask_BTS)
    out = checkpoint_name(out, "attn_out")
    return dense(cfg.hidden_size, cfg, "o_proj")(out.reshape(B, T, H * E)), (k, v)


def dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """Softmax attention (scores and softmax in float32) with GQA: kv head k serves heads k*G..k*G+G-1.

  `mask_BTS` None means causal in the local token order (see
  `causal_mask`); then query blocks skip the key blocks after them, which
  saves about 3/8 of the work at 4 blocks. Both paths have hand-made
  backward passes: the G query heads of a kv head are stacked on the row
  axis ([B, K, G*T, E], no repeated keys/values, larger matmuls) and every
  batched matmul takes operands in [batch, M, K] x [batch, K, N] layout,
  because XLA:CPU runs the transposed forms that autodiff produces several
  times slower.
  """
  if mask_BTS is None:
    if q_BTHE.shape[1] != k_BSKE.shape[1]:
      raise ValueError(f"local causal attention needs as many keys as queries, got {q_BTHE.shape[1]} "
                       f"and {k_BSKE.shape[1]}")
    return _causal_attention(q_BTHE, k_BSKE, v_BSKE)
  return _masked_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)


_bar = jax.lax.optimization_barrier  # keeps XLA from folding the layout copies back into the matmuls


def _rows(x_BTHE, K, nb=1):
  """[B, T, H, E] -> [nb, B, K, G*Tb, E]: per query block, the G heads of kv head k stacked on rows."""
  B, T, H, E = x_BTHE.shape
  G, Tb = H // K, T // nb
  return x_BTHE.reshape(B, nb, Tb, K, G, E).transpose(1, 0, 3, 4, 2, 5).reshape(nb, B, K, G * Tb, E)


def _unrows(x, T):
  """Inverse of `_rows`: [nb, B, K, G*Tb, E] -> [B, T, K*G, E]."""
  nb, B, K, GTb, E = x.shape
  Tb = T // nb
  G = GTb // Tb
  return x.reshape(nb, B, K, G, Tb, E).transpose(1, 0, 4, 2, 3, 5).reshape(B, T, K * G, E)


def _softmax_bwd(p, dp):
  return p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))


def _prescale(q_BTHE):
  """q / sqrt(E): the score scale applied to q ([T, E]) rather than to every [T, S] score.

  Scaling the scores put the scalar into the score matmul's fused epilogue,
  for which XLA:CPU materialises it as a full [.., T, S] array every layer
  and block; on q it is one small multiply (training steps 1.02x vanilla,
  1.07x MoR expert R=2 on the CPU benchmark, interleaved A/B). The backward
  pass scales dq once for the same reason.
  """
  return q_BTHE * jnp.asarray(q_BTHE.shape[-1] ** -0.5, q_BTHE.dtype)


# ------------------------------------------------------------------ masked
def _masked_fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  B, T, H, E = q_BTHE.shape
  S, K = k_BSKE.shape[1], k_BSKE.shape[2]
  G = H // K
  q = _bar(_rows(_prescale(q_BTHE), K)[0])                                       # B K GT E (scaled)
  kT = _bar(k_BSKE.transpose(0, 2, 3, 1))                                         # B K E S
  v = _bar(v_BSKE.transpose(0, 2, 1, 3))                                          # B K S E
  s = _masked_scores(q, kT, mask_BTS, G)
  lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
  o = jnp.matmul(jnp.exp(s - lse).astype(v.dtype), v)                             # B K GT E
  return _unrows(o[None], T), (q, kT, v, mask_BTS, lse)   # probabilities recomputed backward (see _causal_fwd)


def _masked_scores(q, kT, mask_BTS, G):
  B, K, GT, _ = q.shape
  T, S = GT // G, kT.shape[-1]
  s = jnp.matmul(q, kT, preferred_element_type=jnp.float32)                      # q is prescaled
  return jnp.where(mask_BTS[:, None, None], s.reshape(B, K, G, T, S), NEG_INF).reshape(B, K, G * T, S)


@jax.custom_vjp
def _masked_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  return _masked_fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS)[0]


def _masked_bwd(res, do_BTHE):
  q, kT, v, mask_BTS, lse = res
  K, E, T = q.shape[1], q.shape[-1], do_BTHE.shape[1]
  dt = q.dtype
  p = jnp.exp(_masked_scores(q, kT, mask_BTS, q.shape[2] // T) - lse)
  do = _bar(_rows(do_BTHE, K)[0]).astype(dt)
  doT, qT = _bar(do.transpose(0, 1, 3, 2)), _bar(q.transpose(0, 1, 3, 2))         # B K E GT
  dvT = jnp.matmul(doT, p.astype(dt))                                             # B K E S (sums the G heads)
  dp = jnp.matmul(do, _bar(v.transpose(0, 1, 3, 2)), preferred_element_type=jnp.float32)
  ds = _softmax_bwd(p, dp).astype(dt)
  dq = jnp.matmul(ds, _bar(kT.transpose(0, 1, 3, 2)))                             # B K GT E
  dkT = jnp.matmul(qT, ds)                                                        # B K E S
  return (_unrows(dq[None], T) * jnp.asarray(E ** -0.5, dt), dkT.transpose(0, 3, 1, 2), dvT.transpose(0, 3, 1, 2),
          None)


_masked_attention.defvjp(lambda q, k, v, m: _masked_fwd(q, k, v, m), _masked_bwd)


# ------------------------------------------------------------------ causal
def causal_blocks(T: int) -> int:
  """Query blocks for local causal attention: blocks of >= 64 tokens, at most 8."""
  nb = max(1, min(8, T // 64))
  while T % nb:
    nb -= 1
  return nb


def _causal_scores(q_i, kT, i: int, Tb: int):
  """Masked scores [B, K, G*Tb, S] of query block i against key blocks 0..i (float32)."""
  B, K, GTb, _ = q_i.shape
  G, S = GTb // Tb, (i + 1) * Tb
  s = jnp.matmul(q_i, kT[..., :S], preferred_element_type=jnp.float32)           # q is prescaled
  m = jnp.concatenate([jnp.ones((Tb, i * Tb), bool), jnp.tril(jnp.ones((Tb, Tb), bool))], axis=1)
  return jnp.where(m, s.reshape(B, K, G, Tb, S), NEG_INF).reshape(B, K, GTb, S)


def _causal_fwd(q_BTHE, k_BSKE, v_BSKE):
  """Forward over query blocks; keeps only each row's log-sum-exp for the backward pass.

  The backward pass recomputes the probabilities from q, k and the
  log-sum-exp (one more small matmul per block) instead of reading stored
  ones: on CPU the stored probabilities were the largest residual of the
  layer scan (84 MB a step on the benchmark model), written, zero-initialised
  and read again every step.
  """
  B, T, H, E = q_BTHE.shape
  K = k_BSKE.shape[2]
  nb = causal_blocks(T)
  Tb = T // nb
  q = _bar(_rows(_prescale(q_BTHE), K, nb))                                       # nb B K GTb E (scaled)
  kT = _bar(k_BSKE.transpose(0, 2, 3, 1))                                         # B K E S
  v = _bar(v_BSKE.transpose(0, 2, 1, 3))                                          # B K S E
  outs, lses = [], []
  for i in range(nb):                  # query block i sees key blocks 0..i
    s = _causal_scores(q[i], kT, i, Tb)
    lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
    p = jnp.exp(s - lse)
    outs.append(jnp.matmul(p.astype(v.dtype), v[:, :, :(i + 1) * Tb]))
    lses.append(lse)
  return _unrows(jnp.stack(outs), T), (q, kT, v, jnp.stack(lses))


@jax.custom_vjp
def _causal_attention(q_BTHE, k_BSKE, v_BSKE):
  return _causal_fwd(q_BTHE, k_BSKE, v_BSKE)[0]


def _causal_bwd(res, do_BTHE):
  q, kT, v, lses = res
  nb, E, T = q.shape[0], q.shape[-1], do_BTHE.shape[1]
  Tb = T // nb
  dt = q.dtype
  do = _bar(_rows(do_BTHE, q.shape[2], nb)).astype(dt)
  # dk and dv are built transposed ([E, S] = [E, G*Tb] @ [G*Tb, S]): transposing q and do ([G*Tb, E]) once
  # costs far less than transposing every block's probabilities and score gradients ([G*Tb, S])
  doT, qT = _bar(do.transpose(0, 1, 2, 4, 3)), _bar(q.transpose(0, 1, 2, 4, 3))   # nb B K E GTb
  vT = _bar(v.transpose(0, 1, 3, 2))                                              # B K E S
  k = _bar(kT.transpose(0, 1, 3, 2))                                              # B K S E
  dqs = []
  dkT = jnp.zeros(kT.shape, jnp.float32)                                          # B K E S
  dvT = jnp.zeros(vT.shape, jnp.float32)
  for i in range(nb):
    S = (i + 1) * Tb
    p = jnp.exp(_causal_scores(q[i], kT, i, Tb) - lses[i])
    dvT = dvT.at[..., :S].add(jnp.matmul(doT[i], p.astype(dt)))
    dp = jnp.matmul(do[i], vT[..., :S], preferred_element_type=jnp.float32)
    ds = _softmax_bwd(p, dp).astype(dt)
    dqs.append(jnp.matmul(ds, k[:, :, :S]))
    dkT = dkT.at[..., :S].add(jnp.matmul(qT[i], ds))
  dq = _unrows(jnp.stack(dqs), T) * jnp.asarray(E ** -0.5, dt)
  return dq, dkT.astype(dt).transpose(0, 3, 1, 2), dvT.astype(dt).transpose(0, 3, 1, 2)


_causal_attention.defvjp(lambda q, k, v: _causal_fwd(q, k, v), _causal_bwd)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, norm_scale=None):
    cfg = self.cfg
    F = cfg.intermediate_size
    widths = {"gate_proj": F, "up_proj": F}
    if norm_scale is None and not fuse_norms_and_activations():
      g, u = fused_projections(x_BTD, widths, cfg)
      return dense(cfg.hidden_size, cfg, "down_proj")(nn.silu(g) * u)
    # one [g, u] array into the fused SwiGLU/down VJP (same parameters as above)
    gu = fused_projections(x_BTD, widths, cfg, norm_scale, split=False, direct_dw=True)
    w = Kernel((F, cfg.hidden_size), cfg.init_std, name="down_proj")()
    return _swiglu_down(gu, w.astype(cfg.compute_dtype))


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer; returns the full residual output and its (k, v).

  `repeats` > 1 applies the same layer several times in a row (the
  'sequence' sharing strategy); its (k, v) are then stacked on a leading
  repeat axis. Without a decode cache the batch runs as `cfg.batch_groups`
  independent groups (see config.resolve_batch_groups).
  """
  cfg: ModelConfig
  repeats: int = 1

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv=None, cache=None):
    cfg = self.cfg
    attn = Attention(cfg, name="attn")
    mlp = MLP(cfg, name="mlp")
    norm1 = RMSNorm(cfg.rms_eps, name="input_norm")
    norm2 = RMSNorm(cfg.rms_eps, name="post_attn_norm")
    B = x_BTD.shape[0]
    groups = math.gcd(B, cfg.batch_groups)
    if groups == 1 or cache is not None:
      return self._apply(attn, mlp, norm1, norm2, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv, cache)
    # independent batch groups (see config.resolve_batch_groups): same rows, same parameters
    def parts(a):   # each group's rows (arrays broadcast over the batch stay whole); split's gradient is a concatenate
      return [a] * groups if a is None or a.shape[0] != B else jnp.split(a, groups, axis=0)
    xs, coss, sins, masks = parts(x_BTD), parts(cos_BTE), parts(sin_BTE), parts(mask_BTS)
    kv_parts = jax.tree.map(parts, shared_kv)
    outs = [self._apply(attn, mlp, norm1, norm2, xs[g], coss[g], sins[g], masks[g],
                        jax.tree.map(lambda l, g=g: l[g], kv_parts, is_leaf=lambda l: isinstance(l, list)), None)
            for g in range(groups)]
    kv_axis = 0 if self.repeats == 1 else 1   # repeats stack kv on a leading axis
    return (jnp.concatenate([o[0] for o in outs], axis=0),
            jax.tree.map(lambda *a: jnp.concatenate(a, axis=kv_axis), *[o[1] for o in outs]))

  def _apply(self, attn, mlp, norm1, norm2, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv, cache):
    kvs = []
    fused = fuse_norms_and_activations()
    for _ in range(self.repeats):
      if fused:   # the norms run inside the projections' VJPs (same parameters, less saved for backward)
        h, kv = attn(x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv, cache, norm_scale=norm1(x_BTD, scale_only=True))
        x_BTD = x_BTD + h
        x_BTD = x_BTD + mlp(x_BTD, norm_scale=norm2(x_BTD, scale_only=True))
      else:
        h, kv = attn(norm1(x_BTD), cos_BTE, sin_BTE, mask_BTS, shared_kv, cache)
        x_BTD = x_BTD + h
        x_BTD = x_BTD + mlp(norm2(x_BTD))
      kvs.append(kv)
    if self.repeats == 1:
      return x_BTD, kvs[0]
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *kvs)
