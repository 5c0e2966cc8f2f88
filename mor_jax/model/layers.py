"""Llama building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Attention takes explicit token positions (for RoPE) and an explicit boolean
mask, so the same layer serves full sequences, gathered token subsets (MoR
routing) and cached decoding. Shape suffixes: B batch, T query tokens,
S key tokens, D hidden, H query heads, K kv heads, G heads per kv head,
E head dim, F ffn width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from mor_jax.config import ModelConfig

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
      and preferred_element_type in (None, lhs.dtype) and lhs.dtype == rhs.dtype:
    return _linear(lhs, rhs)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type, **kw)


def dense(features: int, cfg: ModelConfig, name: str) -> nn.Dense:
  return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.normal(cfg.init_std), name=name, dot_general=linear_dot_general)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learned scale."""
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x_BTD):
    scale = self.param("scale", nn.initializers.ones, (x_BTD.shape[-1],), jnp.float32)
    x32 = x_BTD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x_BTD.dtype) * scale.astype(x_BTD.dtype)


def rope_angles(positions_BT, head_dim: int, theta: float):
  """cos, sin of shape [B, T, E] for the rotate-half convention (float32)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  ang = positions_BT.astype(jnp.float32)[..., None] * inv_freq
  ang = jnp.concatenate([ang, ang], axis=-1)
  return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BTNE, cos_BTE, sin_BTE):
  half = x_BTNE.shape[-1] // 2
  rot = jnp.concatenate([-x_BTNE[..., half:], x_BTNE[..., :half]], axis=-1)
  cos, sin = cos_BTE[:, :, None, :], sin_BTE[:, :, None, :]
  return (x_BTNE.astype(jnp.float32) * cos + rot.astype(jnp.float32) * sin).astype(x_BTNE.dtype)


def causal_mask(q_index_BT, k_index_BS, q_segment_BT=None, k_segment_BS=None, k_valid_BS=None):
  """Boolean [B, T, S]: key s is visible to query t.

  Causality is decided on the tokens' original sequence indices, so it holds
  for gathered subsets too; segments (packed documents) and key validity
  (routing masks, cache fill) are optional.
  """
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
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv=None, cache=None):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T, _ = x_BTD.shape
    q = dense(H * E, cfg, "q_proj")(x_BTD).reshape(B, T, H, E)
    k = dense(K * E, cfg, "k_proj")(x_BTD).reshape(B, T, K, E)
    v = dense(K * E, cfg, "v_proj")(x_BTD).reshape(B, T, K, E)
    q = apply_rope(q, cos_BTE, sin_BTE)
    k = apply_rope(k, cos_BTE, sin_BTE)
    if cache is not None:
      k_cache, v_cache, slot = cache
      b = jnp.arange(B)[:, None]
      k = k_cache.at[b, slot].set(k.astype(k_cache.dtype), mode="drop")
      v = v_cache.at[b, slot].set(v.astype(v_cache.dtype), mode="drop")
    if shared_kv is not None:
      k, v = shared_kv
    out = dot_product_attention(q, k, v, mask_BTS)
    out = checkpoint_name(out, "attn_out")
    return dense(cfg.hidden_size, cfg, "o_proj")(out.reshape(B, T, H * E)), (k, v)


def dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """Softmax attention (scores and softmax in float32) with GQA: kv head k serves heads k*G..k*G+G-1.

  Written with a hand-made backward pass whose batched matmuls all take
  operands in [batch, M, K] x [batch, K, N] layout: XLA:CPU runs the
  transposed forms that autodiff produces several times slower.
  """
  return _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)


def _heads_first(q_BTHE, k_BSKE, v_BSKE):
  G = q_BTHE.shape[2] // k_BSKE.shape[2]
  bar = jax.lax.optimization_barrier
  q = bar(q_BTHE.transpose(0, 2, 1, 3))                              # B H T E
  kT = bar(jnp.repeat(k_BSKE, G, axis=2).transpose(0, 2, 3, 1))      # B H E S
  v = bar(jnp.repeat(v_BSKE, G, axis=2).transpose(0, 2, 1, 3))       # B H S E
  return q, kT, v


def _attention_fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  E = q_BTHE.shape[-1]
  q, kT, v = _heads_first(q_BTHE, k_BSKE, v_BSKE)
  s = jnp.matmul(q, kT, preferred_element_type=jnp.float32) * (E ** -0.5)
  s = jnp.where(mask_BTS[:, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  o = jnp.matmul(p.astype(v.dtype), v)                               # B H T E
  return o.transpose(0, 2, 1, 3), (q, kT, v, p)


@jax.custom_vjp
def _attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  return _attention_fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS)[0]


def _attention_vjp_fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  o, res = _attention_fwd(q_BTHE, k_BSKE, v_BSKE, mask_BTS)
  return o, (res, k_BSKE.shape[2], mask_BTS)


def _attention_vjp_bwd(saved, do_BTHE):
  (q, kT, v, p), K, mask = saved
  B, H, T, E = q.shape
  S = v.shape[2]
  G = H // K
  bar = jax.lax.optimization_barrier
  dt = q.dtype
  do = bar(do_BTHE.transpose(0, 2, 1, 3)).astype(dt)                # B H T E
  dv = jnp.matmul(bar(p.transpose(0, 1, 3, 2)).astype(dt), do)       # B H S E
  dp = jnp.matmul(do, bar(v.transpose(0, 1, 3, 2)), preferred_element_type=jnp.float32)  # B H T S
  ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * (E ** -0.5)
  dq = jnp.matmul(ds.astype(dt), bar(kT.transpose(0, 1, 3, 2)))      # B H T E
  dk = jnp.matmul(bar(ds.transpose(0, 1, 3, 2)).astype(dt), q)       # B H S E
  dq = dq.transpose(0, 2, 1, 3)
  dk = dk.reshape(B, K, G, S, E).sum(2).transpose(0, 2, 1, 3)
  dv = dv.reshape(B, K, G, S, E).sum(2).transpose(0, 2, 1, 3)
  return dq, dk, dv, None


_attention.defvjp(_attention_vjp_fwd, _attention_vjp_bwd)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.cfg
    g = dense(cfg.intermediate_size, cfg, "gate_proj")(x_BTD)
    u = dense(cfg.intermediate_size, cfg, "up_proj")(x_BTD)
    return dense(cfg.hidden_size, cfg, "down_proj")(nn.silu(g) * u)


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer; returns the full residual output and its (k, v).

  `repeats` > 1 applies the same layer several times in a row (the
  'sequence' sharing strategy); its (k, v) are then stacked on a leading
  repeat axis.
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
    kvs = []
    for _ in range(self.repeats):
      h, kv = attn(norm1(x_BTD), cos_BTE, sin_BTE, mask_BTS, shared_kv, cache)
      x_BTD = x_BTD + h
      x_BTD = x_BTD + mlp(norm2(x_BTD))
      kvs.append(kv)
    if self.repeats == 1:
      return x_BTD, kvs[0]
    return x_BTD, jax.tree.map(lambda *a: jnp.stack(a), *kvs)
