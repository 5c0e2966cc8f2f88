"""Model core: parity with the PyTorch reference, counts, causality, equivalent programs (routing modes:
test_model_routing.py; config errors: test_config.py; kernels and policy: test_kernels.py)."""

import collections
import dataclasses
import functools
import importlib
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax import config as C
from mor_jax.config import defaults as get_config
from mor_jax.kernels import policy as policy_lib
from mor_jax.kernels.policy import ExecPolicy
from mor_jax.model.recursion import stack_unrolled_params
from mor_jax.model.transformer import MoRLM, init_variables
from mor_jax.tools import parity
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compilation")


REFDATA = os.path.join(os.path.dirname(__file__), "refdata")   # the repository's copy of the reference fixtures
FIXTURES = ["01_vanilla", "02_recursive_middle_cycle_rec2", "03_recursive_cycle_rec2", "04_recursive_sequence_rec2",
            "05_recursive_middle_sequence_rec3", "06s_mor_expert_middle_cycle_rec2_linear_sharedattn",
            "07s_mor_expert_middle_cycle_rec3_mlp_zloss_sharedattn", "08_mor_token_middle_cycle_rec3_softmax_bal",
            "09s_mor_expert_middle_cycle_rec3_kvshare_sharedattn",
            "10_mor_token_middle_cycle_rec3_softmax_lossfree"]   # a missing one fails its test


def tiny_cfg(strategy="none", R=1, mor=None, **over):
  """tests/tiny.py's model with a 2-layer shared block (4 layers for vanilla), validated."""
  return C.validate(tiny_config(strategy, R, mor, depth=2, num_layers=4 if strategy == "none" else None, **over),
                    num_devices=1)


def tiny(*args, **over):
  """The architecture of `tiny_cfg(...)`."""
  return C.model_config(tiny_cfg(*args, **over))


CPU = policy_lib.resolve(get_config(), "cpu")   # what CPU training runs: custom kernels, 2 batch groups, loss chunks


def cpu(**over) -> ExecPolicy:
  return dataclasses.replace(CPU, **over)


@functools.lru_cache(maxsize=None)
def _jitted_apply(cfg, policy):
  return jax.jit(MoRLM(cfg, policy).apply, static_argnames=("routing_mode",))


def run(cfg, variables, toks, policy=CPU, **kw):
  """Jitted model.apply (eager flax is slow on CPU)."""
  return _jitted_apply(cfg, policy)(variables, toks, **kw)


def tokens(B=2, T=16, V=128, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, V)


# ------------------------------------------------------------------ parity
@pytest.mark.parametrize("fixture", FIXTURES)
def test_reference_parity(fixture):
  ours, expected = parity.compute(os.path.join(REFDATA, fixture))
  rows = dict(parity.compare(ours, expected))
  assert "logits_eval" in rows and "loss_eval" in rows
  assert any(k.startswith("grad:") for k in rows), "gradients were not compared"
  if "expert" in fixture:
    assert any(k.startswith("selected_tokens") for k in rows) and "sampling_loss" in rows
  if "token" in fixture:
    # loss-free balancing: the reference reports balancing_loss 0, which parity rightly does not compare
    assert "token_depth_index_train" in rows and ("balancing_loss" in rows or "lossfree" in fixture)
  bad = {k: d for k, d in rows.items() if d > 1e-4}
  assert not bad, bad


def test_parity_tool_fails_on_wrong_weights(tmp_path):
  """The tool must exit non-zero when the numbers do not match."""
  src = os.path.join(REFDATA, "01_vanilla")
  for f in os.listdir(src):
    data = open(os.path.join(src, f), "rb").read()
    open(tmp_path / f, "wb").write(data)
  w = dict(np.load(tmp_path / "weights.npz"))
  w["model.norm.weight"] = w["model.norm.weight"] * 1.01
  np.savez(tmp_path / "weights.npz", **w)
  assert parity.main([str(tmp_path)]) == 1
  assert parity.main([src]) == 0


