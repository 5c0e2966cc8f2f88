"""Parameter counts and FLOPs per token (info mode, tokens/s -> TFLOP/s and MFU).

Counting convention (model FLOPs, as in MaxText / PaLM's MFU):
- only matmuls count, 2 FLOPs per multiply-add: projections, MLP, routers and
  the unembedding (the embedding lookup is free);
- attention scores and the weighted sum are 4 * S * D per token and layer for
  a context of S keys; causal attention is counted as half of that;
- MoR: the shared block is counted once per token actually routed into each
  recursion (expert-choice: the fraction c_r of tokens at recursion r, whose
  attention spans the k_r selected tokens; token-choice: the balanced
  fractions (R - r) / R unless real fractions are given); routers on their
  candidates;
- training = 3 x forward (backward = 2 x forward); rematerialised recompute
  is not counted.
"""

from __future__ import annotations

import jax
import numpy as np

from mor_jax.config import ModelConfig


def param_counts(cfg: ModelConfig) -> dict:
  """Trainable parameters per group (shapes from jax.eval_shape, nothing allocated)."""
  from mor_jax.model.transformer import abstract_variables
  params = abstract_variables(cfg)["params"]
  groups = {"embedding": 0, "unique_layers": 0, "shared_block": 0, "final_norm": 0, "head": 0, "routers": 0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    top = path[0].key
    n = int(np.prod(leaf.shape))
    if top == "embed":
      groups["embedding"] += n
    elif top in ("first", "last"):
      groups["unique_layers"] += n
    elif top == "block":
      groups["shared_block"] += n
    elif top == "final_norm":
      groups["final_norm"] += n
    elif top == "lm_head":
      groups["head"] += n
    else:
      groups["routers"] += n
  groups["total"] = sum(groups.values())
  return groups


def _layer_matmul_params(cfg: ModelConfig) -> int:
  D, E = cfg.hidden_size, cfg.head_dim
  return D * (cfg.num_heads * E) * 2 + D * (cfg.num_kv_heads * E) * 2 + 3 * D * cfg.intermediate_size


def flops_per_token(cfg: ModelConfig, seq_len: int, fractions=None) -> dict:
  """Forward and training FLOPs per token at sequence length `seq_len`.

  `fractions[r]` overrides the fraction of tokens entering recursion r (e.g.
  measured by causal routing). Returns forward, train, and a breakdown.
  """
  D, T, V = cfg.hidden_size, seq_len, cfg.vocab_size
  dense = 2 * _layer_matmul_params(cfg)

  def layer(ctx):  # one layer, one token, causal context of ctx tokens
    return dense + 4 * ctx * D / 2

  unique = (2 if cfg.has_middle else 0) * layer(T)
  R = cfg.recursions
  if cfg.mor_enable:
    if fractions is None:
      if cfg.mor_type == "expert":
        fractions = [k / T for k in cfg.selected_tokens(T)]
      else:
        fractions = [(R - r) / R for r in range(R)]
    shared = sum(f * cfg.base_depth * layer(f * T) for f in fractions)
    if cfg.kv_sharing:  # the reference's kv-sharing training runs the block on all tokens at every recursion
      shared = R * cfg.base_depth * layer(T)
    rp = 2 * D if cfg.router_type == "linear" else 2 * (D * 2 * D + 2 * D)
    if cfg.mor_type == "expert":
      cand = [1.0] + list(fractions[:-1])
      routers = sum(c * rp for c in cand)
    else:
      routers = rp * R
  else:
    fractions = [1.0] * R
    shared = R * cfg.base_depth * layer(T)
    routers = 0
  head = 2 * D * V
  fwd = unique + shared + routers + head
  return {"forward": float(fwd), "train": float(3 * fwd), "unique_layers": float(unique),
          "shared_block": float(shared), "routers": float(routers), "head": float(head),
          "fractions": [float(f) for f in fractions]}


def summary(config) -> str:
  """Model summary for `--mode=info` (no weights allocated)."""
  from mor_jax import config as C
  cfg = C.model_config(C.validate(config, num_devices=1))
  seq = int(config.data.seq_len)
  counts = param_counts(cfg)
  fl = flops_per_token(cfg, seq)
  lines = [f"model: {config.name}",
           f"  shape: hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} "
           f"(head_dim {cfg.head_dim}), ffn {cfg.intermediate_size}, vocab {cfg.vocab_size}, "
           f"{'tied' if cfg.tie_embeddings else 'untied'} head",
           f"  sharing: {cfg.strategy}, recursions {cfg.recursions}, shared block depth {cfg.base_depth}"
           + (", unique first/last layers" if cfg.has_middle else "")]
  if cfg.mor_enable:
    extra = (f"capacity {tuple(round(c, 4) for c in cfg.selected_fractions)} -> k {cfg.selected_tokens(seq)} of T={seq}"
             if cfg.mor_type == "expert" else f"balancing {cfg.balancing}")
    lines.append(f"  MoR: {cfg.mor_type}-choice, {cfg.router_type} router ({cfg.router_func}, alpha {cfg.alpha}), "
                 f"{extra}"
                 + (", KV sharing" if cfg.kv_sharing else ""))
  lines.append("parameters:")
  for k in ("embedding", "unique_layers", "shared_block", "routers", "final_norm", "head"):
    lines.append(f"  {k:14s} {counts[k]:>15,}")
  lines.append(f"  {'total':14s} {counts['total']:>15,}")
  lines.append(f"FLOPs per token (seq {seq}; matmuls only, causal attention halved, shared block per routed token):")
  lines.append(f"  forward {fl['forward'] / 1e9:10.3f} GFLOP   training (3x) {fl['train'] / 1e9:10.3f} GFLOP")
  lines.append(f"  6N = {6 * counts['total'] / 1e9:.3f} GFLOP for comparison")
  return "\n".join(lines)
