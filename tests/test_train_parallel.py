"""pjit and pmap on 4 simulated devices give the same losses and parameters as 1 device."""

import functools

import jax
import numpy as np
import pytest

from configs.base import get_config
from mor_jax import config as C
from mor_jax.train import optimizer, parallel, state as S, step as St
from mor_jax.train.synthetic import SyntheticIterator

ROWS, SEQ, VOCAB = 8, 16, 128


def tiny(kind):
  c = get_config()
  c.model.update(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=1 if kind == "vanilla" else 2,
                 num_heads=4, num_kv_heads=2, max_seq_len=64, scan_layers=False)
  c.data.seq_len = SEQ
  c.train.update(num_steps=10, warmup_steps=1, learning_rate=1e-2, total_batch_size=ROWS, per_device_batch_size=1)
  if kind != "vanilla":
    c.recursion.update(strategy="cycle", num_recursions=2)
  if kind == "mor":   # expert-choice (the capacity warm-up's second compiled step is tested in test_train_loop)
    c.mor.update(enable=True, type="expert", z_loss=True)
  if kind == "token":
    c.mor.update(enable=True, type="token", router_func="softmax", alpha=1.0, balancing="loss_free",
                 bal_update_rate=1e-2)
  return c


@functools.lru_cache(maxsize=None)
def initial(kind):
  """The initial state, created already placed (replicated) on a 4-device mesh; host copy and its sharding."""
  c = C.validate(tiny(kind), 4)
  cfg = C.model_config(c)
  tx = optimizer.make_optimizer(c)[0]
  st = parallel.DataParallel("pjit", jax.devices()).create_state(lambda: S.init_state(cfg, tx, 0))
  return jax.device_get(st), jax.tree.leaves(st.params)[0].sharding


def batches():
  data = SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=7)
  for batch in data:
    batch["segment_ids"][3, 10:] = 0        # padding in one row: the loss must count tokens over the global batch
    yield batch


@functools.lru_cache(maxsize=None)
def run(kind, mode, n_devices, per_device=1, steps=2):
  """`steps` train steps from the same initial state on the same batches; returns what the tests compare."""
  dp = parallel.DataParallel(mode, jax.devices()[:n_devices])
  c = tiny(kind)
  c.train.per_device_batch_size = per_device
  c = C.validate(c, dp.num_devices)
  cfg = C.model_config(c)
  tx, sch = optimizer.make_optimizer(c)
  st = dp.place_state(initial(kind)[0])
  fn = dp.compile_train_step(St.make_train_step(cfg, tx, sch))
  data = batches()
  metrics = []
  for i in range(steps):
    st, m = fn(st, dp.shard_train_batch(next(data), c.train.grad_accum_steps), St.routing_mode_for_step(cfg, i))
    metrics.append(dp.fetch(m))
  return dict(dp=dp, fn=fn, init=initial(kind)[0], final=jax.device_get(dp.unreplicate(st)), metrics=metrics,
              accum=c.train.grad_accum_steps)


def max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("kind", ["vanilla", "recursive", "mor"])
def test_pjit_and_pmap_on_4_devices_equal_1_device(kind):
  steps = 2
  sharding = initial(kind)[1]       # the state was created already placed (replicated over the 4-device mesh)
  assert sharding.mesh.size == 4 and sharding.is_fully_replicated
  one, p4, pm = run(kind, "pjit", 1), run(kind, "pjit", 4), run(kind, "pmap", 4)
  assert (one["accum"], p4["accum"], pm["accum"]) == (8, 2, 2)
  assert max_diff(one["final"].params, one["init"].params) > 1e-3     # the steps really moved the parameters
  ref_losses = [float(m["loss"]) for m in one["metrics"]]
  for name, r in (("pjit", p4), ("pmap", pm)):
    np.testing.assert_allclose([float(m["loss"]) for m in r["metrics"]], ref_losses, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(r["metrics"][-1]["grad_norm"], one["metrics"][-1]["grad_norm"], rtol=1e-5)
    assert int(r["final"].step) == steps
    assert max_diff(r["final"].params, one["final"].params) < 1e-5, name
    assert max_diff(r["final"].opt_state, one["final"].opt_state) < 1e-5, name
    if kind == "mor":
      for k in ("sampling_loss", "sampling_acc", "z_loss", "tokens_per_recursion"):
        np.testing.assert_allclose(r["metrics"][-1][k], one["metrics"][-1][k], rtol=1e-5, atol=1e-7, err_msg=k)
  for r in (one, p4, pm):
    assert r["dp"].trace_counts["train_step"] == 1
  assert one["fn"]._cache_size() == 1 and p4["fn"]._cache_size() == 1


def test_grad_accumulation_equals_one_large_batch():
  """8 rows as 8 accumulated micro-batches of 1 vs one batch of 8 (1 device): same metrics and parameters."""
  acc, big = run("mor", "pjit", 1), run("mor", "pjit", 1, 8)
  assert (acc["accum"], big["accum"]) == (8, 1)
  for k in ("loss", "total_loss", "grad_norm", "sampling_loss", "z_loss", "aux_loss", "target_tokens"):
    np.testing.assert_allclose([m[k] for m in acc["metrics"]], [m[k] for m in big["metrics"]], rtol=2e-6,
                               err_msg=k)
  assert acc["metrics"][0]["target_tokens"] == ROWS * SEQ - 7     # the padded targets are not counted
  assert acc["metrics"][0]["aux_loss"] > 0 and acc["metrics"][0]["z_loss"] > 0
  assert max_diff(acc["final"].params, big["final"].params) < 1e-6
  assert max_diff(acc["final"].params, acc["init"].params) > 1e-3


def test_loss_free_bias_update_follows_the_load():
  """Token-choice loss-free balancing: bias += u * sign(mean(load) - load) after the step."""
  r = run("token", "pjit", 1, 1, 1)
  load = np.asarray(r["metrics"][0]["balancing_ratio"])
  want = 1e-2 * np.sign(load.mean() - load)
  assert np.any(want != 0)
  np.testing.assert_allclose(r["init"].router_bias["bias"], 0.0)
  np.testing.assert_allclose(r["final"].router_bias["bias"], want, atol=1e-7)
