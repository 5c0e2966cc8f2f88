"""The lm-evaluation-harness adapter: loglikelihood against the model's own token log-probabilities, rolling
windows, and the shipped local multiple-choice task through lm_eval.simple_evaluate (offline)."""

import json
import os
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install -r requirements-eval.txt")

from mor_jax.evaluate import harness  # noqa: E402  (registers "mor_jax")
from mor_jax.model.transformer import MoRLM  # noqa: E402
from tests.test_evaluate_nll import make_workdir  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "lm_eval_tasks")


pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("evalharness"))


@pytest.fixture(scope="module")
def lm(wd):
  return harness.MoRJaxLM(workdir=wd["dir"], batch_size=4)


def _direct_logprob_sum(cfg, variables, ids, n_scored):
  """sum log p of the last n_scored tokens of `ids`, from one unpadded forward pass with causal routing."""
  t = jnp.asarray([ids], jnp.int32)
  logits, _ = MoRLM(cfg).apply(variables, t[:, :-1], routing_mode="causal")
  logp = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
  tgt = logp[np.arange(len(ids) - 1), np.asarray(ids[1:])]
  return float(tgt[-n_scored:].sum())


def _req(*args):
  return types.SimpleNamespace(args=args)


def test_loglikelihood_equals_direct_sum(wd, lm):
  tok = wd["tokenizer"]
  reqs = [("thou art the", " night"), ("o romeo romeo wherefore art", " thou romeo and juliet"),
          ("", "love me or not"), ("to be or not to be ", "the night")]
  got = lm.loglikelihood([_req(*r) for r in reqs])
  assert len(got) == 4
  for (ctx, cont), (ll, _) in zip(reqs, got):
    c, k = lm._encode_pair(ctx, cont)
    assert c + k == tok.encode(ctx + cont) and len(k) > 0
    c = c or [tok.eos_id]
    want = _direct_logprob_sum(wd["cfg"], wd["variables"], c + k, len(k))
    assert ll == pytest.approx(want, abs=2e-4), (ctx, cont)
    assert ll < 0
  # is_greedy agrees with argmax of the direct logits for a one-token continuation
  ids = tok.encode("thou art the")
  t = jnp.asarray([ids], jnp.int32)
  logits, _ = MoRLM(wd["cfg"]).apply(wd["variables"], t, routing_mode="causal")
  best = int(jnp.argmax(logits[0, -1]))
  (_, greedy), = lm.score_tokens([(ids, [best])])
  assert greedy


def test_rolling_loglikelihood(wd, lm):
  tok, cfg, v = wd["tokenizer"], wd["cfg"], wd["variables"]
  text = "o romeo romeo wherefore art thou romeo and juliet to be or not to be the night and love me"
  ids = tok.encode(text)
  assert 16 < len(ids) < cfg.max_seq_len
  full = _direct_logprob_sum(cfg, v, [tok.eos_id] + ids, len(ids))
  (got,) = lm.loglikelihood_rolling([_req(text)])
  assert got == pytest.approx(full, abs=2e-4)       # fits in one window: the full-sequence value
  small = harness.MoRJaxLM(cfg=cfg, variables=v, tokenizer=tok, max_length=8, batch_size=4)
  (windowed,) = small.loglikelihood_rolling([_req(text)])
  # windows of 8 predicted tokens, each conditioned only on the window's own tokens
  want, prev = 0.0, [tok.eos_id]
  for s in range(0, len(ids), 8):
    chunk = ids[s:s + 8]
    ctx = ([tok.eos_id] + ids)[max(0, s + len(chunk) - 8):s + 1] if s else [tok.eos_id]
    seq = ctx + chunk
    seq = seq[-(8 + 1):]
    want += _direct_logprob_sum(cfg, v, seq, len(chunk))
  assert windowed == pytest.approx(want, abs=5e-4)
  assert abs(windowed - full) > 1e-3            # less context: a different (here: the windowed) value


def test_local_multiple_choice_task_through_simple_evaluate(wd, lm, tmp_path):
  task_dir = tmp_path / "tasks"
  task_dir.mkdir()
  shutil.copy(os.path.join(DATA, "tiny_mc.jsonl"), task_dir / "tiny_mc.jsonl")
  yaml = open(os.path.join(DATA, "tiny_mc.yaml")).read().replace("test: tiny_mc.jsonl",
                                                                  f"test: {task_dir / 'tiny_mc.jsonl'}")
  (task_dir / "tiny_mc.yaml").write_text(yaml)
  from lm_eval.tasks import TaskManager
  tm = TaskManager(include_path=str(task_dir), include_defaults=False)   # skip indexing ~10k stock tasks
  res = lm_eval.simple_evaluate(model="mor_jax", model_args={"workdir": wd["dir"], "batch_size": 4},
                                tasks=["mor_tiny_mc"], num_fewshot=0, task_manager=tm, bootstrap_iters=0,
                                log_samples=False)
  acc = res["results"]["mor_tiny_mc"]["acc,none"]
  # direct: argmax over choices of log p(" " + choice | question)
  tok = wd["tokenizer"]
  docs = [json.loads(l) for l in open(task_dir / "tiny_mc.jsonl")]
  hits = 0
  for d in docs:
    scores = []
    for ch in d["choices"]:
      c, k = lm._encode_pair(d["question"], " " + ch)
      scores.append(_direct_logprob_sum(wd["cfg"], wd["variables"], c + k, len(k)))
    hits += int(np.argmax(scores) == d["answer"])
  assert acc == pytest.approx(hits / len(docs))


def test_generate_until(wd, lm):
  out = lm.generate_until([_req("thou art", {"until": ["\n"], "max_gen_toks": 5})])
  assert len(out) == 1 and isinstance(out[0], str) and "\n" not in out[0]
