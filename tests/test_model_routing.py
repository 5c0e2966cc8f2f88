"""One routing core: training's causal routing (MoRLM.apply), the cached decoder (forward_cached) and the
depth-wise batching engine's tick give every token the same depth, for expert-choice and for token-choice with a
non-zero loss-free router bias (one that changes some depths); plus the pure decision functions themselves."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.infer import cache as cache_lib
from mor_jax.infer.decode import forward_cached
from mor_jax.infer.engine import Engine
from mor_jax.infer.sampling import SamplingParams
from mor_jax.model import routing
from mor_jax.model.transformer import MoRLM, init_variables
from test_model import run, tiny, tokens
from tiny import tiny_model_config

CTX, MAX_LEN, NEW = 40, 32, 8
PROMPTS = [[int(x) for x in np.random.default_rng(3).integers(1, 128, n)] for n in (11, 6, 9)]
BIAS = np.array([-0.1, 0.1, 0.0], np.float32)   # loss-free balancing bias: shifts depths (checked below)

pytestmark = pytest.mark.usefixtures("fast_compilation")

KINDS = {
    "expert": dict(mor="expert"),
    "token_loss_free_bias": dict(mor="token", mor__balancing="loss_free"),
}


@functools.lru_cache(maxsize=None)
def model(kind):
  cfg = tiny_model_config("middle_cycle", 3, max_seq_len=CTX, **KINDS[kind])
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))
  # expert routers x300: far from the threshold; the token-choice router x100: scores the bias tips for some tokens
  router_std = 6.0 if kind == "expert" else 2.0

  def draw(path, a):
    names = [str(getattr(k, "key", "")) for k in path]
    if names[-1] == "scale":
      return jnp.ones(a.shape, a.dtype)
    if names[0] == "router_bias":
      return jnp.asarray(BIAS)
    std = 0.3 if names[1] == "lm_head" else (router_std if any(n.startswith("router") for n in names) else 0.02)
    return jnp.asarray(rng.normal(0, std, a.shape), a.dtype)
  return cfg, jax.tree_util.tree_map_with_path(draw, abstract)


def training_recursions(cfg, variables, tokens):
  """Per-token recursions of the training model's causal routing (one sequence)."""
  _, aux = jax.jit(lambda v, t: MoRLM(cfg).apply(v, t, routing_mode="causal", threshold=0.5))(
      variables, jnp.asarray([tokens], jnp.int32))
  rec = aux["recursions"] if cfg.mor_type == "expert" else aux["depth"] + 1
  return np.asarray(rec[0]), aux


def decoder_recursions(cfg, variables, tokens):
  plan = cache_lib.make_plan(cfg, MAX_LEN, "full")
  n = len(tokens)
  pos = jnp.arange(n, dtype=jnp.int32)[None]
  _, _, info = jax.jit(functools.partial(forward_cached, cfg, plan))(
      variables, cache_lib.init_cache(cfg, plan, 1), jnp.asarray([tokens], jnp.int32), pos, jnp.ones((1, n), bool),
      threshold=jnp.float32(0.5))
  return np.asarray(info["recursions"][0])


@pytest.mark.parametrize("kind", list(KINDS))
def test_training_decoder_and_engine_route_every_token_alike(kind):
  cfg, variables = model(kind)
  eng = Engine(cfg, variables, slots=2, max_len=MAX_LEN, max_new_tokens=NEW, prefill_rows=2)
  outs = eng.generate(PROMPTS, max_new_tokens=NEW, sampling=SamplingParams(temperature=0.0))
  seen, tipped_in_ticks = set(), 0
  for prompt, out in zip(PROMPTS, outs):
    seq = prompt + out.tokens[:-1]     # every position whose logits produced a token
    train, aux = training_recursions(cfg, variables, seq)
    np.testing.assert_array_equal(decoder_recursions(cfg, variables, seq), train)
    # the engine: prompt positions from its prefill, generated ones from its ticks
    np.testing.assert_array_equal(np.asarray(out.prompt_recursions + out.recursions[1:]), train)
    assert out.recursions[0] == train[len(prompt) - 1]
    seen |= set(train.tolist())
    if kind.startswith("token"):
      # the bias is real: without it some depths differ, and no decision is a near-tie
      p = np.asarray(routing.token_probs(cfg, aux["router_logits"][0][0]))
      assert (np.argmax(p, -1) + 1 != train).any()
      tipped_in_ticks += int(np.sum(np.argmax(p, -1)[len(prompt):] + 1 != train[len(prompt):]))
      top2 = np.sort(p + BIAS, -1)[:, -2:]
      assert np.min(top2[:, 1] - top2[:, 0]) > 1e-3
  assert len(seen) >= 2, seen          # routing is not trivial: tokens stop at different depths
  if kind.startswith("token"):
    assert tipped_in_ticks > 0          # the engine's ticks routed tokens whose depth the bias decides


