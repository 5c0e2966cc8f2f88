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
