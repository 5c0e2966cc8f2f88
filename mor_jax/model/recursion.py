"""The shared block: one stack of `base_depth` decoder layers.

The stack is run with `nn.scan` (parameters stacked on a leading layer axis)
or, for comparison and debugging, as an unrolled loop. The block is one
submodule that the LM calls once per recursion, so its parameter count does
not depend on the number of recursions. Rematerialisation wraps each layer
with a named `jax.checkpoint` policy (the execution policy's remat_policy).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mor_jax.config import ModelConfig
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model.layers import PLAIN, DecoderLayer

_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    # GPU: keep the projection / MLP matmul outputs and the attention output, recompute the cheap elementwise rest
    "dots_attn": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("attn_out")),
}


def layer_class(policy: ExecPolicy, scanned: bool):
  """DecoderLayer, wrapped in nn.remat when the execution policy asks for it."""
  if policy.remat_policy == "none":
    return DecoderLayer
  return nn.remat(DecoderLayer, policy=_POLICIES[policy.remat_policy], prevent_cse=not scanned)


class Block(nn.Module):
  """`depth` decoder layers (each applied `repeats` times in a row).

  __call__(x, cos, sin, mask, shared_kv=None, cache=None) -> (x, kv) where
  kv = (k, v) stacked on a leading layer axis; `shared_kv` in the same layout
  makes each layer attend to those keys/values (recursive KV sharing);
  `cache` = (k, v, slot) with k, v stacked per layer is the decode cache
  (see layers.Attention), and kv is then the updated cache.
  """
  cfg: ModelConfig
  depth: int
  repeats: int = 1
  policy: ExecPolicy = PLAIN

  @nn.compact
  def __call__(self, x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv=None, cache=None):
    if cache is not None:  # the write slots are the same for every layer
      cache = (cache[0], cache[1], jnp.broadcast_to(cache[2], (self.depth,) + cache[2].shape))
    cfg, policy = self.cfg, self.policy
    if cfg.scan_layers:
      scanned = nn.scan(layer_class(policy, True), variable_axes={"params": 0}, split_rngs={"params": True},
                        metadata_params={nn.PARTITION_NAME: "layers"},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0), length=self.depth,
                        unroll=min(policy.scan_unroll, self.depth))
      return scanned(cfg, self.repeats, policy, name="layers")(x_BTD, cos_BTE, sin_BTE, mask_BTS, shared_kv, cache)
    cls = layer_class(policy, False)
    kvs = []
    for i in range(self.depth):
      skv = None if shared_kv is None else jax.tree.map(lambda a, i=i: a[i], shared_kv)
      ci = None if cache is None else jax.tree.map(lambda a, i=i: a[i], cache)
      x_BTD, kv = cls(cfg, self.repeats, policy, name=f"layer_{i}")(x_BTD, cos_BTE, sin_BTE, mask_BTS, skv, ci)
      kvs.append(kv)
    return x_BTD, jax.tree.map(lambda *a: jax.numpy.stack(a), *kvs)


def stack_unrolled_params(block_params: dict) -> dict:
  """Converts an unrolled block's params (layer_0, layer_1, ...) to the scanned layout."""
  n = len([k for k in block_params if k.startswith("layer_")])
  layers = [block_params[f"layer_{i}"] for i in range(n)]
  return {"layers": jax.tree.map(lambda *a: jax.numpy.stack(a), *layers)}
