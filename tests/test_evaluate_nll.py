"""Validation NLL in both routing modes: numbers against a direct computation, 1 vs 4 devices, and the eval
command end to end on a trainer-format checkpoint written on 4 devices."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mor_jax import config as C
from mor_jax.data.tokenizer import train_bpe
from mor_jax.evaluate import evaluate_nll, main_eval
from mor_jax.model.transformer import MoRLM, init_variables
from mor_jax.checkpoint import Checkpointer
from mor_jax.train.state import TrainState
from tiny import tiny_config

SEQ = 32


pytestmark = pytest.mark.usefixtures("fast_compilation")


def words(n, seed=0):
  rng = np.random.default_rng(seed)
  syll = ["ro", "me", "o", "ju", "li", "et", "thou", "art", "the", "and", "to", "be", "or", "not", "love", "night"]
  return " ".join("".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(n))


def make_workdir(root, mor_type="expert"):
  """A local corpus, its BPE, and a workdir whose checkpoint (step 7, random params) was written on 4 devices."""
  corpus = root / "corpus"
  corpus.mkdir()
  for i in range(3):
    (corpus / f"train{i}.txt").write_text(words(400, i))
  (corpus / "val.txt").write_text(words(150, 9))
  tok = train_bpe([words(2000, s) for s in range(3)], 300)
  tok.save(str(root / "tokenizer"))
  c = tiny_config("middle_cycle", 2, mor_type, vocab=tok.vocab_size, max_seq_len=64)
  c.name = "tiny-eval-test"
  c.data.update(corpus="local", path=str(corpus), val_files=("val.txt",), tokenizer_path=str(root / "tokenizer"),
                seq_len=SEQ, data_dir=str(root / "prepared"))
  c.train.update(total_batch_size=8, per_device_batch_size=2)
  vc = C.validate(c, num_devices=4)
  cfg = C.model_config(vc)
  variables = init_variables(cfg, jax.random.PRNGKey(3))
  rng = np.random.default_rng(5)   # larger weights than init so routers and logits are far from uniform
  params = jax.tree.map(lambda a: np.asarray(rng.normal(0, 0.3, a.shape), np.float32), variables["params"])
  mesh = Mesh(np.array(jax.devices()[:4]), ("d",))
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("d") if a.shape and a.shape[0] % 4 == 0
                                                    else PartitionSpec()))
  sharded = jax.tree.map(shard, params)
  bias = dict(variables.get("router_bias", {}))
  state = TrainState(step=jnp.int32(7), params=sharded, opt_state=optax.sgd(1e-3).init(sharded),
                     router_bias=bias, rng=jax.random.PRNGKey(0))
  ck = Checkpointer(str(root / "w" / "checkpoints"), max_to_keep=None, async_save=False)
  ck.save(7, state, {"position": 7}, {"config": json.loads(vc.to_json_best_effort()),
                                      "model_config": json.loads(json.dumps(dataclasses.asdict(cfg)))})
  ck.close()
  v = {"params": params}
  if bias:
    v["router_bias"] = {k: np.asarray(x) for k, x in bias.items()}
  return {"dir": str(root / "w"), "config": c, "cfg": cfg, "variables": v, "tokenizer": tok}


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("evalnll"))


def _batches(seed=0, n=3, rows=6, vocab=300):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(0, vocab, (rows, SEQ + 1)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[-1, 20:] = 0                      # a padded tail
    seg[-2, :] = 0                        # an all-padding row
    out.append({"tokens": tokens, "segment_ids": seg, "positions": np.tile(np.arange(SEQ + 1, dtype=np.int32),
                                                                        (rows, 1))})
  return out


def _direct(cfg, variables, batches, mode, step):
  """Reference: apply the model to every row alone (batch of 1), sum -log p of counted targets in float64."""
  model = MoRLM(cfg)
  f = jax.jit(lambda v, t: model.apply(v, t, routing_mode=mode, step=jnp.int32(step)))
  nll = count = rec = 0.0
  for b in batches:
    for row, seg in zip(b["tokens"], b["segment_ids"]):
      logits, aux = f(variables, jnp.asarray(row[None, :-1]))
      logp = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
      m = seg[1:] > 0
      nll -= logp[np.arange(SEQ), row[1:]][m].sum()
      count += m.sum()
      rec += float(aux["mean_recursions"]) * m.sum()
  return nll / count, count, rec / count


def test_nll_both_modes_match_direct_computation_and_device_counts(wd):
  cfg, v = wd["cfg"], wd["variables"]
  batches = _batches(vocab=cfg.vocab_size)
  r4 = evaluate_nll(cfg, v, batches, step=7, devices=jax.local_devices()[:4])
  r1 = evaluate_nll(cfg, v, batches, step=7, devices=jax.local_devices()[:1])
  for mode in ("topk", "causal"):
    want_nll, want_count, want_rec = _direct(cfg, v, batches, mode, 7)
    got = r4[mode]
    assert got["tokens"] == want_count == 3 * (4 * SEQ + 19)
    np.testing.assert_allclose(got["nll"], want_nll, rtol=2e-6)
    np.testing.assert_allclose(got["perplexity"], math.exp(want_nll), rtol=5e-6)
    np.testing.assert_allclose(got["mean_recursions"], want_rec, rtol=1e-6)
    for k in ("nll", "tokens", "mean_recursions"):
      assert r1[mode][k] == pytest.approx(got[k], rel=1e-6, abs=0), (mode, k)
  assert r4["num_devices"] == 4 and r1["num_devices"] == 1 and r4["batches"] == 3
  assert r4["gap"] == pytest.approx(r4["causal"]["nll"] - r4["topk"]["nll"])
  # top-k at capacities (1, 0.5): 1.5 recursions per token by construction; causal routing differs
  assert r4["topk"]["mean_recursions"] == pytest.approx(sum(cfg.selected_fractions))
  assert r4["causal"]["mean_recursions"] != pytest.approx(r4["topk"]["mean_recursions"])
  assert abs(r4["gap"]) > 1e-4


def test_main_eval_end_to_end(wd, capsys):
  res = main_eval(None, wd["dir"], progress=False)
  out = capsys.readouterr().out
  assert "top-k (training)" in out and "causal (threshold)" in out and "gap (causal - top-k)" in out
  saved = json.load(open(os.path.join(wd["dir"], "eval_results_step7.json")))
  assert saved["step"] == 7 and saved["gap"] == pytest.approx(saved["causal"]["nll"] - saved["topk"]["nll"])
  assert res["topk"]["tokens"] > 100 and np.isfinite(res["topk"]["nll"]) and np.isfinite(res["causal"]["nll"])
  # the same split through the direct reference
  from mor_jax import data as data_lib
  batches = list(data_lib.make_iterator(wd["config"], "validation", global_batch_size=8, num_epochs=1))
  for mode in ("topk", "causal"):
    want, count, _ = _direct(wd["cfg"], wd["variables"], batches, mode, 7)
    assert res[mode]["tokens"] == count
    np.testing.assert_allclose(res[mode]["nll"], want, rtol=2e-6)
  one = main_eval(None, wd["dir"], progress=False, devices=jax.local_devices()[:1])
  assert one["topk"]["nll"] == pytest.approx(res["topk"]["nll"], rel=1e-6)
  assert one["causal"]["nll"] == pytest.approx(res["causal"]["nll"], rel=1e-6)
