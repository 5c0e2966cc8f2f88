"""Generation: greedy decoding reproduces the full causal forward pass, is deterministic, batching does not change
results, sampling is seeded, EOS / stop strings / length limits end rows, streaming, clear input errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.infer import Generator, InferenceError, SamplingParams, sample_logits
from mor_jax.infer.sampling import sampling_arrays
from mor_jax.model.transformer import MoRLM, init_variables
from tiny import tiny_model_config

V, CTX = 96, 24


pytestmark = pytest.mark.usefixtures("fast_compilation")


class CharTokenizer:
  """Printable ASCII, one token per character; id 0 is EOS (dropped by decode)."""

  def __init__(self, eos_id=0, vocab_size=V):
    self.eos_id, self.bos_id, self.vocab_size = eos_id, None, vocab_size

  def encode(self, text):
    return [ord(c) - 31 for c in text]

  def decode(self, ids):
    return "".join(chr(int(i) + 31) for i in ids if int(i) != self.eos_id and 0 < int(i) < V)


def tiny(**over):
  """tests/tiny.py's expert-choice middle_cycle R=2 model with this file's vocabulary and context."""
  return tiny_model_config("middle_cycle", 2, "expert", vocab=V, max_seq_len=CTX, **over)


@functools.lru_cache(maxsize=None)
def variables_for(cfg, seed=0):
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))

  def draw(path, a):
    names = [str(getattr(k, "key", "")) for k in path]
    if names[-1] == "scale":
      return jnp.ones(a.shape, a.dtype)
    std = 0.02 * (300.0 if any(n.startswith("router") for n in names) else 1.0)
    # a sharper head than init (std 0.3) so that greedy choices are not near-ties
    std = 0.3 if names[1] == "lm_head" else std
    return jnp.asarray(rng.normal(0, std, a.shape), a.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


CFG = tiny()
PROMPTS = [[5, 17, 33], [40, 2, 9, 61, 7, 7, 80, 12, 3], [11, 12, 13, 14, 15]]
GREEDY = SamplingParams(temperature=0.0)


def gen(tokenizer=None, **kw):
  return Generator(CFG, variables_for(CFG), tokenizer, **kw)


@functools.lru_cache(maxsize=None)
def _full(cfg):
  return jax.jit(lambda v, t: MoRLM(cfg).apply(v, t, routing_mode="causal"))


def test_greedy_generation_follows_the_full_forward_pass():
  """Each greedy token is the argmax of a full causal pass over prompt + generated tokens; recursions agree too."""
  outs = gen().generate(PROMPTS, max_new_tokens=12, sampling=GREEDY)
  for p, o in zip(PROMPTS, outs):
    assert o.finish_reason == "length" and len(o.tokens) == 12
    n, m = len(p), len(p) + len(o.tokens)
    seq = jnp.asarray([(p + o.tokens + [0] * CTX)[:CTX]])      # one length for every prompt: one compilation
    logits, aux = _full(CFG)(variables_for(CFG), seq)
    np.testing.assert_array_equal(np.argmax(np.asarray(logits[0, n - 1:m - 1]), -1), o.tokens)
    g = np.asarray(jax.nn.sigmoid(aux["router_logits"][1][0, :, 0])) >= 0.5
    depth = 1 + g.astype(int)
    assert o.recursions == depth[n - 1:m - 1].tolist() and o.prompt_recursions == depth[:n].tolist()
  assert len({r for o in outs for r in o.recursions}) == 2      # both depths occur


def test_greedy_is_deterministic_and_batching_does_not_change_results():
  a = gen().generate(PROMPTS, max_new_tokens=12, sampling=GREEDY)
  b = gen().generate(PROMPTS, max_new_tokens=12, sampling=GREEDY)
  assert [o.tokens for o in a] == [o.tokens for o in b]
  g = gen()
  for p, o in zip(PROMPTS, a):
    one = g.generate([p], max_new_tokens=12, sampling=GREEDY)[0]
    assert one.tokens == o.tokens and one.recursions == o.recursions


def test_sampling_is_seeded_and_row_keys_are_independent_of_the_batch():
  sp = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
  g = gen()
  a = g.generate(PROMPTS, max_new_tokens=12, sampling=sp, seed=3)
  b = g.generate(PROMPTS, max_new_tokens=12, sampling=sp, seed=3)
  c = g.generate(PROMPTS, max_new_tokens=12, sampling=sp, seed=4)
  assert [o.tokens for o in a] == [o.tokens for o in b]
  assert [o.tokens for o in a] != [o.tokens for o in c]
  greedy = g.generate(PROMPTS, max_new_tokens=12, sampling=GREEDY)
  assert [o.tokens for o in a] != [o.tokens for o in greedy]
  # a prompt keeps its draws when it runs alone under the same row id
  one = g.generate([PROMPTS[1]], max_new_tokens=12, sampling=sp, seed=3, row_ids=[1])[0]
  assert one.tokens == a[1].tokens


def test_sample_logits_filters():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  sample = jax.jit(sample_logits)     # one compilation for every setting (they are traced values)
  draw = lambda **kw: np.bincount(np.asarray(sample(keys, logits, sampling_arrays(SamplingParams(**kw)))),
                                  minlength=4) / 4000
  assert draw(temperature=0.0)[0] == 1.0
  assert draw(top_k=1)[0] == 1.0
  k2 = draw(top_k=2)
  assert k2[2:].sum() == 0 and abs(k2[0] - 0.625) < 0.03
  p = draw(top_p=0.7)                       # smallest set with mass >= 0.7: tokens 0 and 1
  assert p[2:].sum() == 0 and abs(p[0] - 0.625) < 0.03
  full = draw(temperature=1.0)
  np.testing.assert_allclose(full, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  with pytest.raises(InferenceError, match="top_p"):
    SamplingParams(top_p=0.0)


def test_eos_stop_strings_and_streaming():
  base = gen(CharTokenizer(eos_id=V - 1)).generate(["Hello"], max_new_tokens=12, sampling=GREEDY)[0]
  assert base.finish_reason == "length"
  # EOS: make the 4th generated token the end-of-text token
  eos = base.tokens[3]
  first = base.tokens.index(eos)
  out = gen(CharTokenizer(eos_id=eos)).generate(["Hello"], max_new_tokens=12, sampling=GREEDY)[0]
  assert out.finish_reason == "eos" and out.tokens == base.tokens[:first + 1]
  # a stop string cuts the text before it; streamed pieces add up to the final text
  text = base.text
  stop = text[5:7]
  pieces, streamed_ids = [], []
  g = gen(CharTokenizer(eos_id=V - 1))
  o = g.generate(["Hello"], max_new_tokens=12, sampling=GREEDY, stop=[stop],
                 on_text=lambda b, s: pieces.append(s), on_tokens=lambda b, t: streamed_ids.extend(t), chunk_steps=2)[0]
  assert o.finish_reason == "stop" and o.text == text[:text.index(stop)]
  assert "".join(pieces) == o.text
  assert streamed_ids == o.tokens[:len(streamed_ids)] and len(o.tokens) < 12
  # stop strings also apply without streaming; unrelated ones change nothing
  o2 = g.generate(["Hello"], max_new_tokens=12, sampling=GREEDY, stop=["\x00never"])[0]
  assert o2.finish_reason == "length" and o2.text == text


def test_length_limits_and_context():
  g = gen()
  o = g.generate([[3] * 16], max_new_tokens=12, sampling=GREEDY)[0]    # (the programs of the other 1-row batches)
  assert o.finish_reason == "length" and len(o.tokens) == CTX - 16     # prompt + generated fill the context
  stats = g.kv_stats()
  assert stats["entries_per_recursion"][0, 0] == CTX - 1            # the last token is never fed back


def test_input_errors():
  g = gen(CharTokenizer())
  with pytest.raises(InferenceError, match="empty"):
    g.generate([""], max_new_tokens=4)
  with pytest.raises(InferenceError, match="context"):
    g.generate(["x" * CTX], max_new_tokens=4)
  with pytest.raises(InferenceError, match="vocabulary"):
    g.generate([[V + 3, 1]], max_new_tokens=4)
  with pytest.raises(InferenceError, match="tokenizer has 200 tokens"):
    gen(CharTokenizer(vocab_size=200))
  with pytest.raises(InferenceError, match="max_new_tokens"):
    g.generate(["hi"], max_new_tokens=0)


def test_bfloat16_decoding_reads_half_the_bytes_and_stays_close():
  """dtype='bfloat16': the layer and head weights and the KV caches in bf16 (half the bytes read per token); the
  logits stay within bf16 rounding of float32's and greedy decoding mostly agrees (on this sharp random model)."""
  from mor_jax.infer import weights as weights_lib  # pylint: disable=g-import-not-at-top
  v = variables_for(CFG)
  w32, w16 = weights_lib.prepare_weights(CFG, v), weights_lib.prepare_weights(CFG, v, "bfloat16")
  big = lambda w: sum(a.nbytes for a in jax.tree.leaves((w.head, w.block, w.first, w.last)) if a.ndim == 2)
  assert w16.dtype == jnp.bfloat16 and big(w16) * 2 == big(w32)
  g32, g16 = Generator(CFG, w32), Generator(CFG, w16)
  o32 = g32.generate(PROMPTS, max_new_tokens=8, sampling=GREEDY)
  o16 = g16.generate(PROMPTS, max_new_tokens=8, sampling=GREEDY)
  assert g16.kv_stats()["kv_allocated_bytes"] * 2 == g32.kv_stats()["kv_allocated_bytes"]
  same = np.mean([a == b for x, y in zip(o32, o16) for a, b in zip(x.tokens, y.tokens)])
  assert same >= 0.75
  tokens = jnp.asarray([PROMPTS[1]], jnp.int32)
  full32, _ = MoRLM(CFG).apply(v, tokens, routing_mode="causal", threshold=0.5)
  from mor_jax.infer import cache as cache_lib, forward_cached, logits_fn  # pylint: disable=g-import-not-at-top
  plan = cache_lib.make_plan(CFG, CTX, "full")
  pos = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
  h16, _, _ = forward_cached(CFG, plan, w16, cache_lib.init_cache(CFG, plan, 1, jnp.bfloat16), tokens, pos,
                             jnp.ones(tokens.shape, bool))
  err = float(jnp.max(jnp.abs(logits_fn(CFG, w16, h16) - full32)))
  assert 0 < err < 0.05 * float(jnp.max(jnp.abs(full32)))


