"""Sampling: SamplingParams, `sample_logits` (greedy / temperature / top-k / top-p) and the finish reasons.

One place for both decoding paths (the plain `Generator` and the depth-wise batching `Engine`): the parameters
are checked (`options.check_sampling`, which the generate command's flags share) and turned into arrays so that
one compiled program serves every setting.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mor_jax.infer.options import check_sampling

FINISH_REASONS = ("running", "eos", "length", "stop")
RUNNING, EOS, LENGTH, STOP = range(4)   # indices into FINISH_REASONS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 -> greedy (argmax); top_k 0 and top_p 1.0 -> off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    check_sampling(self.temperature, self.top_k, self.top_p)

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sampling_arrays(sp: SamplingParams) -> dict:
  """The sampling parameters as arrays: one compiled program serves every setting."""
  return {"temperature": jnp.float32(sp.temperature), "top_k": jnp.int32(sp.top_k), "top_p": jnp.float32(sp.top_p)}


def sample_logits(keys_B2, logits_BV, sp):
  """One token per row: argmax when temperature is 0, else a draw from softmax(logits / temperature)
  restricted to the top_k tokens (0: all) and to the smallest set of them whose mass reaches top_p.

  `sp` is a SamplingParams or `sampling_arrays(...)` (traced values are fine).
  """
  if isinstance(sp, SamplingParams):
    sp = sampling_arrays(sp)
  temperature, top_k, top_p = sp["temperature"], sp["top_k"], sp["top_p"]
  logits = logits_BV.astype(jnp.float32)
  V = logits.shape[-1]

  def filtered(l):
    srt = jnp.sort(l, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    srt = jnp.where(jnp.arange(V)[None, :] < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the tokens ranked above
    keep = (before < top_p) & (srt > -jnp.inf)           # top-k, then the smallest prefix reaching top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(l < cutoff, -jnp.inf, l)

  def draw(_):
    l = logits / jnp.maximum(temperature, 1e-6)
    l = jax.lax.cond((top_k > 0) | (top_p < 1.0), filtered, lambda x: x, l)
    return jax.vmap(jax.random.categorical)(keys_B2, l).astype(jnp.int32)

  greedy = lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, draw, greedy, None)


def finish_code(tok, count, limit, eos_id):
  """FINISH_REASONS index after a token: EOS (eos_id -1: none), LENGTH once `count` tokens reach `limit`, else
  RUNNING."""
  return jnp.where(tok == eos_id, EOS, jnp.where(count >= limit, LENGTH, RUNNING))
