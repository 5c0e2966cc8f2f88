"""Optimizer: schedules, weight-decay mask, accumulation derivation (accumulation numerics: test_train_parallel)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mor_jax import config as C
from mor_jax.config import defaults as get_config
from mor_jax.train import optimizer, state as S
from tiny import tiny_config


def tiny(**train):
  """Expert-choice MoR, a 1-layer block applied twice (cycle), unrolled layers, z-loss on."""
  c = tiny_config("cycle", 2, "expert", model__scan_layers=False, mor__z_loss=True)
  c.train.update(dict(dict(num_steps=10, warmup_steps=2, learning_rate=1e-2), **train))
  return c


@pytest.mark.parametrize("warmup", [0, 7])
def test_cosine_schedule_values(warmup):
  c = get_config()
  c.train.update(num_steps=50, warmup_steps=warmup, schedule="cosine", learning_rate=2e-3, min_lr_ratio=0.1)
  f = optimizer.make_schedule(c)
  peak, floor = 2e-3, 2e-4
  np.testing.assert_allclose(float(f(warmup)), peak, rtol=1e-6)          # end of warm-up: the peak
  if warmup:
    assert float(f(0)) == 0.0
    np.testing.assert_allclose(float(f(warmup // 2)), peak * (warmup // 2) / warmup, rtol=1e-6)
  last = 49                                                              # the last step's update
  expect = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (last - warmup) / (50 - warmup)))
  np.testing.assert_allclose(float(f(last)), expect, rtol=1e-5)
  np.testing.assert_allclose(float(f(50)), floor, rtol=1e-6)             # reaches the floor at num_steps
  assert float(f(last)) > floor


def test_wsd_schedule_values():
  c = get_config()
  c.train.update(num_steps=100, warmup_steps=10, schedule="wsd", learning_rate=1.0, decay_fraction=0.2,
                 min_lr_ratio=0.0)
  f = optimizer.make_schedule(c)
  np.testing.assert_allclose([float(f(s)) for s in (0, 5, 10, 50, 80)], [0, 0.5, 1, 1, 1], atol=1e-7)
  np.testing.assert_allclose(float(f(90)), 0.5, rtol=1e-6)               # linear cool-down over the last 20 steps
  np.testing.assert_allclose(float(f(99)), 1 / 20, rtol=1e-5)            # last step
  assert float(f(100)) == 0.0


def test_decay_mask_and_adamw_decay():
  """Decay on every kernel and embedding of the model, never on norm weights; zero gradients shrink by lr*wd."""
  cfg = C.model_config(C.validate(tiny(), 1))
  c = tiny(weight_decay=0.5, grad_clip=0.0, schedule="constant", warmup_steps=0)
  tx, _ = optimizer.make_optimizer(c)
  mask = optimizer.decay_mask(S.abstract_state(cfg, tx).params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert flat["['embed']['embedding']"] and flat["['lm_head']['kernel']"] and flat["['router_0']['dense']['kernel']"]
  assert flat["['block']['layer_0']['attn']['q_proj']['kernel']"]
  assert not flat["['final_norm']['scale']"] and not flat["['block']['layer_0']['input_norm']['scale']"]
  assert not flat["['block']['layer_0']['post_attn_norm']['scale']"]
  assert sum(flat.values()) == len(flat) - 3      # the shared layer's 2 norms and the final norm are excluded
  params = {"embed": {"embedding": jnp.ones((4, 3))}, "final_norm": {"scale": jnp.ones((3,))},
            "block": {"layers": {"input_norm": {"scale": jnp.ones((2, 3))},
                                 "mlp": {"up_proj": {"kernel": jnp.ones((2, 3, 5))}}}},
            "head": {"bias": jnp.ones((4,))}}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, updates)
  shrunk = 1 - 1e-2 * 0.5
  np.testing.assert_allclose(new["embed"]["embedding"], shrunk, rtol=1e-6)
  np.testing.assert_allclose(new["block"]["layers"]["mlp"]["up_proj"]["kernel"], shrunk, rtol=1e-6)
  for leaf in (new["final_norm"]["scale"], new["block"]["layers"]["input_norm"]["scale"], new["head"]["bias"]):
    np.testing.assert_array_equal(leaf, 1.0)


def test_grad_accum_derivation():
  c = get_config()
  c.train.update(total_batch_size=1024, per_device_batch_size=2)
  assert C.validate(c, num_devices=4).train.grad_accum_steps == 128
  c.train.total_batch_size = 1020
  with pytest.raises(C.ConfigError, match="train.total_batch_size"):
    C.validate(c, num_devices=4)
  c.train.update(total_batch_size=1024, per_device_batch_size=0)     # automatic: the trainer derives both
  assert C.validate(c, num_devices=4).train.grad_accum_steps == -1
  c.train.total_batch_size = 1022
  with pytest.raises(C.ConfigError, match=r"^config.train.total_batch_size: 1022 is not divisible by the 4 devices"):
    C.validate(c, num_devices=4)
  c.train.update(total_batch_size=1024, grad_accum_steps=8)
  with pytest.raises(C.ConfigError, match=r"^config.train.grad_accum_steps: .* set it to -1"):
    C.validate(c, num_devices=4)


def test_init_variables_equals_the_training_states_initial_params():
  """A notebook's `init_variables(cfg, key)` gives bit for bit the parameters a training run starts from
  (both are compiled programs; an op-by-op init differed from the jitted one in the last bit)."""
  from mor_jax.model.transformer import init_variables
  config = C.validate(tiny(), num_devices=1)
  cfg, (tx, _) = C.model_config(config), optimizer.make_optimizer(config)
  st = jax.jit(lambda: S.init_state(cfg, tx, 3))()
  init_key = jax.random.split(jax.random.PRNGKey(3))[0]
  params = init_variables(cfg, init_key)["params"]
  assert jax.tree.structure(params) == jax.tree.structure(st.params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(st.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("field,value", [
    ("learning_rate", -1e-3), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
    ("beta2", 1.0), ("eps", 0.0), ("weight_decay", -0.1), ("grad_clip", float("nan")), ("min_lr_ratio", 1.5),
    ("warmup_steps", 11), ("num_steps", 0), ("eval_sequences", -2)])
def test_bad_optimizer_values_are_refused_by_name(field, value):
  """A negative / NaN / infinite / out-of-range value fails validation in one line naming the field."""
  with pytest.raises(C.ConfigError, match=f"^config.train.{field}: ") as err:
    C.validate(tiny(**{field: value}), num_devices=1)
  assert "\n" not in str(err.value)


def test_learning_rate_zero_is_allowed():
  assert C.validate(tiny(learning_rate=0.0, schedule="constant"), num_devices=1).train.learning_rate == 0.0
