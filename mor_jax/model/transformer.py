"""The language model: embed -> unique first layer -> recursion stage -> unique last layer -> head.

`MoRLM(cfg)(tokens, positions=None, segment_ids=None, routing=...)` returns
`(logits, aux)`. `aux` is a dict of routing losses and statistics (empty of
losses for non-routed models): `aux["aux_loss"]` is the coefficient-weighted
router loss the training objective adds to the cross entropy.

Variable collections: `params`; `router_bias` (token-choice loss-free
balancing, updated outside the gradient by the train step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from mor_jax.config import ModelConfig
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model import routing
from mor_jax.model.losses import chunked_cross_entropy
from mor_jax.model.layers import PLAIN, RMSNorm, causal_mask, dense, normal_init, rope_angles
from mor_jax.model.recursion import Block, layer_class

ROUTING_MODES = ("topk", "topk_warmup", "causal")


class MoRLM(nn.Module):
  """The language model of architecture `cfg`, run as the execution policy `policy` says (kernels/policy.py)."""
  cfg: ModelConfig
  policy: ExecPolicy = PLAIN

  def setup(self):
    cfg, policy = self.cfg, self.policy
    self.embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=normal_init(cfg.init_std, ("vocab", "embed")),
                          param_dtype=jnp.float32, dtype=policy.compute_dtype)
    if cfg.has_middle:
      self.first = layer_class(policy, False)(cfg, 1, policy)
      self.last = layer_class(policy, False)(cfg, 1, policy)
    repeats = cfg.recursions if cfg.strategy in ("sequence", "middle_sequence") else 1
    self.block = Block(cfg, cfg.base_depth, repeats, policy)
    if cfg.mor_enable:
      if cfg.mor_type == "expert":
        self.routers = [routing.Router(cfg, 1, name=f"router_{r}") for r in range(cfg.recursions)]
      else:
        self.router = routing.Router(cfg, cfg.recursions)
        if cfg.balancing == "loss_free":
          self.router_bias = self.variable("router_bias", "bias", lambda: jnp.zeros((cfg.recursions,), jnp.float32))
    self.final_norm = RMSNorm(cfg.rms_eps)
    if not cfg.tie_embeddings:
      self.lm_head = dense(cfg.vocab_size, cfg, policy, "lm_head", ("embed", "vocab"))

  def _block_fn(self, x, index, pos, seg, valid, shared_kv):
    cos, sin = rope_angles(pos, self.cfg.head_dim, self.cfg.rope_theta)
    mask = causal_mask(index, index, seg, seg, valid)
    return self.block(x, cos, sin, mask, shared_kv)

  def hidden(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, routing_mode: str = "topk",
             step=None, threshold=None, inputs_embeds=None):
    """Final-normed hidden states [B, T, D] and aux (everything but the head).

    `inputs_embeds` [B, T, D] replaces the embedding lookup (used by the
    causality-by-gradient tests).
    """
    cfg = self.cfg
    if routing_mode not in ROUTING_MODES:
      raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {routing_mode!r}")
    B, T = tokens_BT.shape
    index = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    pos = index if positions_BT is None else positions_BT.astype(jnp.int32)
    seg = segment_ids_BT
    x = self.embed(tokens_BT) if inputs_embeds is None else inputs_embeds.astype(self.policy.compute_dtype)
    if step is None:
      step = jnp.int32(0)
    if cfg.has_middle:
      cos, sin = rope_angles(pos, cfg.head_dim, cfg.rope_theta)
      mask = causal_mask(index, index, seg, seg)
      x, _ = self.first(x, cos, sin, mask)
    aux = {"aux_loss": jnp.float32(0.0)}
    if cfg.mor_enable and cfg.mor_type == "expert":
      mode = routing_mode
      if mode == "topk_warmup" and cfg.cap_warmup_steps <= 0:
        mode = "topk"
      rng = self.make_rng("router") if cfg.rand_router else None
      x, aux = routing.expert_choice_stage(cfg, self.routers, self._block_fn, x, index, pos, seg, mode=mode,
                                           step=step, threshold=threshold, rng=rng)
    elif cfg.mor_enable:
      bias = self.router_bias.value if cfg.balancing == "loss_free" else None
      # balancing warm-up (full depth) is a training device; causal inference uses the router's depth
      x, aux = routing.token_choice_stage(cfg, self.router, bias, self._block_fn, x, index, pos, seg,
                                          step=None if routing_mode == "causal" else step)
    else:
      n_calls = 1 if cfg.strategy in ("none", "sequence", "middle_sequence") else cfg.recursions
      for _ in range(n_calls):
        x, _ = self._block_fn(x, index, pos, seg, None, None)
    if cfg.has_middle:
      x, _ = self.last(x, cos, sin, mask)
    return self.final_norm(x), aux

  def logits(self, h_BTD):
    """Head: float32 logits [B, T, V] from final-normed hidden states."""
    if self.cfg.tie_embeddings:
      return self.embed.attend(h_BTD).astype(jnp.float32)
    return self.lm_head(h_BTD).astype(jnp.float32)

  def loss_terms(self, tokens_BT, targets_BT, mask_BT=None, positions_BT=None, segment_ids_BT=None, *,
                 routing_mode: str = "topk", step=None):
    """(sum of target NLL, number of counted targets, aux): the training loss's parts.

    The head and cross entropy run per chunk of `policy.loss_chunk_tokens`
    tokens (losses.chunked_cross_entropy); `mask_BT` selects counted targets.
    """
    h, aux = self.hidden(tokens_BT, positions_BT, segment_ids_BT, routing_mode=routing_mode, step=step)
    nll, count = chunked_cross_entropy(self.logits, h, targets_BT, mask_BT, self.policy.loss_chunk_tokens)
    return nll, count, aux

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, *, routing_mode: str = "topk",
               step=None, threshold=None, inputs_embeds=None):
    h, aux = self.hidden(tokens_BT, positions_BT, segment_ids_BT, routing_mode=routing_mode, step=step,
                         threshold=threshold, inputs_embeds=inputs_embeds)
    return self.logits(h), aux


@functools.partial(jax.jit, static_argnames=("cfg", "seq_len", "batch"))
def init_variables(cfg: ModelConfig, rng, seq_len: int = 8, batch: int = 1):
  """Initial variables (params and, for loss-free balancing, router_bias).

  Jitted: one compiled program instead of the forward pass run op by op (several times faster to build,
  even for test-sized models), and the same values as a training state initialised inside `jax.jit`.
  """
  return nn.meta.unbox(_init_boxed(cfg, rng, seq_len, batch))


def _init_boxed(cfg: ModelConfig, rng, seq_len: int, batch: int):
  """`MoRLM.init` as declared: parameters boxed with their logical axes (nn.LogicallyPartitioned)."""
  tokens = jnp.zeros((batch, seq_len), jnp.int32)
  rngs = {"params": rng, "router": jax.random.fold_in(rng, 1)}
  return MoRLM(cfg).init(rngs, tokens)


def param_axes(cfg: ModelConfig) -> dict:
  """The logical axes of every parameter, as declared where each is created: a tree like `params` whose leaves
  are tuples of axis names (None: not named), e.g. ('layers', 'embed', 'heads') for a scanned q_proj kernel."""
  boxed = jax.eval_shape(lambda: _init_boxed(cfg, jax.random.PRNGKey(0), 8, 1))["params"]
  specs = nn.get_partition_spec(boxed)
  return jax.tree.map(lambda s, a: tuple(s) if len(s) else (None,) * len(a.shape), specs,
                      nn.meta.unbox(boxed), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))


def abstract_variables(cfg: ModelConfig, seq_len: int = 8):
  """Shapes of the variables without allocating them (jax.eval_shape)."""
  return jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0), seq_len))
