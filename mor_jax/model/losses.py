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
