"""Continuous depth-wise batching engine: for the same requests, its outputs equal the plain generation path's
(greedy and seeded sampling, token for token, with the recursions behind every token), while tokens at different
depths share ticks, exit in the same tick, wait for a compacted first/last layer and slots are refilled from the
queue; vanilla, token-choice and KV-sharing models; clear errors. (Non-routed recursive models take the
vanilla path of the tick with the window caches of the routed ones.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.infer import Generator, InferenceError, SamplingParams
from mor_jax.infer.engine import Engine
from mor_jax.model.transformer import init_variables
from tiny import tiny_model_config

V, CTX, MAX_LEN = 96, 40, 32
GREEDY = SamplingParams(temperature=0.0)

pytestmark = pytest.mark.usefixtures("fast_compilation")


def tiny(strategy="middle_cycle", R=3, mor="expert", **over):
  """tests/tiny.py's model (block of one layer) with this file's vocabulary and context (vanilla: 3 layers)."""
  return tiny_model_config(strategy, R, mor, vocab=V, max_seq_len=CTX, num_layers=3 if strategy == "none" else None,
                           **over)


@functools.lru_cache(maxsize=None)
def variables_for(cfg, seed=0):
  """normal(0, 0.02) weights drawn with numpy; routers x300 (decisions far from the threshold, both ways) and a
  sharper head (std 0.3) so that greedy choices are not near-ties."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))

  def draw(path, a):
    names = [str(getattr(k, "key", "")) for k in path]
    if names[-1] == "scale":
      return jnp.ones(a.shape, a.dtype)
    if names[0] == "router_bias":
      return jnp.asarray(rng.normal(0, 0.05, a.shape), a.dtype)
    std = 0.3 if names[1] == "lm_head" else 0.02 * (300.0 if any(n.startswith("router") for n in names) else 1.0)
    return jnp.asarray(rng.normal(0, std, a.shape), a.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


_rng = np.random.default_rng(7)
PROMPTS = [[int(x) for x in _rng.integers(1, V, n)] for n in (3, 9, 5, 2, 12, 7, 4, 6)]
NEW = [12, 3, 9, 14, 5, 1, 10, 7]


def plain(cfg, prompts, new, sampling=GREEDY, seed=0, row_ids=None, **kw):
  """The plain path: one batch, the longest length for all, each output cut to its request's length (greedy and
  seeded sampling are prefix-consistent: token i depends on the tokens before it and its own key only)."""
  outs = Generator(cfg, variables_for(cfg), **kw).generate(prompts, max_new_tokens=max(new), sampling=sampling,
                                                           seed=seed, max_len=MAX_LEN, row_ids=row_ids)
  return [(o.tokens[:n], o.recursions[:n], o.prompt_recursions) for o, n in zip(outs, new)]


def served(outs):
  return [(o.tokens, o.recursions, o.prompt_recursions) for o in outs]


def test_engine_equals_plain_generation_with_mixed_depths_compaction_and_refills():
  cfg = tiny()
  eng = Engine(cfg, variables_for(cfg), slots=3, max_len=MAX_LEN, max_new_tokens=14, entry_rows=1, exit_rows=2,
               prefill_rows=3)
  outs = eng.generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY)
  assert served(outs) == plain(cfg, PROMPTS, NEW)
  assert all(o.finish_reason == "length" and len(o.tokens) == n for o, n in zip(outs, NEW))
  s = eng.stats
  assert {r for o in outs for r in o.recursions} == {1, 2, 3}       # every depth occurs
  assert s["mixed_depth_ticks"] > 0      # one block call advanced tokens at different depths
  assert s["mixed_exit_ticks"] > 0       # tokens of different depths left in the same tick
  assert s["entry_waits"] > 0 and s["exit_waits"] > 0               # the compacted first/last layers made some wait
  assert s["admit_calls"] >= 4           # 8 requests through 3 slots: refilled from the queue
  assert s["tokens"] == sum(NEW) - len(NEW)                         # the first token of each comes from the prefill
  assert 0 < s["slot_utilisation"] <= 1
  # seeded sampling draws the same tokens as the plain path (same per-request keys), and the engine keeps
  # serving: new requests go into the slots the previous run left
  sp = SamplingParams(temperature=1.0, top_k=20)
  more = eng.generate(PROMPTS, max_new_tokens=NEW, sampling=sp, seed=3)
  assert served(more) == plain(cfg, PROMPTS, NEW, sampling=sp, seed=3)
  assert served(more) != served(outs)
  # a request whose only token comes from the prefill never occupies a slot for a tick
  one = eng.generate([[5, 6]], max_new_tokens=1, sampling=GREEDY)[0]
  assert len(one.tokens) == 1 and eng.stats["ticks"] == 0


