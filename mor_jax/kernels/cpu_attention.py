"""Softmax attention for XLA:CPU with hand-written backward passes (the policy's `custom` attention).

Computes what model/attention.py's reference computes (scores and softmax in
float32, GQA: kv head k serves query heads k*G..k*G+G-1), in the layouts
XLA:CPU runs fast; see `attention`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


def attention(q_BTHE, k_BSKE, v_BSKE, mask_BTS):
  """Softmax attention (scores and softmax in float32) with GQA: kv head k serves heads k*G..k*G+G-1.

  `mask_BTS` None means causal in the local token order (see
  model/layers.causal_mask); then query blocks skip the key blocks after them, which
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
  K = k_BSKE.shape[2]
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
