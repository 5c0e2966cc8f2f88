"""Attention, one dispatcher: XLA's or cuDNN's (jax.nn.dot_product_attention) or the CPU kernel.

`attend(q, k, v, mask, policy)` computes softmax(q k^T / sqrt(E) + mask) v
with grouped-query attention (kv head k serves query heads k*G .. k*G+G-1),
scores and softmax in float32, by the kernel the execution policy names
(kernels/policy.py):
- `xla`: jax.nn.dot_product_attention with XLA's implementation (any backend);
- `cudnn`: the same call with cuDNN's fused flash attention where it applies
  (NVIDIA GPUs, bf16/fp16, plain causal masks; model/fused_attention.py), XLA's
  otherwise (dense masks: segments, routing validity, decode caches);
- `custom`: kernels/cpu_attention.py (hand-written backward, XLA:CPU layouts).

`mask_BTS` None means causal in the local token order (query t sees keys
0..t, T == S): see layers.causal_mask.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mor_jax.kernels import cpu_attention
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model import fused_attention


def attend(q_BTHE, k_BSKE, v_BSKE, mask_BTS, policy: ExecPolicy):
  """[B, T, H, E] attention output of queries q over keys/values k, v ([B, S, K, E])."""
  if policy.attention == "custom":
    return cpu_attention.attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS)
  if policy.attention == "cudnn":
    impl = fused_attention.implementation(q_BTHE.dtype, q_BTHE.shape[-1], mask_BTS is None, backend="gpu")
  else:
    impl = "xla"
  return fused_attention.attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS, impl=impl)


def attend_cache(q_BTHE, kT_NES, v_NSE, mask_BTS):
  """Attention of T new queries over a decode cache of N = B x K rows (row b*K + k: sequence b, kv head k; a batch
  of one sequence keeps no unit dimension, which makes XLA copy the cache around its in-place update), GQA as
  above, scores and softmax in float32. Keys are kept transposed, [N, E, S], values [N, S, E]: both batched
  matmuls then read the cache in the layout XLA:CPU runs without a transposed copy (1.75x faster attention).
  `mask_BTS` says which cache entries each query sees (a row that sees none gets a uniform mix: its output is
  unused). Returns [B, T, H, E]."""
  B, T, H, E = q_BTHE.shape
  N, _, S = kT_NES.shape
  K = N // B
  G = H // K
  q = q_BTHE.reshape(B, T, K, G, E).transpose(0, 2, 3, 1, 4).reshape(N, G * T, E)
  s = jax.lax.dot_general(q, kT_NES, (((2,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  s = s * (1.0 / math.sqrt(E))
  mask = jnp.broadcast_to(mask_BTS[:, None, None], (B, K, G, T, S)).reshape(N, G * T, S)
  s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v_NSE.dtype)
  out = jnp.einsum("nms,nse->nme", p, v_NSE, preferred_element_type=jnp.float32)
  return out.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)