def test_untied_attention_is_reported():
  from mor_jax.interop import reference as ref
  cfg = tiny("middle_cycle", 2)
  sd = ref.state_dict_from_params(cfg, jax.tree.map(np.asarray, init_variables(cfg, jax.random.PRNGKey(0))["params"]))
  sd["model.layers.3.self_attn.q_proj.weight"] = sd["model.layers.3.self_attn.q_proj.weight"] + 0.1
  with pytest.raises(ref.ReferenceMappingError, match="untied across recursions"):
    ref.params_from_state_dict(cfg, sd)


# ------------------------------------------------------------ param counts
@pytest.mark.parametrize("name,expected", [
    ("smollm360_rec2", 261_522_240), ("smollm360_rec3", 212_360_640), ("smollm360_rec4", 182_863_680),
    ("smollm360", 409_007_040)])
def test_param_counts_match_reference(name, expected):
  from mor_jax.model.accounting import param_counts
  c = importlib.import_module(f"configs.{name}").get_config(None)
  counts = param_counts(C.model_config(C.validate(c, num_devices=1)))
  assert counts["total"] == expected


def test_param_count_does_not_grow_with_recursions():
  from mor_jax.model.accounting import param_counts
  c = get_config()
  c.model.update(vocab_size=128, hidden_size=32, intermediate_size=64, num_heads=4, num_kv_heads=2, num_layers=14)
  c.data.seq_len = 16
  c.recursion.strategy = "middle_cycle"
  counts = {}
  for R in (2, 3, 4, 6):
    c.recursion.num_recursions = R
    counts[R] = param_counts(C.model_config(C.validate(c, num_devices=1)))
  per_layer = counts[2]["shared_block"] // 6
  for R in (3, 4, 6):
    assert counts[R]["shared_block"] == per_layer * (12 // R)
    assert counts[R]["unique_layers"] == counts[2]["unique_layers"]


def test_flops_sanity_close_to_6n():
  from mor_jax.model.accounting import flops_per_token, param_counts
  cfg = C.model_config(C.validate(importlib.import_module("configs.smollm360").get_config(None), num_devices=1))
  n = param_counts(cfg)["total"] - cfg.vocab_size * cfg.hidden_size  # the lookup is free
  f = flops_per_token(cfg, 1024)["train"]
  assert 1.0 < f / (6 * n) < 1.3
  mor = tiny("middle_cycle", 2, "expert")
  rec = tiny("middle_cycle", 2)
  assert flops_per_token(mor, 16)["shared_block"] < 0.8 * flops_per_token(rec, 16)["shared_block"]


# --------------------------------------------------------------- causality
def _grad_wrt_future(cfg, mode, t=5):
  model = MoRLM(cfg, CPU)
  v = init_variables(cfg, jax.random.PRNGKey(0))
  toks = tokens()
  emb = v["params"]["embed"]["embedding"][toks]

  def loss_at_t(e):
    logits, _ = model.apply(v, toks, inputs_embeds=e, routing_mode=mode)
    return jax.nn.log_softmax(logits[:, t])[jnp.arange(2), toks[:, t + 1]].sum()

  g = jax.jit(jax.grad(loss_at_t))(emb)
  return np.asarray(jnp.abs(g[:, t + 1:]).max()), np.asarray(jnp.abs(g[:, :t + 1]).max())


@pytest.mark.parametrize("kind", [("none", 1, None), ("middle_cycle", 2, None), ("sequence", 2, None),
                                  ("middle_cycle", 3, "token"), ("middle_cycle", 3, "expert")])
def test_causal_by_gradient(kind):
  strategy, R, mor = kind
  cfg = tiny(strategy, R, mor)
  fut, past = _grad_wrt_future(cfg, "causal" if mor == "expert" else "topk")
  assert fut == 0.0
  assert past > 0.0


def test_expert_topk_mode_depends_on_future():
  """Documented training behaviour: top-k over the sequence lets future tokens change earlier outputs.

  The dependence goes through the discrete selection (no gradient), so it is
  shown by perturbing the future; causal mode is unaffected by the same change.
  """
  cfg = tiny("middle_cycle", 3, "expert")
  v = init_variables(cfg, jax.random.PRNGKey(0))
  toks = tokens()
  emb = v["params"]["embed"]["embedding"][toks]
  t = 7
  noise = 3.0 * jax.random.normal(jax.random.PRNGKey(9), emb.shape).at[:, :t + 1].set(0.0)
  changed = {}
  for mode in ("topk", "causal"):
    a, _ = run(cfg, v, toks, inputs_embeds=emb, routing_mode=mode)
    b, _ = run(cfg, v, toks, inputs_embeds=emb + noise, routing_mode=mode)
    changed[mode] = float(jnp.max(jnp.abs(a[:, :t + 1] - b[:, :t + 1])))
  assert changed["topk"] > 1e-4
  assert changed["causal"] == 0.0


def test_expert_causal_kv_sharing_is_causal():
  cfg = tiny("middle_cycle", 3, "expert", kv_sharing__enable=True)
  fut, past = _grad_wrt_future(cfg, "causal")
  assert fut == 0.0 and past > 0.0


# ----------------------------------------------------- equivalent programs
def _loss_and_grads(cfg, params, toks, mode="topk", policy=CPU):
  def f(p):
    logits, aux = MoRLM(cfg, policy).apply({"params": p}, toks, routing_mode=mode)
    return jax.nn.log_softmax(logits).mean() + aux["aux_loss"]
  return jax.jit(jax.value_and_grad(f))(params)


@pytest.mark.parametrize("remat", ["full", "save_attn_out"])
def test_remat_matches_no_remat(remat):
  cfg = tiny("middle_cycle", 2, "expert")
  rem = cpu(remat_policy=remat)
  p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
  l0, g0 = _loss_and_grads(cfg, p, tokens())
  l1, g1 = _loss_and_grads(cfg, p, tokens(), policy=rem)
  # two different programs: the remat one recomputes the layer in the backward pass
  f0 = jax.jit(jax.grad(lambda q: MoRLM(cfg, CPU).apply({"params": q}, tokens())[0].sum())).lower(p).as_text()
  f1 = jax.jit(jax.grad(lambda q: MoRLM(cfg, rem).apply({"params": q}, tokens())[0].sum())).lower(p).as_text()
  assert f0 != f1
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


@pytest.mark.parametrize("kind", [("middle_cycle", 2, None), ("sequence", 2, None), ("middle_cycle", 2, "expert")])
def test_scan_matches_unrolled(kind):
  strategy, R, mor = kind
  scanned = tiny(strategy, R, mor)
  unrolled = tiny(strategy, R, mor, model__scan_layers=False)
  pu = init_variables(unrolled, jax.random.PRNGKey(3))["params"]
  ps = dict(pu)
  ps["block"] = stack_unrolled_params(pu["block"])
  assert jax.tree.structure(ps) == jax.tree.structure(init_variables(scanned, jax.random.PRNGKey(0))["params"])
  l0, g0 = _loss_and_grads(scanned, ps, tokens())
  l1, g1 = _loss_and_grads(unrolled, pu, tokens())
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  g1 = dict(g1)
  g1["block"] = stack_unrolled_params(g1["block"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_batch_groups_change_the_program_not_the_params_or_numbers():
  toks = tokens(B=4)
  # 'sequence' repeats a layer (kv stacked per repeat); expert-choice with KV sharing passes shared kv in
  for args, over, groups in ((("middle_cycle", 2, "expert"), {"kv_sharing__enable": True}, 2),
                             (("sequence", 2, None), {}, 4)):
    cfg = tiny(*args, **over)
    one, split = cpu(batch_groups=1), cpu(batch_groups=groups)
    p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
    def forward(pol, cfg=cfg):
      return lambda q, t: MoRLM(cfg, pol).apply({"params": q}, t)[0]
    dots = lambda pol, p=p: jax.jit(forward(pol)).lower(p, toks).as_text().count("dot_general")
    assert dots(split) > dots(one)   # each layer's matmuls run once per group
    logits = lambda pol, t, p=p: jax.jit(forward(pol))(p, t)
    np.testing.assert_allclose(logits(split, toks), logits(one, toks), atol=1e-5)   # row by row, in order
    l0, g0 = _loss_and_grads(cfg, p, toks, policy=one)
    l1, g1 = _loss_and_grads(cfg, p, toks, policy=split)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
  # a batch the groups do not divide runs as gcd(batch, groups) groups: 6 rows, 4 groups -> 2 groups of 3
  np.testing.assert_allclose(logits(split, tokens(B=6)), logits(one, tokens(B=6)), atol=1e-5)
  # auto: two groups on CPU, one on accelerators; a negative value is refused by name
  assert policy_lib.resolve_batch_groups(0, "cpu") == 2 and policy_lib.resolve_batch_groups(0, "gpu") == 1
  assert policy_lib.resolve_batch_groups(3, "gpu") == 3
  with pytest.raises(C.ConfigError, match="execution.batch_groups"):
    tiny(execution__batch_groups=-1)


def test_loss_chunks_change_the_program_not_the_numbers():
  """MoRLM.loss_terms over token chunks = cross entropy of the full logits: sums, counts, gradients."""
  from mor_jax.model.losses import chunk_count, cross_entropy
  cfg = tiny("middle_cycle", 2, "expert")
  whole, chunked = cpu(loss_chunk_tokens=10 ** 6), cpu(loss_chunk_tokens=8)
  p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
  toks = tokens(B=4, T=17)
  inputs, targets = toks[:, :-1], toks[:, 1:]
  mask = jnp.arange(16)[None, :] < jnp.array([[16], [9], [0], [12]])   # padded targets are not counted

  def objective(pol):
    def f(q):
      nll, count, aux = MoRLM(cfg, pol).apply({"params": q}, inputs, targets, mask, method=MoRLM.loss_terms)
      return nll / count + aux["aux_loss"], (nll, count)
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (_, (nll0, n0)), g0 = objective(whole)(p)
  (_, (nll1, n1)), g1 = objective(chunked)(p)
  logits, _ = jax.jit(lambda q: MoRLM(cfg, whole).apply({"params": q}, inputs))(p)
  nll_ref, n_ref = cross_entropy(logits, targets, mask)
  assert float(n0) == float(n1) == float(n_ref) == 37.0
  np.testing.assert_allclose(nll0, nll_ref, rtol=1e-6)
  np.testing.assert_allclose(nll1, nll_ref, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
  # 64 tokens in chunks of 8: the head runs 8 times in the program
  heads = lambda pol: jax.jit(lambda q: MoRLM(cfg, pol).apply({"params": q}, inputs, targets, mask,
                                                         method=MoRLM.loss_terms)[0]).lower(p).as_text()
  assert heads(chunked).count("x128xf32>") > heads(whole).count("x128xf32>")
  # equal chunks: the largest divisor of the token count not above tokens / chunk
  assert [chunk_count(64, 8), chunk_count(50, 20), chunk_count(21, 5), chunk_count(10, 0), chunk_count(10, 20)] \
      == [8, 2, 3, 1, 1]
  assert policy_lib.resolve_loss_chunk_tokens(0, "cpu") == 512 and policy_lib.resolve_loss_chunk_tokens(0, "gpu") == 0
  assert policy_lib.resolve_loss_chunk_tokens(7, "gpu") == 7
  with pytest.raises(C.ConfigError, match="execution.loss_chunk_tokens"):
    tiny(execution__loss_chunk_tokens=-1)


def _all_eqns(jaxpr):
  """Every equation of a jaxpr, including those of nested jaxprs (scan, custom_vjp, pjit bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


def test_layer_scan_keeps_weights_out_of_its_stacked_residuals():
  """The fused projections' residuals are the layer's own kernels (forwarded by the scan), not concatenated copies."""
  cfg = tiny("middle_cycle", 2, "expert")
  p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
  f = lambda q: MoRLM(cfg, CPU).apply({"params": q}, tokens(), tokens(), method=MoRLM.loss_terms)[0]
  jaxpr = jax.make_jaxpr(lambda q: jax.vjp(f, q))(p).jaxpr
  shapes = {tuple(v.aval.shape) for eqn in _all_eqns(jaxpr) if eqn.primitive.name == "scan" for v in eqn.outvars}
  depth, D = 2, cfg.hidden_size
  assert (depth, D, 2 * cfg.intermediate_size) not in shapes
  assert (depth, D, D + 2 * cfg.num_kv_heads * cfg.head_dim) not in shapes
  # the check does see the stacked residuals: the SwiGLU input [depth, rows, tokens, 2F] is one
  assert any(sh[0] == depth and sh[-1] == 2 * cfg.intermediate_size and len(sh) == 4 for sh in shapes)


@pytest.mark.parametrize("kind", [("none", 1, None), ("middle_cycle", 2, "expert"), ("middle_cycle", 3, "token")])
def test_gradient_program_has_no_zero_padded_slices(kind):
  """Arrays are cut with jnp.split (q/k/v, RoPE halves, batch groups), whose gradient is a concatenate.

  Slices' gradients are zero-padded arrays that are then summed; XLA:CPU fused
  those into one loop that evaluated every padded branch for every element
  (the q/k/v + RoPE gradient assembly was ~40 ms of thread time per step).
  """
  cfg = tiny(*kind)
  assert CPU.batch_groups > 1   # the batch-group split is exercised too
  p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
  f = lambda q: MoRLM(cfg, CPU).apply({"params": q}, tokens(), tokens(), method=MoRLM.loss_terms)[0]
  seen = collections.Counter(eqn.primitive.name for eqn in _all_eqns(jax.make_jaxpr(jax.grad(f))(p).jaxpr))
  assert seen["split"] > 0 and seen["pad"] == 0, dict(seen)


def test_rope_matches_rotate_half():
  """apply_rope (written per half) equals x * cos + rotate_half(x) * sin, values and gradients."""
  from mor_jax.model.layers import apply_rope, rope_angles
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 8))
  cos, sin = rope_angles(jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 50), 8, 10000.0)
  def textbook(x):
    rot = jnp.concatenate([-x[..., 4:], x[..., :4]], axis=-1)
    return x * cos[:, :, None] + rot * sin[:, :, None]
  w = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  np.testing.assert_allclose(apply_rope(x, cos, sin), textbook(x), atol=1e-6)
  g1 = jax.grad(lambda x: jnp.sum(apply_rope(x, cos, sin) * w))(x)
  g2 = jax.grad(lambda x: jnp.sum(textbook(x) * w))(x)
  np.testing.assert_allclose(g1, g2, atol=1e-6)


def test_scan_unroll_changes_the_program_not_the_params_or_numbers():
  cfg = tiny("middle_cycle", 2, "expert")
  loop, full = cpu(scan_unroll=1), cpu(scan_unroll=8)
  p = init_variables(cfg, jax.random.PRNGKey(0))["params"]
  hlo = lambda pol: jax.jit(lambda q: MoRLM(cfg, pol).apply({"params": q}, tokens())[0]).lower(p).as_text()
  assert hlo(loop).count("stablehlo.while") > hlo(full).count("stablehlo.while")   # the layer loop is gone
  l0, g0 = _loss_and_grads(cfg, p, tokens(), policy=loop)
  l1, g1 = _loss_and_grads(cfg, p, tokens(), policy=full)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)
  # auto: a loop on CPU (fast to compile and run there), unrolled on accelerators
  assert policy_lib.resolve_scan_unroll(0, "cpu") == 1 and policy_lib.resolve_scan_unroll(0, "gpu") > 100
  assert policy_lib.resolve_scan_unroll(3, "gpu") == 3
  with pytest.raises(C.ConfigError, match="execution.scan_unroll"):
    tiny(execution__scan_unroll=-1)


def test_bf16_compute_close_to_fp32():
  cfg = tiny("middle_cycle", 2, "expert")
  v = init_variables(cfg, jax.random.PRNGKey(0))
  toks = tokens()
  l32, _ = run(cfg, v, toks)
  l16, _ = run(cfg, v, toks, policy=cpu(dtype="bfloat16"))
  assert l16.dtype == jnp.float32  # logits are returned in float32
  assert jax.tree.leaves(jax.tree.map(lambda x: x.dtype, v["params"])) == [jnp.float32] * len(jax.tree.leaves(v))
  assert float(jnp.max(jnp.abs(l32 - l16))) < 0.05
  assert float(jnp.max(jnp.abs(l32 - l16))) > 0  # really computed in bf16
