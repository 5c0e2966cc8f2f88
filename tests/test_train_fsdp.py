"""FSDP (mesh data x fsdp, state sharded by logical-axis rules) equals pure data parallelism on 4 devices;
the fused-attention path (jax.nn.dot_product_attention, XLA on CPU) equals the custom one; config errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs.base import get_config
from mor_jax import config as C
from mor_jax.kernels import cpu_attention, policy as policy_lib
from mor_jax.model import fused_attention, layers
from mor_jax.model.transformer import MoRLM, init_variables, param_axes
from mor_jax.train import optimizer, parallel, state as S, step as St
from mor_jax.train.synthetic import SyntheticIterator

pytestmark = pytest.mark.usefixtures("fast_compilation")
ROWS, SEQ, VOCAB = 8, 16, 128


def tiny(**model):
  c = get_config()
  c.model.update(dict(dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                           num_kv_heads=2, max_seq_len=64, scan_layers=True), **model))
  c.recursion.update(strategy="cycle", num_recursions=2)
  c.mor.update(enable=True, type="expert", z_loss=True)
  c.data.seq_len = SEQ
  c.train.update(num_steps=10, warmup_steps=1, learning_rate=1e-2, total_batch_size=ROWS, per_device_batch_size=1)
  return c


@functools.lru_cache(maxsize=None)
def initial():
  """The initial state on the host (created once; each run places it with its own shardings)."""
  c = C.validate(tiny(), 4)
  cfg = C.model_config(c)
  tx = optimizer.make_optimizer(c)[0]
  return jax.device_get(parallel.DataParallel("pjit", jax.devices()[:4]).create_state(lambda: S.init_state(cfg, tx, 0)))


@functools.lru_cache(maxsize=None)
def run(data, fsdp, steps=2):
  c = C.validate(tiny(), 4)
  cfg = C.model_config(c)
  dp = parallel.DataParallel("pjit", jax.devices()[:4], data=data, fsdp=fsdp, param_axes=param_axes(cfg))
  tx, sch = optimizer.make_optimizer(c)
  abstract = S.abstract_state(cfg, tx, 0)
  st = dp.place_state(initial())
  shardings = jax.tree.map(lambda x: x.sharding, st)
  fn = dp.ahead_of_time(dp.compile_train_step(St.make_train_step(cfg, tx, sch), dp.state_shardings(abstract)))
  data_it = SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=7)
  metrics = []
  for i in range(steps):
    st, m = fn(st, dp.shard_train_batch(next(data_it), c.train.grad_accum_steps), St.routing_mode_for_step(cfg, i))
    metrics.append(dp.fetch(m))
  out_shardings = jax.tree.map(lambda x: x.sharding, st)
  return dict(dp=dp, metrics=metrics, final=jax.device_get(st), shardings=shardings, out_shardings=out_shardings,
              memory=dp.state_memory(abstract))


def test_fsdp_equals_data_parallelism():
  ref = run(4, 1)
  assert ref["dp"].fsdp_size == 1 and all(s.is_fully_replicated for s in jax.tree.leaves(ref["shardings"]))
  for data, fsdp in ((2, -1),):
    r = run(data, fsdp)
    assert r["dp"].fsdp_size == 2
    np.testing.assert_allclose([float(m["loss"]) for m in r["metrics"]], [float(m["loss"]) for m in ref["metrics"]],
                               rtol=1e-6, err_msg=f"data={data} fsdp={fsdp}")
    np.testing.assert_allclose(r["metrics"][-1]["grad_norm"], ref["metrics"][-1]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(r["final"]), jax.tree.leaves(ref["final"])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # parameters and Adam moments sharded on their embed axis, the step keeps that placement
    q = r["shardings"].params["block"]["layers"]["attn"]["q_proj"]["kernel"]     # [layers, embed, heads]
    assert q.spec == P(None, "fsdp", None) and q.shard_shape((1, 32, 32)) == (1, 32 // r["dp"].fsdp_size, 32)
    assert r["shardings"].params["block"]["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, None, "fsdp")
    assert r["shardings"].params["embed"]["embedding"].spec == P(None, "fsdp")
    assert r["shardings"].params["lm_head"]["kernel"].spec == P("fsdp", None)
    assert r["shardings"].params["final_norm"]["scale"].spec == P(None)          # tiny vectors stay replicated
    mu = [s for p, s in jax.tree_util.tree_flatten_with_path(r["shardings"].opt_state)[0]
          if "q_proj" in jax.tree_util.keystr(p) and ".mu" in jax.tree_util.keystr(p)]
    assert len(mu) == 1 and mu[0].spec == q.spec                        # Adam's moments sharded like the weights
    assert jax.tree.leaves(r["out_shardings"]) == jax.tree.leaves(r["shardings"])
    # per-device memory: about 1/fsdp of the parameters and optimizer state
    n = r["dp"].fsdp_size
    assert r["memory"]["params"] < ref["memory"]["params"] / n * 1.1
    assert r["memory"]["opt_state"] < ref["memory"]["opt_state"] / n * 1.1


def test_logical_axes_are_declared_by_the_model():
  """The axes FSDP shards by come from the model's own declarations (nn.with_logical_partitioning), and reach
  parameters and optimizer moments alike; leaves without declared axes are replicated."""
  cfg = C.model_config(C.validate(tiny(), 4))
  table = parallel.axes_table(param_axes(cfg))
  assert table[("lm_head", "kernel")] == ("embed", "vocab")
  assert table[("embed", "embedding")] == ("vocab", "embed")
  assert table[("block", "layers", "mlp", "up_proj", "kernel")] == ("layers", "embed", "mlp")
  assert table[("block", "layers", "attn", "o_proj", "kernel")] == ("layers", "heads", "embed")
  assert table[("router_0", "dense", "kernel")] == ("embed", "router")
  K, A = jax.tree_util.DictKey, jax.tree_util.GetAttrKey
  mu_path = (A("opt_state"), jax.tree_util.SequenceKey(1), A("mu"), K("lm_head"), K("kernel"))
  assert parallel.leaf_axes(mu_path, (32, VOCAB), table) == ("embed", "vocab")
  assert parallel.leaf_axes((A("router_bias"),), (2,), table) == (None,)
  assert parallel.leaf_axes((A("step"),), (), table) == ()
  with pytest.raises(ValueError, match="param_axes"):
    parallel.DataParallel("pjit", jax.devices()[:4], fsdp=2)


def model_config(kind, impl, dtype="float32"):
  c = tiny(attention_impl=impl, dtype=dtype)
  if kind == "token":
    c.mor.update(type="token", router_func="softmax", alpha=1.0, balancing="loss")
  if kind == "warmup":
    c.mor.cap_warmup_steps = 4
  return C.model_config(C.validate(c, 1))


@functools.lru_cache(maxsize=None)
def params_for(kind):
  """The same initial parameters for both implementations (attention_impl does not change the tree)."""
  return jax.jit(lambda: init_variables(model_config(kind, "custom"), jax.random.PRNGKey(0))["params"])()


def forward(kind, impl, dtype="float32"):
  """Logits of one batch (MoR routing, forward only) with attention_impl `impl`."""
  cfg = model_config(kind, impl, dtype)
  policy = policy_lib.resolve(C.validate(tiny(attention_impl=impl, dtype=dtype), 1), "cpu")
  params = params_for(kind)
  tokens = SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=2, seed=1).make_batch(0)["tokens"][:, :-1]
  mode = "topk_warmup" if kind == "warmup" else "topk"
  forward = lambda p: MoRLM(cfg, policy).apply({"params": p}, tokens, routing_mode=mode, step=jnp.int32(1))[0]
  return jax.jit(forward)(params)


@pytest.mark.parametrize("kind", ["expert", "token", "warmup"])
def test_dot_product_attention_path_equals_custom(kind):
  """Expert-choice's gathered (sorted, so plain causal) subsets; token-choice and capacity warm-up: dense masks."""
  np.testing.assert_allclose(forward(kind, "dot_product"), forward(kind, "custom"), rtol=1e-5, atol=1e-5)


