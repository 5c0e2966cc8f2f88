"""jax.nn.dot_product_attention: cuDNN's fused flash attention on NVIDIA GPUs, XLA's elsewhere.

The `xla` and `cudnn` kernels of model/attention.py (the execution policy,
kernels/policy.py, picks one). cuDNN applies for bf16 / fp16, head dim <= 128
and a multiple of 8, compute capability >= 8.0, when the mask is plain
causal; XLA's implementation takes everything else (CPU, TPU, float32,
arbitrary masks).

The mask convention: `mask_BTS = None` means "causal in the local token
order" (query t sees keys 0..t, T == S). `layers.causal_mask` returns None
exactly when that holds: full sequences, and the gathered token subsets of
expert-choice routing, whose token indices are sorted, so the causal mask over
the original positions is the lower triangle over the gathered ones. Segment
masks (document masking), validity masks (capacity warm-up, token-choice,
causal inference routing) and decode caches keep a dense boolean mask and go
through XLA's implementation (cuDNN would turn a dense mask into a dense bias).

GQA: kv head k serves query heads k*G .. k*G+G-1. Scores and softmax are
computed in float32 for bf16 inputs.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=None)
def _gpu_compute_capability() -> float:
  try:
    dev = jax.devices()[0]
    return float(getattr(dev, "compute_capability", "0") or 0)
  except Exception:  # pylint: disable=broad-except
    return 0.0


def implementation(dtype, head_dim: int, causal_only: bool, backend: str) -> str:
  """'cudnn' where cuDNN's fused kernel applies on `backend`, else 'xla' (MOR_JAX_FUSED_ATTENTION=xla forces XLA's)."""
  if os.environ.get("MOR_JAX_FUSED_ATTENTION", "") == "xla":
    return "xla"
  if backend not in ("gpu", "cuda") or not causal_only:
    return "xla"
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "xla"
  if head_dim > 128 or head_dim % 8 or _gpu_compute_capability() < 8.0:
    return "xla"
  return "cudnn"


def local_causal_mask(T: int, S: int):
  """Boolean [1, T, S] lower triangle (query t sees keys 0..t)."""
  return jnp.tril(jnp.ones((T, S), bool))[None]


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS=None, *, impl: str = "xla"):
  """Softmax attention with GQA; `mask_BTS` None = causal in local order (see module doc). Returns [B, T, H, E]."""
  T, S = q_BTHE.shape[1], k_BSKE.shape[1]
  causal_only = mask_BTS is None
  if causal_only and T != S:
    raise ValueError(f"a local causal mask needs as many keys as queries, got T={T}, S={S}")
  if causal_only:
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, is_causal=True, implementation=impl)
  mask = jnp.broadcast_to(mask_BTS, (q_BTHE.shape[0], T, S))[:, None]   # B 1 T S: the same for every head
  return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask, implementation=impl)