CASES = {
    "vanilla": dict(strategy="none", R=1, mor=None),
    "token_choice": dict(strategy="cycle", R=3, mor="token"),
    # capacities below 1 at recursion 0: some tokens run no recursion (only the KV write of recursion 0)
    "kv_sharing": dict(mor__capacity_fractions=(0.5, 0.5, 0.25), kv_sharing__enable=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_engine_equals_plain_generation_for_other_models(name):
  cfg = tiny(**CASES[name])
  kw = dict(kv_capacity=(1.0, 0.4, 0.2)) if name == "token_choice" else {}   # small caches: admission binds
  gather = dict(block_attention="gather") if name == "kv_sharing" else {}     # (the main test's caches: masked)
  eng = Engine(cfg, variables_for(cfg), slots=3, max_len=MAX_LEN, max_new_tokens=14, prefill_rows=3, **kw, **gather)
  outs = eng.generate(PROMPTS, max_new_tokens=NEW, sampling=GREEDY)
  assert served(outs) == plain(cfg, PROMPTS, NEW, **kw)
  depths = {r for o in outs for r in o.recursions}
  if name == "kv_sharing":
    assert 0 in depths and len(depths) >= 3
  elif name == "token_choice":
    assert len(depths) >= 2 and eng.stats["mixed_exit_ticks"] > 0
  else:
    assert depths == {cfg.recursions}


def test_engine_state_and_errors():
  cfg = tiny()
  eng = Engine(cfg, variables_for(cfg), slots=2, max_len=MAX_LEN, max_new_tokens=8)
  with pytest.raises(InferenceError, match="exceeds the model's context of 40"):
    eng.submit([1] * 35, max_new_tokens=8)
  with pytest.raises(InferenceError, match="at most 8"):
    eng.submit([1, 2], max_new_tokens=9)
  with pytest.raises(InferenceError, match="cache positions"):
    eng.submit([1] * 30, max_new_tokens=5)
  with pytest.raises(InferenceError, match="empty"):
    eng.submit([], max_new_tokens=4)
  with pytest.raises(InferenceError, match="vocabulary"):
    eng.submit([V + 1], max_new_tokens=4)
  with pytest.raises(InferenceError, match="one shared block per recursion"):
    Engine(tiny(strategy="middle_sequence", R=2, mor=None), None, slots=2)
  with pytest.raises(InferenceError, match="max_len"):
    Engine(cfg, None, slots=2, max_len=CTX + 1)
  with pytest.raises(InferenceError, match="block_attention='windows' is not one of auto, masked, gather"):
    Engine(cfg, None, slots=2, block_attention="windows")
  assert not eng.queue and eng.kv_bytes() > 0


def test_block_attention_is_gathered_once_the_other_regions_would_cost_more():
  """'auto' attends over the recursion regions side by side (masked) unless the other regions hold at least twice a
  row's own and it holds GATHER_SPAN entries or more; then each row's own region is gathered: decided per capacity,
  so one engine switches as its caches grow; 'masked' and 'gather' hold at every capacity."""
  from mor_jax.infer.engine import layout as layout_lib  # pylint: disable=g-import-not-at-top
  lay = lambda R, m="auto": layout_lib.make_layout(tiny_model_config("middle_cycle", R, "expert", vocab=V,
                                                                     max_seq_len=2048), 4, 2047, block_attention=m)
  caps = (64, 128, 256, 512, 2047)
  assert [lay(3).at_capacity(c).gather for c in caps] == [False, False, True, True, True]
  assert not any(lay(2).at_capacity(c).gather for c in caps)         # 2 regions: the copy costs what it saves
  assert not any(lay(4, "masked").at_capacity(c).gather for c in caps)
  assert all(lay(2, "gather").at_capacity(c).gather for c in caps)


def test_caches_are_sized_to_the_requests_not_the_context():
  """An engine for an 8k-context model serving a 100-token request allocates at most 1/16 of the full-context
  caches; the caches grow across buckets as a sequence gets longer and shrink when the engine is idle; greedy
  output (tokens and the recursions behind them) equals the plain path's."""
  cfg = tiny_model_config("middle_cycle", 3, "expert", vocab=V, max_seq_len=8192)
  v = variables_for(cfg)
  eng = Engine(cfg, v, slots=2, prefill_rows=2)
  full = eng.kv_bytes(capacity=8191)
  prompt = PROMPTS[4] * 2                                             # 24 tokens
  out = eng.generate([prompt], max_new_tokens=[76], sampling=GREEDY)[0]
  assert eng.capacity == 128 and eng.kv_bytes() * 16 <= full        # 100 positions: the 128 bucket (1/64)
  want = Generator(cfg, v).generate([prompt], max_new_tokens=76, sampling=GREEDY)[0]
  assert (out.tokens, out.recursions) == (want.tokens, want.recursions) and len(set(out.recursions)) > 1
  # a longer request grows the caches twice on its way (64 -> 128 -> 256 positions); the outputs stay exact
  long = eng.generate([prompt, PROMPTS[1]], max_new_tokens=[150, 20], sampling=GREEDY)
  assert eng.stats["resizes"] >= 2 and eng.capacity == 256
  plain_long = Generator(cfg, v).generate([prompt, PROMPTS[1]], max_new_tokens=150, sampling=GREEDY)
  assert [(o.tokens, o.recursions) for o in long] == [(plain_long[0].tokens, plain_long[0].recursions),
                                                     (plain_long[1].tokens[:20], plain_long[1].recursions[:20])]
  eng.generate([[3, 4]], max_new_tokens=[4], sampling=GREEDY)        # idle in between: back to the smallest bucket
  assert eng.capacity == 64


def test_admissions_and_growth_are_compiled_ahead_at_every_capacity_they_come_back_at():
  """With compile_ahead, a prefill shape used once has its admission queued for the background compiler at the
  current, the next and the smallest cache capacity, with the next capacity's decode steps and resizes: a request
  of the same shape arriving after the caches grew (or shrank) waits for no compilation."""
  cfg = tiny_model_config("middle_cycle", 3, "expert", vocab=V, max_seq_len=8192)
  eng = Engine(cfg, variables_for(cfg), slots=2, prefill_rows=2, compile_ahead=True)
  eng.generate([PROMPTS[1]], max_new_tokens=[4], sampling=GREEDY)      # (1 row, P=16) at 64 positions
  lay = eng.layout
  assert lay.capacity == 64
  at = lambda c: lay.at_capacity(c)
  for key in [("insert", at(64), 1, 16), ("insert", at(128), 1, 16), ("ticks", at(128), 2),
              ("resize", at(64), at(128))]:
    assert eng.programs.known(key), key
  assert not eng.programs.known(("insert", at(256), 1, 16))           # two buckets up: queued when the caches grow
  long = eng.generate([PROMPTS[4] * 6], max_new_tokens=[40], sampling=GREEDY)[0]    # 72 (bucket 96) + 40 tokens
  assert eng.stats["resizes"] >= 1 and len(long.tokens) == 40
  assert eng.programs.known(("insert", at(256), 1, 16)) and eng.programs.known(("insert", at(128), 1, 96))
  eng.programs.wait()
  stalls = eng.programs.compile_s
  eng.start(sampling=GREEDY)
  eng.submit(PROMPTS[4] * 6, 60)
  eng.step()                                                            # the caches grow to 128 positions
  eng.submit(PROMPTS[1], 4)                                             # (1, 16) at 128: compiled ahead
  while not eng.idle:
    eng.step()
  eng.finish()
  assert eng.programs.compile_s == stalls


def test_decode_steps_and_prefills_compile_for_their_rows_and_keep_the_outputs():
  """compilation.decode_options: float32 programs whose products have 4..128 rows compile without YNNPACK (XLA:CPU's
  Eigen products: faster for a decode step's few rows), others as XLA chooses; prompts are padded to 1.5x buckets
  (prompts.prompt_length). An engine of 4 slots (decode steps on 4 rows without YNNPACK; prefills of 4 prompts
  padded to 48 tokens, 192 rows, with it) gives the plain one-prompt path's greedy tokens and recursions."""
  from mor_jax.infer import compilation, prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  assert compilation.decode_options("float32", 16) == compilation.decode_options(jnp.float32, 4) == {
      "xla_cpu_experimental_ynn_fusion_type": ""}
  assert compilation.decode_options("float32", 2) == compilation.decode_options("float32", 192) == {}
  assert compilation.decode_options("bfloat16", 16) == {}
  assert [prompts_lib.prompt_length(n, 8192) for n in (3, 17, 24, 33, 40, 49, 100, 130)] == [
      16, 24, 24, 48, 48, 64, 128, 192]
  assert prompts_lib.prompt_length(33, 40) == 40 and prompts_lib.prompt_length(20, 40) == 24
  cfg = tiny_model_config("middle_cycle", 3, "expert", vocab=V, max_seq_len=8192)
  v = variables_for(cfg)
  eng = Engine(cfg, v, slots=4, prefill_rows=4)
  ps = [(PROMPTS[i] * 8)[:n] for i, n in zip(range(4), (40, 35, 44, 38))]
  new = [9, 14, 6, 11]
  got = served(eng.generate(ps, max_new_tokens=new, sampling=GREEDY))
  one = lambda p, n: Generator(cfg, v).generate([p], max_new_tokens=n, sampling=GREEDY)[0]
  want = [(o.tokens, o.recursions, o.prompt_recursions) for o in map(one, ps, new)]
  assert got == want and len({r for o in got for r in o[1]}) > 1
  ynn = lambda key: "__ynn_fusion" in eng.programs.get(key).as_text()
  ticks = [k for k in eng.programs.compiled if k[0] == "ticks" and k[2] == 4]
  prefills = [k for k in eng.programs.compiled if k[0] == "prefill"]
  assert ticks and not any(ynn(k) for k in ticks)
  assert [k[1:3] for k in prefills] == [(4, 48)] and ynn(prefills[0])