def test_fused_attention_values_and_gradients():
  B, T, H, K, E = 2, 8, 4, 2, 8
  kq, kk, kv, km = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(kq, (B, T, H, E)), jax.random.normal(kk, (B, T, K, E)),
             jax.random.normal(kv, (B, T, K, E)))
  index = jnp.broadcast_to(jnp.arange(T), (B, T))
  assert layers.causal_mask(index, index) is None                   # plain causal: no dense mask at all
  valid = jax.random.bernoulli(km, 0.7, (B, T)).at[:, 0].set(True)  # every query sees at least one key
  for mask in (None, layers.causal_mask(index, index + 0, k_valid_BS=valid)):
    dense = fused_attention.local_causal_mask(T, T) if mask is None else mask

    def loss(fn, q, k, v, mask=mask, dense=dense):
      return jnp.sum(jnp.sin(fn(q, k, v, mask if fn is fused_attention.attention else dense)))
    want = jax.jit(jax.value_and_grad(functools.partial(loss, cpu_attention.attention), (0, 1, 2)))(q, k, v)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, fused_attention.attention), (0, 1, 2)))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_backend_choices_and_bf16_on_cpu():
  assert policy_lib.resolve(get_config(), "cpu").attention == "custom"
  assert policy_lib.resolve(get_config(), "gpu").attention == "cudnn"
  assert fused_attention.implementation(jnp.bfloat16, 64, True, backend="cpu") == "xla"
  assert fused_attention.implementation(jnp.float32, 64, True, backend="gpu") == "xla"      # cuDNN: bf16/fp16 only
  assert fused_attention.implementation(jnp.bfloat16, 64, False, backend="gpu") == "xla"    # dense masks: XLA
  logits = forward("expert", "dot_product", "bfloat16")                                   # the GPU code path, on CPU
  assert np.all(np.isfinite(np.asarray(logits, np.float32)))


