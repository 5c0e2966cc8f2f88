"""Next-token cross entropy in float32.

The gradient is hand-written: autodiff of logsumexp + take_along_axis makes
several passes over the [B, T, V] logits plus a scatter, while
(softmax - onehot) * mask is one elementwise pass; on CPU the vocabulary-wide
passes are a visible share of a training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
  """Returns (sum of token NLL, number of counted tokens), both float32.

  `logits[b, t]` predicts `targets[b, t]` (the caller shifts); `mask` selects
  the counted targets (default: all).
  """
  logits = logits_BTV.astype(jnp.float32)
  if mask_BT is None:
    m = jnp.ones(targets_BT.shape, jnp.float32)
    count = jnp.float32(targets_BT.size)
  else:
    m = mask_BT.astype(jnp.float32)
    count = jnp.sum(m)
  return _masked_nll_sum(logits, targets_BT.astype(jnp.int32), m), count


def chunk_count(num_tokens: int, chunk_tokens: int) -> int:
  """How many equal chunks `chunked_cross_entropy` splits `num_tokens` into (1 = no split)."""
  if chunk_tokens <= 0 or num_tokens <= chunk_tokens:
    return 1
  n = num_tokens // chunk_tokens
  while num_tokens % n:   # equal chunks: the largest divisor of num_tokens not above num_tokens / chunk_tokens
    n -= 1
  return n


def chunked_cross_entropy(logits_fn, h_BTD, targets_BT, mask_BT=None, chunk_tokens: int = 0):
  """`cross_entropy(logits_fn(h), targets, mask)` computed over chunks of about `chunk_tokens` tokens.

  `logits_fn` maps hidden states [..., D] to logits [..., V] (the head). Each
  chunk's logits, softmax and gradient are independent of the others, so a
  multi-core CPU runs the chunks side by side (see
  kernels/policy.resolve_loss_chunk_tokens). Same (sum, count). It saves no memory
  under autodiff: every chunk's logits stay alive as a residual until the
  backward pass.
  """
  B, T, D = h_BTD.shape
  n = chunk_count(B * T, chunk_tokens)
  if n == 1:
    return cross_entropy(logits_fn(h_BTD), targets_BT, mask_BT)
  # jnp.split (not indexing): its gradient is one concatenate instead of n padded adds
  hs = jnp.split(h_BTD.reshape(B * T, D), n)
  targets = jnp.split(targets_BT.reshape(B * T), n)
  masks = [None] * n if mask_BT is None else jnp.split(mask_BT.reshape(B * T), n)
  nll, count = jnp.float32(0.0), jnp.float32(0.0)
  for i in range(n):   # unrolled: independent chunks the runtime can overlap
    nll_i, count_i = cross_entropy(logits_fn(hs[i]), targets[i], masks[i])
    nll, count = nll + nll_i, count + count_i
  return nll, count


@jax.custom_vjp
def _masked_nll_sum(logits_BTV, targets_BT, mask_BT):
  return _nll_fwd(logits_BTV, targets_BT, mask_BT)[0]


def _nll_fwd(logits_BTV, targets_BT, mask_BT):
  lse = jax.nn.logsumexp(logits_BTV, axis=-1)
  tgt = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return jnp.sum((lse - tgt) * mask_BT), (logits_BTV, lse, targets_BT, mask_BT)


def _nll_bwd(res, g):
  # d/dlogits = (softmax - onehot) * mask * g, written as one elementwise pass
  # over the [B, T, V] logits (autodiff's version takes several plus a scatter).
  logits, lse, targets, mask = res
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None]
  scale = (g * mask)[..., None]
  d = (jnp.exp(logits - lse[..., None]) - onehot.astype(logits.dtype)) * scale
  return d, None, None


_masked_nll_sum.defvjp(lambda l, t, m: _nll_fwd(l, t, m), _nll_bwd)
