"""A workdir carries its model's tokenizer (issue 24, item 1): WORKDIR/tokenizer/ is written at train and
import time and recorded in the checkpoint's meta (vocabulary size, sha256); generate and eval look there
first; --tokenizer supplies or overrides it (refused when its vocabulary does not fit the model) and
--prompt_ids generates from token ids for a model without one."""

import hashlib
import io
import os
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mor_jax.checkpoint import find_checkpoints, read_meta
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.evaluate import main_eval
from mor_jax.infer import Generator, InferenceError, SamplingParams, main_generate, restore
from mor_jax.interop import importer
from test_interop_import import MOR, reference_dir
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM = os.path.join(ROOT, "assets", "tokenizers", "smollm")     # 49152 tokens: fits no tiny model

pytestmark = pytest.mark.usefixtures("fast_compilation")


def word_tokenizer(directory, vocab):
  """A word-level tokenizer w0 .. w{vocab-2} + <|endoftext|> (byte-level BPE needs >= 257 tokens)."""
  words = {f"w{i}": i for i in range(vocab - 1)}
  words["<|endoftext|>"] = vocab - 1
  tok = Tokenizer(models.WordLevel(words, unk_token="<|endoftext|>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  return directory


def generate(workdir, **kw):
  out, err = io.StringIO(), io.StringIO()
  res = main_generate(None, workdir, max_new_tokens=4, temperature=0.0, stdout=out, stderr=err, **kw)
  return res[0], out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A PyTorch-reference output (no tokenizer files) imported into a workdir (vocabulary 256)."""
  root = tmp_path_factory.mktemp("imported")
  lines = []
  importer.import_reference(reference_dir(MOR, str(root / "run")), str(root / "w"), log=lines.append)
  return {"workdir": str(root / "w"), "lines": lines}


def test_a_model_without_tokenizer_says_what_to_pass(imported):
  w = imported["workdir"]
  assert any("--tokenizer=PATH" in ln and "--prompt_ids" in ln for ln in imported["lines"])
  assert not os.path.exists(os.path.join(w, "tokenizer"))
  assert "tokenizer" not in read_meta(os.path.join(w, "checkpoints", "0"))
  with pytest.raises(InferenceError) as e:
    generate(w, prompt="hello")
  msg = str(e.value)
  assert "\n" not in msg and "--tokenizer=PATH" in msg and "--prompt_ids=1,2,3" in msg
  assert "assets/tokenizers/smollm" in msg and "mor_shakespeare" not in msg and "/work/" not in msg


def test_prompt_ids_generate_ids(imported):
  w = imported["workdir"]
  res, out, _ = generate(w, prompt_ids="1,2,3")
  assert res.prompt_tokens == [1, 2, 3] and len(res.tokens) == 4      # no tokenizer: no EOS, 4 new tokens
  assert out.strip() == ",".join(str(t) for t in res.tokens)
  r = restore(w)
  direct = Generator(r.cfg, r.variables).generate([[1, 2, 3]], max_new_tokens=4, sampling=SamplingParams(0.0, 0, 1.0))
  assert direct[0].tokens == res.tokens
  for bad in ("1,x", "-1", ""):
    with pytest.raises(InferenceError, match="--prompt_ids=.* is not valid"):
      generate(w, prompt_ids=bad)
  with pytest.raises(InferenceError, match="exactly one of"):
    generate(w, prompt_ids="1", prompt="x")


def test_tokenizer_flag_supplies_it_and_refuses_a_wrong_vocabulary(imported, tmp_path):
  w = imported["workdir"]
  with pytest.raises(InferenceError) as e:
    generate(w, prompt="hello", tokenizer=SMOLLM)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"--tokenizer={SMOLLM}: tokenizer/vocabulary mismatch")
  assert "has 49152 tokens but the model's vocabulary is 256" in msg
  with pytest.raises(InferenceError, match="--tokenizer=.*: tokenizer/vocabulary mismatch"):
    main_eval(None, w, tokenizer=SMOLLM, progress=False)             # eval checks before reading any data
  with pytest.raises(InferenceError, match="no tokenizer.json there"):
    generate(w, prompt="hello", tokenizer=str(tmp_path / "missing"))
  fits = word_tokenizer(str(tmp_path / "words"), 256)
  ids, _, _ = generate(w, prompt_ids="1,2,3")
  for given in (fits, os.path.join(fits, "tokenizer.json")):          # a folder or the file itself
    res, out, _ = generate(w, prompt="w1 w2 w3", tokenizer=given)
    assert res.prompt_tokens == [1, 2, 3]
    assert res.tokens == ids.tokens[:len(res.tokens)] and res.tokens  # the same model, same greedy ids
    assert out.startswith("w1 w2 w3")


def test_trained_workdir_generates_without_its_data(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  text = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog and the cat." for i in range(100))
  for i in range(10):
    (corpus / f"{i}.txt").write_text(text)
  c = tiny_config(vocab=300, seq_len=16, data__corpus="local", data__path=str(corpus),
                  data__data_dir=str(tmp_path / "data"), data__val_files=("0.txt",), train__num_steps=2,
                  train__total_batch_size=8, train__per_device_batch_size=2, train__warmup_steps=1,
                  train__eval_every_steps=0, train__eval_sequences=8, train__save_every_steps=2,
                  train__progress_bar=False)
  from mor_jax import train  # pylint: disable=g-import-not-at-top
  w = str(tmp_path / "w")
  train.train_and_evaluate(c, w)
  stored = os.path.join(w, "tokenizer", "tokenizer.json")
  assert os.path.isfile(stored) and os.path.isfile(os.path.join(w, "tokenizer", "mor_tokenizer.json"))
  ckpt_dir, steps = find_checkpoints(w)
  record = read_meta(os.path.join(ckpt_dir, str(steps[-1])))["tokenizer"]
  with open(stored, "rb") as f:
    assert record == {"path": "tokenizer", "vocab_size": 300, "sha256": hashlib.sha256(f.read()).hexdigest()}
  before, _, _ = generate(w, prompt="line 3: the")
  shutil.rmtree(tmp_path / "data")                     # the prepared corpus and its trained BPE are gone
  after, out, _ = generate(w, prompt="line 3: the")
  assert after.tokens == before.tokens and out.startswith("line 3: the")
  assert after.text == before.text and isinstance(after.text, str)
  with pytest.raises(InferenceError, match="tokenizer/vocabulary mismatch"):
    generate(w, prompt="x", tokenizer=SMOLLM)


def test_store_tokenizer_copies_the_hf_files(tmp_path):
  rec = ckpt_params.store_tokenizer(str(tmp_path / "w"), SMOLLM)
  assert sorted(os.listdir(tmp_path / "w" / "tokenizer")) == ["special_tokens_map.json", "tokenizer.json",
                                                              "tokenizer_config.json"]
  assert rec["tokenizer"]["vocab_size"] == 49152 and len(rec["tokenizer"]["sha256"]) == 64
  assert ckpt_params.store_tokenizer(str(tmp_path / "v"), str(tmp_path / "nothing")) == {}


TINY_MAIN = """
from mor_jax import config as C

def get_config():
  c = C.defaults()
  c.model.update(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=64)
  c.data.update(corpus="local", path={path!r}, data_dir={data!r}, seq_len=16, val_files=("0.txt",))
  return c
"""


def test_store_tokenizer_never_replaces_a_different_one(tmp_path):
  """A workdir's tokenizer (e.g. an imported model's) is not overwritten by another one at the next run."""
  w = str(tmp_path / "w")
  first = ckpt_params.store_tokenizer(w, SMOLLM)
  other = tmp_path / "other"
  other.mkdir()
  (other / "tokenizer.json").write_text('{"different": true}')
  assert ckpt_params.store_tokenizer(w, str(other)) == first
  kept = os.path.join(w, "tokenizer", "tokenizer.json")
  with open(os.path.join(SMOLLM, "tokenizer.json"), "rb") as a, open(kept, "rb") as b:
    assert a.read() == b.read()


def test_prepare_with_a_workdir_stores_the_tokenizer(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  (tmp_path / "corpus").mkdir()
  for i in range(4):
    (tmp_path / "corpus" / f"{i}.txt").write_text(" ".join(f"line {i} {j}: the quick brown fox." for j in range(300)))
  cfg = tmp_path / "tiny_main.py"
  cfg.write_text(TINY_MAIN.format(path=str(tmp_path / "corpus"), data=str(tmp_path / "data")))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--mode=prepare", f"--config={cfg}",
                      f"--workdir={tmp_path / 'w'}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert r.returncode == 0, r.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / "w" / "tokenizer")) == ["mor_tokenizer.json", "tokenizer.json"]
  assert Tokenizer.from_file(str(tmp_path / "w" / "tokenizer" / "tokenizer.json")).get_vocab_size() == 300
