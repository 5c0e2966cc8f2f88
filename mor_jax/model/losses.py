"""Next-token cross entropy in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BTV, targets_BT, mask_BT=None):
  """Returns (sum of token NLL, number of counted tokens), both float32.

  `logits[b, t]` predicts `targets[b, t]` (the caller shifts); `mask` selects
  the counted targets (default: all).
  """
  logits = logits_BTV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  nll = lse - tgt
  if mask_BT is None:
    return jnp.sum(nll), jnp.float32(nll.size)
  m = mask_BT.astype(jnp.float32)
  return jnp.sum(nll * m), jnp.sum(m)