def test_decision_functions():
  cfg, _ = model("token_loss_free_bias")
  z = jnp.asarray([[2.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
  p, depth, gate = routing.token_choice_decision(cfg, z, jnp.asarray(BIAS))
  np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, rtol=1e-6)       # softmax, alpha 1
  np.testing.assert_array_equal(np.asarray(depth), [0, 1])                # row 2: the bias tips depth 0 to 1
  np.testing.assert_array_equal(np.asarray(routing.token_choice_decision(cfg, z)[1]), [0, 0])
  np.testing.assert_allclose(np.asarray(gate), np.asarray(p)[[0, 1], [0, 1]])   # gate: p[depth], without the bias
  assert routing.router_bias(cfg, {"router_bias": {"bias": BIAS}}) is BIAS
  ecfg, _ = model("expert")
  enters, gate = routing.expert_decision(ecfg, jnp.asarray([-1.0, 1.0]), 1, 0.5)
  np.testing.assert_array_equal(np.asarray(enters), [False, True])
  np.testing.assert_allclose(np.asarray(gate), 0.1 * jax.nn.sigmoid(jnp.asarray([-1.0, 1.0])), rtol=1e-6)
  # recursion 0 at capacity 1 takes every token; per-row recursions are fine
  np.testing.assert_array_equal(np.asarray(routing.expert_decision(ecfg, jnp.asarray([-1.0, -1.0]), 0, 0.5)[0]),
                                [True, True])
  np.testing.assert_array_equal(
      np.asarray(routing.expert_enters(ecfg, jnp.asarray([0, 2]), jnp.asarray([0.2, 0.2]), 0.5)), [True, False])


# ------------------------------------------------------------ routing modes
def test_capacity_warmup_mask_path_matches_topk_after_warmup():
  cfg = tiny("middle_cycle", 3, "expert", mor__cap_warmup_steps=10)
  v = init_variables(cfg, jax.random.PRNGKey(0))
  toks = tokens()
  a, aux_a = run(cfg, v, toks, routing_mode="topk")
  b, aux_b = run(cfg, v, toks, routing_mode="topk_warmup", step=jnp.int32(10))
  np.testing.assert_allclose(a, b, atol=2e-5)
  np.testing.assert_allclose(aux_a["sampling_loss"], aux_b["sampling_loss"], rtol=1e-5)
  np.testing.assert_allclose(aux_a["tokens_per_recursion"], aux_b["tokens_per_recursion"])
  _, aux0 = run(cfg, v, toks, routing_mode="topk_warmup", step=jnp.int32(0))
  np.testing.assert_allclose(aux0["tokens_per_recursion"], [1.0, 1.0, 1.0])
  _, aux5 = run(cfg, v, toks, routing_mode="topk_warmup", step=jnp.int32(5))
  # c(5) = c + (1 - c) / 2 for c = 2/3 and 1/3 -> k = floor(c(5) * 16)
  np.testing.assert_allclose(aux5["tokens_per_recursion"], [1.0, 13 / 16, 10 / 16])


def test_causal_mode_equals_topk_when_every_token_passes():
  """Capacity 1 everywhere + threshold 0: both forms route every token through every recursion."""
  cfg = tiny("middle_cycle", 2, "expert", mor__capacity_fractions=(1.0, 1.0))
  v = init_variables(cfg, jax.random.PRNGKey(0))
  a, _ = run(cfg, v, tokens(), routing_mode="topk")
  b, aux = run(cfg, v, tokens(), routing_mode="causal", threshold=0.0)
  np.testing.assert_allclose(a, b, atol=2e-5)
  np.testing.assert_allclose(aux["tokens_per_recursion"], [1.0, 1.0])


def test_token_choice_buffer_fraction_drops_and_counts():
  exact = tiny("middle_cycle", 3, "token")
  small = tiny("middle_cycle", 3, "token", mor__token_buffer_fraction=0.25)
  v = init_variables(exact, jax.random.PRNGKey(0))
  a, aux_a = run(exact, v, tokens())
  b, aux_b = run(small, v, tokens())
  assert int(aux_a["dropped_tokens"]) == 0
  active = [(np.asarray(aux_a["depth"]) >= r).sum(1) for r in (1, 2)]
  expect = sum(np.maximum(n - 4, 0).sum() for n in active)
  assert int(aux_b["dropped_tokens"]) == expect
  if expect:
    assert float(jnp.max(jnp.abs(a - b))) > 0


def test_token_choice_loss_free_bias_changes_depths():
  from mor_jax.model.routing import loss_free_bias_update
  cfg = tiny("middle_cycle", 3, "token", mor__balancing="loss_free")
  v = init_variables(cfg, jax.random.PRNGKey(0))
  assert "router_bias" in v and v["router_bias"]["bias"].shape == (3,)
  _, aux = run(cfg, v, tokens())
  np.testing.assert_allclose(float(aux["aux_loss"]), 0.0)  # no balancing loss term
  load = aux["balancing_ratio"]
  new = loss_free_bias_update(v["router_bias"]["bias"], load, 0.5)
  np.testing.assert_allclose(new, 0.5 * np.sign(np.mean(load) - np.asarray(load)))
  v2 = {**v, "router_bias": {"bias": jnp.array([0.0, 0.0, 10.0])}}
  _, aux2 = run(cfg, v2, tokens())
  np.testing.assert_allclose(aux2["balancing_ratio"], [0.0, 0.0, 1.0])


def test_token_choice_balancing_warmup_uses_full_depth():
  cfg = tiny("middle_cycle", 3, "token", mor__bal_warmup_steps=5)
  v = init_variables(cfg, jax.random.PRNGKey(0))
  _, aux = run(cfg, v, tokens(), step=jnp.int32(2))
  np.testing.assert_allclose(aux["tokens_per_recursion"], [1.0, 1.0, 1.0])
  _, aux = run(cfg, v, tokens(), step=jnp.int32(5))
  assert float(aux["tokens_per_recursion"][2]) < 1.0


def test_rand_router_and_identity_gating_run():
  cfg = tiny("middle_cycle", 2, "expert", mor__rand_router=True, mor__gating="identity")
  v = init_variables(cfg, jax.random.PRNGKey(0))
  a, aux = run(cfg, v, tokens(), rngs={"router": jax.random.PRNGKey(1)})
  b, _ = run(cfg, v, tokens(), rngs={"router": jax.random.PRNGKey(2)})
  assert float(aux["aux_loss"]) == 0.0
  assert float(jnp.max(jnp.abs(a - b))) > 0  # different random routes


def test_mor_selects_fewer_tokens_per_recursion():
  cfg = tiny("middle_cycle", 3, "expert")
  v = init_variables(cfg, jax.random.PRNGKey(0))
  _, aux = run(cfg, v, tokens())
  assert [s.shape[1] for s in aux["selected"]] == [16, 10, 5]
  for r in range(1, 3):  # hierarchical: selected at r is a subset of selected at r-1
    for b in range(2):
      assert set(np.asarray(aux["selected"][r][b])) <= set(np.asarray(aux["selected"][r - 1][b]))
