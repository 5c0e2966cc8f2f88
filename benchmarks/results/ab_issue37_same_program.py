"""Prints, per variant of benchmarks/train_step.py, a hash of the lowered train step of source tree TREE (batch 8 x
seq 256): two trees with the same lines give XLA the same program.  python ab_issue37_same_program.py TREE"""

import hashlib
import os
import sys

TREE = os.path.abspath(sys.argv[1])
sys.path[:0] = [TREE, os.path.join(TREE, "benchmarks")]
os.chdir(TREE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import train_step as ts  # noqa: E402

from mor_jax import config as C  # noqa: E402
from mor_jax.kernels import policy as policy_lib  # noqa: E402
from mor_jax.train.optimizer import make_optimizer  # noqa: E402
from mor_jax.train.state import init_state  # noqa: E402
from mor_jax.train.step import make_train_step  # noqa: E402

for name, (strategy, R, mor, cap, _) in ts.VARIANTS.items():
  config = ts.make_config(strategy, R, mor, cap, 8, 256, 0)
  cfg = C.model_config(config)
  tx, schedule = make_optimizer(config)
  state = jax.eval_shape(lambda: init_state(cfg, tx, 0))  # noqa: B023
  policy = policy_lib.resolve(config, jax.default_backend())
  step = jax.jit(make_train_step(cfg, tx, schedule, policy=policy), donate_argnums=0)
  text = step.lower(state, {"tokens": jax.ShapeDtypeStruct((1, 8, 257), jnp.int32)}).as_text()
  print(f"{name} {hashlib.sha256(text.encode()).hexdigest()[:16]} {len(text)}")
