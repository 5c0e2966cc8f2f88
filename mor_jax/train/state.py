"""The train state: one pytree of arrays (step, params, opt_state, router_bias, rng).

`router_bias` holds the token-choice loss-free balancing bias ({} for every
other model): part of the state and of checkpoints, updated by the train step
after each optimizer step, never by gradients. `rng` is a raw uint32 key
(folded with the step for the random-router ablation), so checkpoints hold
plain arrays.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mor_jax.config import ModelConfig
from mor_jax.model.transformer import init_variables


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: optimizer steps done
  params: Any
  opt_state: Any
  router_bias: Any         # {} or {"bias": float32 [R]}
  rng: jax.Array           # uint32 [2]

  def variables(self) -> dict:
    """The model's variable collections (what `MoRLM.apply` takes)."""
    v = {"params": self.params}
    if self.router_bias:
      v["router_bias"] = self.router_bias
    return v


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """A fresh state (pure: jit it with `out_shardings` to create it already placed)."""
  key = jax.random.PRNGKey(seed)
  init_key, rng = jax.random.split(key)
  variables = init_variables(cfg, init_key)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    router_bias=dict(variables.get("router_bias", {})), rng=rng)


def abstract_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
  """Shapes and dtypes of the state (jax.eval_shape; nothing is allocated)."""
  return jax.eval_shape(lambda: init_state(cfg, tx, seed))


def num_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))
