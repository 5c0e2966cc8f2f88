"""Cached decoding: prefill + token-by-token decoding equals one causal full forward pass, for every model kind;
recursion-wise caches hold exactly the tokens that routing sends to each recursion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.infer import cache as cache_lib
from mor_jax.infer.decode import InferenceError, check_supported, forward_cached, logits_fn
from mor_jax.model.transformer import MoRLM, init_variables
from mor_jax.infer import weights as weights_lib
from tiny import tiny_model_config

V, B, T, P, MAX_LEN = 96, 2, 16, 7, 24


pytestmark = pytest.mark.usefixtures("fast_compilation")


def tiny(strategy="none", R=1, mor=None, depth=2, **over):
  """tests/tiny.py's model with this file's vocabulary and context (vanilla: 3 layers)."""
  return tiny_model_config(strategy, R, mor, depth=depth, vocab=V, max_seq_len=32,
                           num_layers=3 if strategy == "none" else None, **over)


@functools.lru_cache(maxsize=None)
def variables_for(cfg, router_scale=300.0, seed=0):
  """Random weights drawn with numpy (no compilation): normal(0, 0.02), norms 1, routers scaled up so that
  routing decisions are far from the threshold (not ties), token-choice router bias random."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))

  def draw(path, a):
    names = [getattr(k, "key", "") for k in path]
    if names[-1] == "scale":
      return jnp.ones(a.shape, a.dtype)
    if names[0] == "router_bias":
      return jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype)
    std = 0.02 * (router_scale if any(str(n).startswith("router") for n in names) else 1.0)
    return jnp.asarray(rng.normal(0, std, a.shape), a.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


@functools.lru_cache(maxsize=None)
def _full(cfg):
  return jax.jit(lambda v, t, thr: MoRLM(cfg).apply(v, t, routing_mode="causal", threshold=thr))


@functools.lru_cache(maxsize=None)
def _step(cfg, plan):
  def step(v, cache, toks, pos, valid, thr):
    h, cache, info = forward_cached(cfg, plan, v, cache, toks, pos, valid, threshold=thr)
    return logits_fn(cfg, v, h), cache, info
  return jax.jit(step)


def cached_logits(cfg, v, toks, prefill=P, capacity="full", threshold=0.5):
  """Prefill `prefill` tokens, then decode the rest one by one; all logits [B, T, V], final cache, entered."""
  plan = cache_lib.make_plan(cfg, MAX_LEN, capacity)
  step = _step(cfg, plan)
  Bn, Tn = toks.shape
  cache = cache_lib.init_cache(cfg, plan, Bn)
  thr = jnp.float32(threshold)
  pos = jnp.broadcast_to(jnp.arange(prefill), (Bn, prefill))
  logits, cache, info = step(v, cache, toks[:, :prefill], pos, jnp.ones_like(pos, bool), thr)
  outs, entered = [logits], [info["entered"]]
  for t in range(prefill, Tn):
    logits, cache, info = step(v, cache, toks[:, t:t + 1], jnp.full((Bn, 1), t), jnp.ones((Bn, 1), bool), thr)
    outs.append(logits)
    entered.append(info["entered"])
  return jnp.concatenate(outs, 1), cache, plan, jnp.concatenate(entered, 2)


def tokens(seed=1, Bn=B, Tn=T):
  return jax.random.randint(jax.random.PRNGKey(seed), (Bn, Tn), 0, V)


KINDS = {
    "vanilla": dict(),
    "recursive_middle_cycle_unrolled_remat": dict(strategy="middle_cycle", R=2, model__scan_layers=False,
                                                  model__remat_policy="full"),
    "recursive_sequence": dict(strategy="middle_sequence", R=2),
    "expert_R3": dict(strategy="middle_cycle", R=3, mor="expert"),
    "token_R3": dict(strategy="middle_cycle", R=3, mor="token", mor__balancing="loss_free"),
    "kv_sharing_expert_R3": dict(strategy="cycle", R=3, mor="expert", kv_sharing__enable=True),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_cached_decoding_equals_full_causal_forward(kind):
  cfg = tiny(**KINDS[kind])
  v = variables_for(cfg)
  toks = tokens()
  full, aux = _full(cfg)(v, toks, 0.5)
  # (the sequence-sharing extra case decodes from the first token on: one compilation fewer)
  got, cache, plan, entered = cached_logits(cfg, v, toks, prefill=1 if kind == "recursive_sequence" else P)
  np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-4, rtol=0)
  assert float(jnp.max(jnp.abs(full))) > 1e-2   # the logits are not trivially zero
  if cfg.mor_enable:
    # routing is not trivial: some tokens stop early, some go deep
    n = np.asarray(aux["tokens_per_recursion"]) * B * T
    assert n[0] == B * T and 0 < n[-1] < B * T, n
    np.testing.assert_array_equal(np.asarray(entered).sum(axis=(1, 2)), n)


def test_decode_kernels_are_stored_in_the_faster_layout_and_keep_the_models_logits():
  """weights.rows_out: bfloat16 kernels of a model of hidden size >= 512 are stored [N, K] (a row per output), all
  others [K, N]; decoding with either gives the model's logits (float32 to 1e-4; bfloat16 within its rounding: a
  wrong layout would give unrelated numbers everywhere)."""
  cfg = tiny(strategy="middle_cycle", R=3, mor="expert", model__hidden_size=512)
  v, toks = variables_for(cfg), tokens()
  full = np.asarray(_full(cfg)(v, toks, 0.5)[0])
  for dtype, nk in (("float32", False), ("bfloat16", True)):
    w = weights_lib.prepare_weights(cfg, v, dtype)
    assert weights_lib.rows_out(cfg, w.dtype) == nk
    assert w.block[0]["gate_up"].shape == ((2 * cfg.intermediate_size, 512) if nk else (512, 2 * cfg.intermediate_size))
    assert w.head.shape == ((V, 512) if nk else (512, V))
    err = np.abs(np.asarray(cached_logits(cfg, w, toks)[0]) - full) / np.abs(full).max()
    if nk:
      assert err.mean() < 0.01 and np.mean(err > 0.05) < 0.002 and err.max() < 0.3, (err.mean(), err.max())
    else:
      assert err.max() * np.abs(full).max() < 1e-4
  assert not weights_lib.rows_out(tiny(), jnp.bfloat16)


def test_token_choice_depths_match_full_forward():
  cfg = tiny(**KINDS["token_R3"])
  v = variables_for(cfg)
  toks = tokens()
  _, aux = _full(cfg)(v, toks, 0.5)
  _, _, _, entered = cached_logits(cfg, v, toks)
  depth = np.asarray(entered).sum(0) - 1
  np.testing.assert_array_equal(depth, np.asarray(aux["depth"]))
  assert len(np.unique(depth)) > 1


def _causal_choice(cfg, aux, threshold=0.5):
  """[R, B, T] tokens in each recursion under causal routing, recomputed from the full pass's router logits."""
  chosen, out = None, []
  for r, z in enumerate(aux["router_logits"]):
    passes = np.asarray(jax.nn.sigmoid(z[..., 0])) >= threshold
    chosen = np.ones_like(passes) if r == 0 else chosen & passes
    out.append(chosen)
  return np.stack(out)


def test_expert_cache_entries_per_recursion_follow_routing():
  cfg = tiny(**KINDS["expert_R3"])
  v = variables_for(cfg)
  toks = tokens(seed=3)
  _, aux = _full(cfg)(v, toks, 0.5)
  chosen = _causal_choice(cfg, aux)
  _, cache, plan, _ = cached_logits(cfg, v, toks)
  stats = cache_lib.cache_stats(cache, plan)
  np.testing.assert_array_equal(stats["entries_per_recursion"], chosen.sum(axis=2))   # per recursion, per row
  counts = chosen.sum(axis=2)
  assert counts[0].tolist() == [T, T] and (counts[2] < counts[1]).any() and counts[2].min() > 0
  # entries are compact and hold the positions of the tokens that entered, in order
  for r in range(cfg.recursions):
    c = cache["stage"][r]
    for b in range(B):
      n = int(c.length[b])
      np.testing.assert_array_equal(np.asarray(c.index[b, :n]), np.nonzero(chosen[r, b])[0])
  # first and last unique layers cache every token; used KV bytes follow the entries
  assert [int(x) for x in cache["first"].length] == [T, T] == [int(x) for x in cache["last"].length]
  per_token = cache["first"].bytes_per_entry
  assert stats["kv_used_bytes"] == per_token * 2 * B * T + sum(
      cache["stage"][r].bytes_per_entry * int(counts[r].sum()) for r in range(3))


def test_kv_sharing_keeps_one_stage_cache():
  cfg = tiny(**KINDS["kv_sharing_expert_R3"])
  plan = cache_lib.make_plan(cfg, MAX_LEN, "routed")
  assert plan.num_stage_caches == 1 and plan.stage_capacity == (MAX_LEN,)
  assert [c.cache for c in plan.calls] == [0, None, None] and all(c.reads == 0 for c in plan.calls)


def test_routed_capacity_sizes_caches_and_admits_in_order():
  cfg = tiny(**KINDS["expert_R3"])
  plan = cache_lib.make_plan(cfg, MAX_LEN, "routed")
  assert plan.stage_capacity == (24, 16, 8)
  full = cache_lib.init_cache(cfg, cache_lib.make_plan(cfg, MAX_LEN, "full"), 1)
  routed = cache_lib.init_cache(cfg, plan, 1)
  kv = lambda c: sum(x.kv_nbytes - x.bytes_per_entry for x in c["stage"])   # less the spare entry (batch 1)
  assert kv(routed) * 3 == kv(full) * 2          # (1 + 2/3 + 1/3) / 3 = (R + 1) / (2R) of the stage
  # a tight cache: tokens that find it full do not enter (and do not go deeper)
  v = variables_for(cfg)
  toks = tokens(seed=3)
  _, aux = _full(cfg)(v, toks, 0.5)
  chosen = _causal_choice(cfg, aux)
  _, cache, plan2, entered = cached_logits(cfg, v, toks, capacity=(1.0, 0.25, 0.25), prefill=1)  # T = 1 only
  cap1 = plan2.stage_capacity[1]
  assert cap1 == 6
  for b in range(B):
    want1 = np.nonzero(chosen[1, b])[0][:cap1]
    np.testing.assert_array_equal(np.nonzero(np.asarray(entered[1, b]))[0], want1)
    assert int(cache["stage"][1].length[b]) == min(cap1, chosen[1, b].sum())
    assert not (np.asarray(entered[2, b]) & ~np.asarray(entered[1, b])).any()


def test_threshold_controls_depth():
  cfg = tiny(**KINDS["expert_R3"])
  v = variables_for(cfg)
  toks = tokens()
  for thr, want in ((1.01, 1), (0.0, 3)):
    full, aux = _full(cfg)(v, toks, thr)
    got, _, _, entered = cached_logits(cfg, v, toks, threshold=thr)
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-4, rtol=0)
    assert (np.asarray(entered).sum(0) == want).all()


def test_rand_router_is_rejected():
  with pytest.raises(InferenceError, match="rand_router"):
    check_supported(tiny(strategy="cycle", R=2, mor="expert", mor__rand_router=True))
