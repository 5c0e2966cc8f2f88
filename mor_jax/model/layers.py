"""Llama building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, the decoder layer.

Attention takes explicit token positions (for RoPE) and an explicit boolean
mask, so the same layer serves full sequences, gathered token subsets (MoR
routing) and cached decoding. Every module takes the architecture (`cfg`) and
the execution policy (`policy`, kernels/policy.py): the policy picks the
compute dtype, the attention kernel (model/attention.py) and whether the
projections run through the CPU custom-gradient kernels (kernels/cpu_linear.py:
same parameters, same products). Shape suffixes: B batch, T query tokens,
S key tokens, D hidden, H query heads, K kv heads, G heads per kv head,
E head dim, F ffn width.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from mor_jax.config import ModelConfig
from mor_jax.kernels import cpu_linear
from mor_jax.kernels.batch_groups import run_in_groups
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model.attention import attend

PLAIN = ExecPolicy()


def normal_init(std: float, axes: tuple):
  """normal(0, std) weights whose logical axes (the names FSDP shards by, train/parallel.py) are `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def dense(features: int, cfg: ModelConfig, policy: ExecPolicy, name: str, axes: tuple) -> nn.Dense:
  """A bias-free nn.Dense in the policy's compute dtype (float32 parameters, logical axes `axes`)."""
  dot_general = cpu_linear.linear_dot_general if policy.cpu_kernels else jax.lax.dot_general
  return nn.Dense(features, use_bias=False, dtype=policy.compute_dtype, param_dtype=jnp.float32,
                  kernel_init=normal_init(cfg.init_std, axes), name=name, dot_general=dot_general)


class Kernel(nn.Module):
  """A bare [in, out] weight named like nn.Dense's ('<name>/kernel'), with logical axes `axes`."""
  shape: tuple
  init_std: float
  axes: tuple

  @nn.compact
  def __call__(self):
    return self.param("kernel", normal_init(self.init_std, self.axes), self.shape, jnp.float32)


def projections(x_BTD, widths: dict, out_axis: str, cfg: ModelConfig, policy: ExecPolicy, norm_scale=None,
                split: bool = True, direct_dw: bool = False):
  """Bias-free projections of the same input (nn.Dense parameters '<name>/kernel'), computed as ONE matmul.

  The kernels are concatenated for the call: one larger matmul forward and one
  each for dX and dW backward. With `norm_scale`, x is the un-normalised
  residual stream and RMSNorm runs inside the CPU kernel
  (cpu_linear.norm_linear; `direct_dw` picks its weight-gradient form).
  Returns one output per projection, or (split=False) their concatenation.
  """
  dt = policy.compute_dtype
  kernels = tuple(Kernel((x_BTD.shape[-1], n), cfg.init_std, ("embed", out_axis), name=name)().astype(dt)
                  for name, n in widths.items())
  x = x_BTD.astype(dt)
  if norm_scale is not None:
    y = cpu_linear.norm_linear(x, norm_scale, kernels, cfg.rms_eps, direct_dw)
  elif policy.cpu_kernels:
    y = cpu_linear.linear(x, jnp.concatenate(kernels, axis=1))
  else:
    y = jax.lax.dot_general(x, jnp.concatenate(kernels, axis=1), (((x.ndim - 1,), (0,)), ((), ())))
  return cpu_linear.split_widths(y, widths.values()) if split else y


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a learned scale.

  `scale_only=True` returns just the scale parameter, for a caller that fuses
  the normalisation into its projection (`projections(norm_scale=...)`).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x_BTD, scale_only: bool = False):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x_BTD.shape[-1],),
                       jnp.float32)
    if scale_only:
      return scale
    return rms_norm(x_BTD, scale, self.eps)


def rms_norm(x, scale, eps: float):
  """RMSNorm as a function (the module above and the cached decoders share it): float32 statistics, then the
  input's dtype times the scale."""
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return y.astype(x.dtype) * scale.astype(x.dtype)


def swiglu(gate, up):
  """The MLP's gated activation silu(gate) * up."""
  return nn.silu(gate) * up


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
  attention kernels then need no dense mask (see model/attention.py).
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
  policy: ExecPolicy = PLAIN

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv=None, cache=None, norm_scale=None):
    cfg = self.cfg
    H, K, E = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    B, T, _ = x_BTD.shape
    q, k, v = projections(x_BTD, {"q_proj": H * E, "k_proj": K * E, "v_proj": K * E}, "heads", cfg, self.policy,
                          norm_scale)
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
    out = checkpoint_name(attend(q, k, v, mask_BTS, self.policy), "attn_out")
    return dense(cfg.hidden_size, cfg, self.policy, "o_proj", ("heads", "embed"))(out.reshape(B, T, H * E)), (k, v)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: ModelConfig
  policy: ExecPolicy = PLAIN

  @nn.compact
  def __call__(self, x_BTD, norm_scale=None):
    cfg, policy = self.cfg, self.policy
    F = cfg.intermediate_size
    widths = {"gate_proj": F, "up_proj": F}
    if not policy.cpu_kernels:
      g, u = projections(x_BTD, widths, "mlp", cfg, policy, norm_scale)
      return dense(cfg.hidden_size, cfg, policy, "down_proj", ("mlp", "embed"))(swiglu(g, u))
    # CPU kernels: one [g, u] array into the fused SwiGLU->down VJP (same parameters as above)
    gu = projections(x_BTD, widths, "mlp", cfg, policy, norm_scale, split=False, direct_dw=True)
    w = Kernel((F, cfg.hidden_size), cfg.init_std, ("mlp", "embed"), name="down_proj")()
    return cpu_linear.swiglu_down(gu, w.astype(policy.compute_dtype))


class DecoderLayer(nn.Module):
  """Pre-norm Llama layer: x + attn(norm(x)), then + mlp(norm(x)); returns the output and its (k, v).

  `repeats` > 1 applies the same layer several times in a row (the
  'sequence' sharing strategy); its (k, v) are then stacked on a leading
  repeat axis. Without a decode cache the batch runs as `policy.batch_groups`
  independent groups (kernels/batch_groups.py).
  """
  cfg: ModelConfig
  repeats: int = 1
  policy: ExecPolicy = PLAIN

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv=None, cache=None):
    cfg, policy = self.cfg, self.policy
    mods = (Attention(cfg, policy, name="attn"), MLP(cfg, policy, name="mlp"),
            RMSNorm(cfg.rms_eps, name="input_norm"), RMSNorm(cfg.rms_eps, name="post_attn_norm"))
    groups = math.gcd(x_BTD.shape[0], policy.batch_groups)
    if groups == 1 or cache is not None:
      return self._apply(mods, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv, cache)
    kv_axis = 0 if self.repeats == 1 else 1   # repeats stack kv on a leading axis
    return run_in_groups(functools.partial(self._apply, mods), groups, kv_axis, x_BTD, cos_BTE, sin_BTE, mask_BTS,
                         shared_kv)

  def _apply(self, mods, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv, cache=None):
    attn, mlp, norm1, norm2 = mods
    kvs = []
    for _ in range(self.repeats):
      if self.policy.cpu_kernels:   # the norms run inside the projections' CPU kernels (same parameters)
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