def test_bfloat16_products_and_cache_writes_take_the_fast_paths_and_keep_the_values():
  """weights.matmul: kernels [N, K] (a row per output, nk=True) or [K, N] give the same products; bfloat16 products
  accumulate in float32 (XLA:CPU's fast bf16 kernels) and a single row is padded to two without changing its values;
  a bfloat16 cache is stored as its 16-bit patterns and cache.write_entries writes it in place (no copy of the whole
  cache in the compiled program) with the same values as `.at[].set` on bfloat16."""
  from mor_jax.infer import cache as cache_lib, weights as weights_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 1, 64)), jnp.float32)
  k16 = jnp.asarray(rng.normal(size=(40, 64)) * 0.1, jnp.bfloat16)
  many = weights_lib.matmul(x, k16, nk=True)
  one = weights_lib.matmul(x[1:2], k16, nk=True)
  assert many.dtype == one.dtype == jnp.bfloat16 and one.shape == (1, 1, 40)
  np.testing.assert_array_equal(np.asarray(one, np.float32), np.asarray(many[1:2], np.float32))
  exact = np.asarray(x.astype(jnp.bfloat16), np.float64)[:, 0] @ np.asarray(k16, np.float64).T
  np.testing.assert_allclose(np.asarray(many[:, 0], np.float64), exact, rtol=1e-2, atol=1e-2)
  assert weights_lib.matmul(x, k16, jnp.float32, nk=True).dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(weights_lib.matmul(x, k16.T), np.float32), np.asarray(many, np.float32))
  k32 = jnp.asarray(k16, jnp.float32)
  for w, nk in ((k32, True), (k32.T, False)):
    np.testing.assert_allclose(np.asarray(weights_lib.matmul(x, w, nk=nk))[:, 0],
                               np.asarray(x)[:, 0] @ np.asarray(k32).T, rtol=1e-5, atol=1e-5)
  mm_nk = functools.partial(weights_lib.matmul, nk=True)
  dots = lambda a: [ln for ln in jax.jit(mm_nk).lower(a, k16).as_text().splitlines()
                    if "dot_general" in ln]
  assert dots(x)[0].endswith("(tensor<3x1x64xbf16>, tensor<40x64xbf16>) -> tensor<3x1x40xf32>")
  assert dots(x[:1])[0].endswith("(tensor<2x64xbf16>, tensor<40x64xbf16>) -> tensor<2x40xf32>")

  values = jnp.asarray(rng.normal(size=(6, 8, 17)), jnp.bfloat16)
  cache = jax.lax.bitcast_convert_type(values, cache_lib.storage_dtype(jnp.bfloat16))   # stored as uint16
  assert cache.dtype == jnp.uint16 and cache_lib.storage_dtype(jnp.float32) == jnp.float32
  rows, at = jnp.asarray([0, 3, 5]), jnp.asarray([2, 16, 7])
  new = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
  want = values.at[rows, :, at].set(new.astype(jnp.bfloat16))
  got = cache_lib.write_entries(cache, (rows, slice(None), at), new)
  assert got.dtype == jnp.uint16 and cache_lib.entries(got).dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(cache_lib.entries(got), np.float32), np.asarray(want, np.float32))
  compiled = jax.jit(lambda c, n: cache_lib.write_entries(c, (rows, slice(None), at), n)).lower(cache, new).compile()
  text = compiled.as_text()     # in place: no copy of the whole cache in another type (f32, bf16) around the write
  assert "f32[6,8,17]" not in text and "bf16[6,8,17]" not in text and "scatter" in text
