"""The lm-evaluation-harness adapter: loglikelihood against the model's own token log-probabilities, rolling
windows, and the shipped local multiple-choice task through lm_eval.simple_evaluate (offline)."""

import functools
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "lm_eval_tasks")


pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
  return make_workdir(tmp_path_factory.mktemp("evalharness"))


@pytest.fixture(scope="module")
def lm(wd):
  return harness.MoRJaxLM(workdir=wd["dir"], batch_size=4)


@functools.lru_cache(maxsize=None)
def _causal_logits(cfg):
  """The plain model's forward with causal routing, jitted (one compile per sequence length: run op by op,
  the direct sums below took most of this module's time)."""
  return jax.jit(lambda variables, t: MoRLM(cfg).apply(variables, t, routing_mode="causal")[0])


def _direct_logprob_sum(cfg, variables, ids, n_scored):
  """sum log p of the last n_scored tokens of `ids`, from one unpadded forward pass with causal routing."""
  t = jnp.asarray([ids], jnp.int32)
  logits = _causal_logits(cfg)(variables, t[:, :-1])
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
  logits = _causal_logits(wd["cfg"])(wd["variables"], t)
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
  want = 0.0
  for s in range(0, len(ids), 8):
    chunk = ids[s:s + 8]
    ctx = ([tok.eos_id] + ids)[max(0, s + len(chunk) - 8):s + 1] if s else [tok.eos_id]
    seq = ctx + chunk
    seq = seq[-(8 + 1):]
    want += _direct_logprob_sum(cfg, v, seq, len(chunk))
  assert windowed == pytest.approx(want, abs=5e-4)
  assert abs(windowed - full) > 1e-3            # less context: a different (here: the windowed) value


@pytest.fixture(scope="module")
def task_dir():
  """The shipped task, as it is: its data_files path is relative to the repository root (the tests that run it
  work there, as the documented command does)."""
  import pathlib
  return pathlib.Path(DATA)


@pytest.fixture(scope="module")
def direct_mc_accuracy(wd, lm, task_dir):
  return _direct_mc_accuracy(wd, lm, task_dir)


def _direct_mc_accuracy(wd, lm, task_dir):
  """argmax over choices of log p(" " + choice | question), computed from the model directly."""
  docs = [json.loads(l) for l in open(task_dir / "tiny_mc.jsonl")]
  hits = 0
  for d in docs:
    scores = []
    for ch in d["choices"]:
      c, k = lm._encode_pair(d["question"], " " + ch)
      scores.append(_direct_logprob_sum(wd["cfg"], wd["variables"], c + k, len(k)))
    hits += int(np.argmax(scores) == d["answer"])
  return hits / len(docs)


def test_local_multiple_choice_task_through_simple_evaluate(wd, task_dir, direct_mc_accuracy, monkeypatch):
  from lm_eval.tasks import TaskManager
  monkeypatch.chdir(ROOT)
  tm = TaskManager(include_path=str(task_dir), include_defaults=False)   # skip indexing ~10k stock tasks
  res = lm_eval.simple_evaluate(model="mor_jax", model_args={"workdir": wd["dir"], "batch_size": 4},
                                tasks=["mor_tiny_mc"], num_fewshot=0, task_manager=tm, bootstrap_iters=0,
                                log_samples=False)
  acc = res["results"]["mor_tiny_mc"]["acc,none"]
  assert acc == pytest.approx(direct_mc_accuracy)


def _pth_installed():
  import site
  dirs = site.getsitepackages() + [site.getusersitepackages()]
  return any(os.path.exists(os.path.join(d, "mor_jax_lm_eval.pth")) for d in dirs)


def test_lm_eval_cli_knows_mor_jax(wd, task_dir, direct_mc_accuracy, tmp_path):
  """`lm_eval run --model mor_jax ...` in a fresh interpreter, from the repository root with the shipped task dir
  given as docs/inference.md writes it (`--include_path tests/data/lm_eval_tasks`): the installed .pth hook
  registers the model and the task's data file is found.

  Without an installed package (a plain checkout), the same hook is installed by hand first; a non-editable
  `pip install .` (what .ci/run does) ships the .pth, and then the real `lm_eval` executable is used.
  """
  import subprocess
  import sys
  args = ["run", "--model", "mor_jax", "--model_args", f"workdir={wd['dir']}", "--batch_size", "4", "--tasks",
          "mor_tiny_mc", "--include_path", "tests/data/lm_eval_tasks", "--output_path", str(tmp_path / "out")]
  exe = shutil.which("lm_eval", path=os.path.dirname(sys.executable))
  if _pth_installed() and exe:
    cmd = [exe] + args
  else:
    cmd = [sys.executable, "-c", "import sys, mor_jax.evaluate.lm_eval_hook as h; h.install(); "
           "from lm_eval.__main__ import cli_evaluate; sys.argv = ['lm_eval'] + sys.argv[1:]; cli_evaluate()"] + args
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", HF_DATASETS_OFFLINE="1",
             PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         os.environ.get("PYTHONPATH", "")]))
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  results = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "out") for f in fs if f.startswith("results")]
  assert results, out.stdout[-2000:]
  acc = json.load(open(results[0]))["results"]["mor_tiny_mc"]["acc,none"]
  assert acc == pytest.approx(direct_mc_accuracy)


def test_hook_registers_lazily():
  """install() adds an import hook only; the registry gets a lazy "module:Class" entry when lm_eval loads it."""
  from mor_jax.evaluate import lm_eval_hook
  from lm_eval.api.registry import get_model
  lm_eval_hook.install()   # lm_eval's registry is already imported here: registers directly
  assert get_model("mor_jax") is harness.MoRJaxLM


def test_generate_until(wd, lm):
  out = lm.generate_until([_req("thou art", {"until": ["\n"], "max_gen_toks": 5})])
  assert len(out) == 1 and isinstance(out[0], str) and "\n" not in out[0]