def test_config_errors_name_the_field():
  for update, field in ((dict(fsdp=3), "parallel.fsdp"), (dict(data=3, fsdp=-1), "parallel.data"),
                        (dict(data=-1, fsdp=-1), "parallel.fsdp"), (dict(mode="pmap", fsdp=2), "parallel.fsdp"),
                        (dict(prefetch=-1), "parallel.prefetch")):
    c = tiny()
    c.parallel.update(update)
    with pytest.raises(C.ConfigError, match=field.replace(".", r"\.")):
      C.validate(c, 4)
  c = tiny(attention_impl="flash")
  with pytest.raises(C.ConfigError, match=r"execution\.attention_impl"):   # model.attention_impl: its old name
    C.validate(c, 4)
  c = tiny()
  c.distributed.update(num_processes=2, process_id=2)
  with pytest.raises(C.ConfigError, match=r"distributed\.process_id"):
    C.validate(c, 4)
  assert C.resolve_mesh_shape(8, -1, 2) == (4, 2) and C.resolve_mesh_shape(8, 2, -1) == (2, 4)


def test_an_fsdp_config_is_validated_once(tmp_path, caplog):
  """The trainer validates before building the mesh, and FSDP's axes use that validated config: each warning of
  validation (here: an unknown field) is logged once."""
  import logging  # noqa: PLC0415
  from mor_jax.train import Trainer  # noqa: PLC0415
  c = tiny()
  c.parallel.update(mode="pjit", fsdp=2)
  c.train.not_a_field = 1
  with caplog.at_level(logging.WARNING):
    Trainer(c, str(tmp_path))
  assert caplog.text.count("config.train.not_a_field is not a mor-jax field") == 1
