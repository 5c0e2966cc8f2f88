"""Restore for inference from a trainer-format Orbax checkpoint written on 4 devices (params only, latest or a
named step, onto one device / in a one-device process), tokenizer checks, and the generate command."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mor_jax.config import defaults as get_config
from mor_jax import config as C
from mor_jax.data.tokenizer import train_bpe
from mor_jax.infer import Generator, InferenceError, SamplingParams, load_tokenizer, main_generate, restore
from mor_jax.model.transformer import init_variables
from mor_jax.checkpoint import Checkpointer
from mor_jax.train.state import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("fast_compilation")


def _words(n, seed=0):
  rng = np.random.default_rng(seed)
  syll = ["ro", "me", "o", "ju", "li", "et", "thou", "art", "the", "and", "to", "be", "or", "not", "love", "night"]
  return " ".join("".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(n))


def _config(tokenizer_dir, vocab, hidden=32):
  c = get_config()
  c.name = "tiny-infer-test"
  c.model.update(vocab_size=vocab, hidden_size=hidden, intermediate_size=64, num_layers=4, num_heads=4,
                 num_kv_heads=2, max_seq_len=64)
  c.recursion.update(strategy="middle_cycle", num_recursions=2)
  c.mor.update(enable=True, type="expert")
  c.data.update(tokenizer_path=tokenizer_dir, seq_len=32)
  c.train.update(total_batch_size=8, per_device_batch_size=2)
  return c


def _params(cfg, seed):
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))["params"]
  return jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.05, a.shape), np.float32), abstract)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir with checkpoints at steps 10 and 20 written by the trainer's Checkpointer on 4 devices."""
  assert jax.device_count() >= 4, "conftest should give 4 CPU devices"
  root = tmp_path_factory.mktemp("infer")
  tok = train_bpe([_words(3000, s) for s in range(4)], 300)
  tok_dir = str(root / "tokenizer")
  tok.save(tok_dir)
  config = _config(tok_dir, tok.vocab_size)
  vc = C.validate(config, num_devices=4)
  cfg = C.model_config(vc)
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("d") if a.shape and a.shape[0] % 4 == 0
                                                    else PartitionSpec()))
  ck = Checkpointer(str(root / "w" / "checkpoints"), max_to_keep=None, async_save=False)
  saved = {}
  for step in (10, 20):
    params = _params(cfg, step)
    saved[step] = params
    sharded = jax.tree.map(shard, params)
    state = TrainState(step=jnp.int32(step), params=sharded, opt_state=optax.adam(1e-3).init(sharded),
                       router_bias={}, rng=jax.random.PRNGKey(0))
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 4
    meta = {"config": json.loads(vc.to_json_best_effort()),
            "model_config": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    ck.save(step, state, {"position": step}, meta)
  ck.close()
  return {"dir": str(root / "w"), "saved": saved, "config": config, "cfg": cfg, "tokenizer": tok_dir, "root": root}


def _assert_same(tree, ref):
  for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_restore_latest_or_named_step_onto_one_device(workdir):
  r = restore(workdir["dir"])
  assert r.step == 20 and r.cfg == workdir["cfg"] and set(r.variables) == {"params"}
  _assert_same(r.variables["params"], workdir["saved"][20])
  dev = jax.local_devices()[0]
  assert all(x.sharding.device_set == {dev} for x in jax.tree.leaves(r.variables))
  r10 = restore(os.path.join(workdir["dir"], "checkpoints"), step=10)
  _assert_same(r10.variables["params"], workdir["saved"][10])
  assert restore(os.path.join(workdir["dir"], "checkpoints", "10")).step == 10
  with pytest.raises(InferenceError, match=r"no checkpoint of step 15.*\[10, 20\]"):
    restore(workdir["dir"], step=15)
  with pytest.raises(InferenceError, match="does not exist"):
    restore(os.path.join(workdir["dir"], "missing"))
  with pytest.raises(InferenceError, match="no checkpoint found"):
    restore(str(workdir["root"]))


def test_restore_rejects_a_config_of_another_model(workdir):
  other = _config(workdir["tokenizer"], workdir["cfg"].vocab_size, hidden=64)
  with pytest.raises(InferenceError, match="hidden_size: checkpoint 32 vs config 64"):
    restore(workdir["dir"], config=other)


def test_restore_in_a_one_device_process(workdir):
  code = ("import jax, numpy as np; from mor_jax.infer import restore; r = restore({d!r}); "
          "print(jax.device_count(), r.step, sum(float(np.abs(np.asarray(x)).sum()) "
          "for x in jax.tree.leaves(r.variables)))").format(d=workdir["dir"])
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  n, step, total = out.stdout.split()[-3:]
  want = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(workdir["saved"][20]))
  assert (int(n), int(step)) == (1, 20) and abs(float(total) - want) < 1e-3 * want


