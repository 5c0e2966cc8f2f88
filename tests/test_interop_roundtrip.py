"""An MoR export re-imports as its README says (issue 24, item 2): `--mode=export_hf` then `--mode=import
--import_from=THIS_DIR` with no --config gives a workdir that generates the same greedy text, token for token."""

import io
import json
import os
import subprocess
import sys

import jax
import pytest

from mor_jax.checkpoint import params as ckpt_params
from mor_jax.data.tokenizer import train_bpe
from mor_jax.infer import main_generate
from mor_jax.interop import exporter, importer, layout
from mor_jax.model.transformer import init_variables
from tiny import tiny_config, tiny_model_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "romeo and juliet"

pytestmark = pytest.mark.usefixtures("fast_compilation")


def greedy(workdir):
  out = io.StringIO()
  res = main_generate(None, workdir, prompt=PROMPT, max_new_tokens=12, temperature=0.0, stdout=out,
                      stderr=io.StringIO())[0]
  return res.tokens, out.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A random-init MoR model (expert-choice, R=2, add_bos) with its BPE written as a workdir, then exported."""
  root = tmp_path_factory.mktemp("roundtrip")
  words = [a + b for a in ("ro", "me", "ju", "li", "et", "th", "ou", "ar", "ni", "gh") for b in ("a", "e", "o", "st")]
  tok = train_bpe([" ".join(words[i % 40] + words[(i * 7) % 40] for i in range(4000))], 300)
  assert tok.vocab_size == 300
  tok.save(str(root / "bpe"))
  kw = dict(vocab=300, seq_len=16, data__tokenizer_path=str(root / "bpe"), data__add_bos=True)
  c = tiny_config("middle_cycle", 2, "expert", **kw)
  cfg = tiny_model_config("middle_cycle", 2, "expert", **kw)
  params = layout.to_stacked_layout(cfg, jax.device_get(init_variables(cfg, jax.random.PRNGKey(3))["params"]))
  w = str(root / "w")
  ckpt_params.store_tokenizer(w, config=c)
  importer.write_checkpoint(c, params, w)
  out = exporter.export_hf(w, str(root / "hf"), log=lambda _: None)
  return {"root": root, "workdir": w, "hf": out.directory}


def test_export_reimports_as_documented_and_generates_the_same(exported):
  with open(os.path.join(exported["hf"], "README.md")) as f:
    assert "--mode=import --import_from=THIS_DIR" in f.read()
  hfc = json.load(open(os.path.join(exported["hf"], "config.json")))
  assert hfc["mor_jax"]["data"] == {"seq_len": 16, "add_bos": True}
  assert hfc["mor_jax"]["name"] == "tiny"
  back = str(exported["root"] / "back")
  res = importer.import_reference(exported["hf"], back, log=lambda _: None)   # no --config
  assert res.config.name == "tiny"                                            # the run keeps its name
  assert os.path.isfile(os.path.join(back, "tokenizer", "tokenizer.json"))
  want, text = greedy(exported["workdir"])
  got, text_back = greedy(back)
  assert len(want) == 12 and got == want and text_back == text


def test_older_export_without_data_settings_reimports(exported, tmp_path):
  """Exports written before the data section: the default seq_len (1024) is clamped to the model's context."""
  old = tmp_path / "old"
  old.mkdir()
  for name in os.listdir(exported["hf"]):
    data = open(os.path.join(exported["hf"], name), "rb").read()
    if name == "config.json":
      hfc = json.loads(data)
      del hfc["mor_jax"]["data"]
      data = json.dumps(hfc).encode()
    (old / name).write_bytes(data)
  res = importer.import_reference(str(old), str(tmp_path / "w"), log=lambda _: None)
  assert res.config.data.seq_len == 64                                      # tiny max_seq_len


def test_main_py_export_then_import_then_generate(exported, tmp_path):
  """The commands as the README and mor_note write them (subprocesses, one CPU device)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", MOR_JAX_COMPILE_CACHE="")
  run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *a], capture_output=True,
                                  text=True, timeout=300, env=env, cwd=ROOT)
  r = run("--mode=import", f"--import_from={exported['hf']}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 0, r.stderr[-2000:]
  r = run("--mode=generate", f"--workdir={tmp_path / 'w'}", f"--prompt={PROMPT}", "--max_new_tokens=12",
          "--temperature=0")
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == greedy(exported["workdir"])[1].strip()
