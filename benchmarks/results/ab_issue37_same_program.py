import hashlib, os, sys
tree = sys.argv[1]
sys.path[:0] = [tree, os.path.join(tree, "benchmarks")]
os.chdir(tree)
import jax, jax.numpy as jnp
import train_step as ts
from mor_jax import config as C
from mor_jax.kernels import policy as policy_lib
from mor_jax.train.optimizer import make_optimizer
from mor_jax.train.state import init_state
from mor_jax.train.step import make_train_step
out = []
for name in ts.VARIANTS:
  strategy, R, mor, cap, _ = ts.VARIANTS[name]
  config = ts.make_config(strategy, R, mor, cap, 8, 256, 0)
  cfg = C.model_config(config)
  tx, schedule = make_optimizer(config)
  state = jax.eval_shape(lambda: init_state(cfg, tx, 0))
  policy = policy_lib.resolve(config, jax.default_backend())
  step = jax.jit(make_train_step(cfg, tx, schedule, policy=policy), donate_argnums=0)
  batch = {"tokens": jax.ShapeDtypeStruct((1, 8, 257), jnp.int32)}
  text = step.lower(state, batch).as_text()
  out.append(f"{name} {hashlib.sha256(text.encode()).hexdigest()[:16]} {len(text)}")
print("\n".join(out))