def test_tokenizer_checks(workdir, tmp_path):
  r = restore(workdir["dir"])
  tok = load_tokenizer(r.config, r.cfg)
  assert tok.vocab_size == r.cfg.vocab_size
  small = train_bpe([_words(500)], 270)
  small.save(str(tmp_path / "small"))
  c = _config(str(tmp_path / "small"), r.cfg.vocab_size)
  with pytest.raises(InferenceError, match="tokenizer/vocabulary mismatch"):
    load_tokenizer(c, r.cfg)
  c.data.tokenizer_path = str(tmp_path / "nothing")
  with pytest.raises(InferenceError, match="has no tokenizer.*--tokenizer=PATH"):
    load_tokenizer(c, r.cfg)


def test_generate_command(workdir, tmp_path, monkeypatch):
  monkeypatch.setenv("MOR_JAX_COMPILE_CACHE", "")
  common = dict(max_new_tokens=6, temperature=0.0)
  out, err = io.StringIO(), io.StringIO()
  [res] = main_generate(None, workdir["dir"], prompt="romeo and", stdout=out, stderr=err, **common)
  assert out.getvalue().startswith("romeo and") and out.getvalue().rstrip("\n").endswith(res.text)
  assert "step 20" in err.getvalue() and len(res.tokens) == 6 and 1 <= res.mean_recursions <= 2
  # the same greedy continuation through the Python API
  r = restore(workdir["dir"])
  g = Generator(r.cfg, r.variables, load_tokenizer(r.config, r.cfg))
  assert g.generate(["romeo and"], max_new_tokens=6, sampling=SamplingParams(0.0))[0].tokens == res.tokens

  # a prompts file in, JSONL out, in order (batches of 1 reuse the compiled programs; batching: test_infer_generate)
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("romeo and\n\nthe night\nlove\n")
  target = tmp_path / "out.jsonl"
  res = main_generate(None, workdir["dir"], prompts_file=str(prompts), output_file=str(target),
                      stdout=io.StringIO(), stderr=io.StringIO(), batch_size=1, **common)
  rows = [json.loads(l) for l in target.read_text().splitlines()]
  assert [x["index"] for x in rows] == [0, 1, 2] and [x["prompt"] for x in rows] == ["romeo and", "the night", "love"]
  assert rows[0]["tokens"] == res[0].tokens and all(x["generated_tokens"] == 6 for x in rows)
  jl = tmp_path / "prompts.jsonl"
  jl.write_text('{"prompt": "love"}\n"the night"\n')
  res2 = main_generate(None, workdir["dir"], prompts_file=str(jl), stdout=io.StringIO(), stderr=io.StringIO(),
                       batch_size=1, **common)
  assert [r.prompt for r in res2] == ["love", "the night"] and res2[1].tokens == res[1].tokens
  jl.write_text('{"prompt": "love"\n')
  with pytest.raises(InferenceError, match="prompts.jsonl:1: not valid JSON"):
    main_generate(None, workdir["dir"], prompts_file=str(jl), stdout=io.StringIO(), stderr=io.StringIO(), **common)

  # the prompt loop: a good prompt, an empty one (an error, the loop goes on), :quit
  err = io.StringIO()
  res = main_generate(None, workdir["dir"], interactive=True, stdin=io.StringIO("romeo and\n\nlove\n:quit\n"),
                      stdout=io.StringIO(), stderr=err, **common)
  assert len(res) == 2 and "error: prompt 0 is empty" in err.getvalue()

  with pytest.raises(InferenceError, match="exactly one of"):
    main_generate(None, workdir["dir"], **common)
  with pytest.raises(InferenceError, match="context is 64"):
    main_generate(None, workdir["dir"], prompt="romeo " * 80, stdout=io.StringIO(), stderr=io.StringIO(), **common)


def test_ignore_eos_reaches_every_kind_of_prompt(workdir, tmp_path, monkeypatch):
  """--ignore_eos applies to --prompt, --prompts_file and --prompt_ids alike (each generates max_new_tokens)."""
  from mor_jax.infer.generate import Generator as G
  seen, original = [], G.generate

  def spy(self, prompts, **kw):
    seen.append(kw.get("stop_at_eos", True))
    return original(self, prompts, **kw)
  monkeypatch.setattr(G, "generate", spy)
  monkeypatch.setenv("MOR_JAX_COMPILE_CACHE", "")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("romeo and\n")
  common = dict(max_new_tokens=3, temperature=0.0, ignore_eos=True, stdout=io.StringIO(), stderr=io.StringIO())
  for given in (dict(prompt="romeo and"), dict(prompts_file=str(prompts)), dict(prompt_ids="1,2,3")):
    main_generate(None, workdir["dir"], **given, **common)
  assert seen == [False, False, False]
