"""Fused attention through `jax.nn.dot_product_attention` (the GPU path; `model.attention_impl`).

`model.attention_impl`:
- `custom`: the hand-written attention of layers.py (custom VJP with
  CPU-friendly layouts; the fastest on CPU);
- `dot_product`: `jax.nn.dot_product_attention`, with the implementation
  chosen per backend: cuDNN's fused flash attention on NVIDIA GPUs (bf16 /
  fp16, head dim <= 128, multiple of 8) when the mask is plain causal, XLA's
  otherwise (CPU, TPU, float32, arbitrary masks);
- `auto` (default): `dot_product` on accelerators, `custom` on CPU.

The mask convention: `mask_BTS = None` means "causal in the local token
order" (query t sees keys 0..t, T == S). `layers.causal_mask` returns None
exactly when that holds: full sequences, and the gathered token subsets of
expert-choice routing, whose token indices are sorted, so the causal mask over
the original positions is the lower triangle over the gathered ones. Segment
masks (document masking), validity masks (capacity warm-up, token-choice,
causal inference routing) and decode caches keep a dense boolean mask and go
through XLA's implementation (cuDNN would turn a dense mask into a dense bias).

GQA: kv head k serves query heads k*G .. k*G+G-1, as in layers.py. Scores and
softmax are computed in float32 for bf16 inputs in both implementations.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

IMPLS = ("auto", "custom", "dot_product")


def resolve(attention_impl: str, backend: str | None = None) -> str:
  """'custom' or 'dot_product' for the configured `attention_impl` on `backend` (default: JAX's default backend)."""
  if attention_impl not in IMPLS:
    raise ValueError(f"config.model.attention_impl: unknown implementation {attention_impl!r}; choose one of {IMPLS}.")
  if attention_impl != "auto":
    return attention_impl
  return "custom" if (backend or jax.default_backend()) == "cpu" else "dot_product"


def use_fused(attention_impl: str, cache=None) -> bool:
  """True when the layer should call `attention` below (decode caches keep the custom path)."""
  return cache is None and resolve(attention_impl) == "dot_product"


@functools.lru_cache(maxsize=None)
def _gpu_compute_capability() -> float:
  try:
    dev = jax.devices()[0]
    return float(getattr(dev, "compute_capability", "0") or 0)
  except Exception:  # pylint: disable=broad-except
    return 0.0


def implementation(dtype, head_dim: int, causal_only: bool, backend: str | None = None) -> str:
  """'cudnn' where cuDNN's fused kernel applies, else 'xla' (MOR_JAX_FUSED_ATTENTION=xla forces XLA's)."""
  if os.environ.get("MOR_JAX_FUSED_ATTENTION", "") == "xla":
    return "xla"
  backend = backend or jax.default_backend()
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


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS=None, *, impl: str | None = None):
  """Softmax attention with GQA; `mask_BTS` None = causal in local order (see module doc). Returns [B, T, H, E]."""
  T, S = q_BTHE.shape[1], k_BSKE.shape[1]
  causal_only = mask_BTS is None
  if causal_only and T != S:
    raise ValueError(f"a local causal mask needs as many keys as queries, got T={T}, S={S}")
  impl = impl or implementation(q_BTHE.dtype, q_BTHE.shape[-1], causal_only)
  if causal_only:
    return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, is_causal=True, implementation=impl)
  mask = jnp.broadcast_to(mask_BTS, (q_BTHE.shape[0], T, S))[:, None]   # B 1 T S: the same for every head
  return jax.nn.dot_product_attention(q_BTHE, k_BSKE, v_BSKE, mask=mask, implementation=impl)
