"""Tokenizers: trained byte-level BPE, the SmolLM tokenizer, vocab checks."""

import os
import pickle

import pytest

from mor_jax.data import (DataError, get_tokenizer, load_tokenizer,
                          tokenizer_path_for)
from mor_jax.data import tokenizer as tokenizer_lib
from tiny import tiny_config

SMOLLM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tokenizers",
                      "smollm")   # the repository's copy of the SmolLM tokenizer
WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly "
         "hum jazz vexing bold nymphs and a sphinx of black quartz judges "
         "my vow").split()
ROUND_TRIP = [
    "To be, or not to be: that is the question.",
    "  leading spaces,\ttabs\nand\r\nnewlines\n\n",
    "Unicode: café, naïve, 東京, emoji 🎭🗡️, combining é",
    "",
    "<|endoftext|> literal special token text",
]


def _corpus_texts(n=60):
  return [" ".join(WORDS[(i * 5 + j * 7) % len(WORDS)] for j in range(80))
          for i in range(n)]


def _config(tmp_path, vocab=300, **data):
  c = tiny_config(vocab=vocab, data__data_dir=str(tmp_path / "prepared"), data__corpus="local")
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _write_corpus(d):
  d.mkdir()
  for i, t in enumerate(_corpus_texts()):
    (d / f"{i:02d}.txt").write_text(t)


def test_trained_bpe_round_trip_and_specials():
  tok = tokenizer_lib.train_bpe(_corpus_texts(), 300)
  assert tok.vocab_size == 300
  assert tok.eos_id == 0 and tok.bos_id == 0
  for s in ROUND_TRIP:
    ids = tok.encode(s)
    assert all(0 <= i < 300 for i in ids)
    assert tok.decode(ids) == s.replace("<|endoftext|>", "")
  # The EOS string in text is encoded as the special token (and dropped by
  # decode); ordinary text never produces it.
  assert tok.eos_id not in tok.encode(" ".join(WORDS))
  # Merges learned: common words compress below one token per byte.
  text = " ".join(WORDS)
  assert len(tok.encode(text)) < 0.6 * len(text.encode())
  tok2 = pickle.loads(pickle.dumps(tok))
  assert tok2.encode(text) == tok.encode(text) and tok2.eos_id == tok.eos_id


def test_smollm_tokenizer(tmp_path):
  c = _config(tmp_path, vocab=49152, tokenizer_path=SMOLLM)
  tok = get_tokenizer(c)
  assert tok.vocab_size == 49152
  assert tok.encode("The future of AI is") == [504, 1774, 282, 5646, 314]
  assert tok.eos_id == 0 and tok.bos_id == 0
  for s in ROUND_TRIP[:4]:
    assert tok.decode(tok.encode(s)) == s
  assert tokenizer_path_for(c) == os.path.join(SMOLLM, "tokenizer.json")
  # Saved copies load to the same tokenizer.
  tok.save(str(tmp_path / "copy"))
  again = load_tokenizer(str(tmp_path / "copy"))
  assert again.encode(ROUND_TRIP[2]) == tok.encode(ROUND_TRIP[2])
  assert (again.eos_id, again.bos_id) == (0, 0)


def test_vocab_mismatch_is_a_clear_error(tmp_path):
  c = _config(tmp_path, vocab=32000, tokenizer_path=SMOLLM)
  with pytest.raises(ValueError, match=r"49152.*32000.*vocab_size=49152"):
    get_tokenizer(c)


def test_missing_tokenizer_path(tmp_path):
  missing = tmp_path / "no" / "such" / "tok"
  c = _config(tmp_path, tokenizer_path=str(missing))
  with pytest.raises(DataError, match=f"{missing}.*tokenizer_path"):
    get_tokenizer(c)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(DataError, match="bad.json"):
    get_tokenizer(_config(tmp_path, tokenizer_path=str(bad)))


def test_get_tokenizer_trains_once_and_reuses(tmp_path):
  _write_corpus(tmp_path / "corpus")
  c = _config(tmp_path, path=str(tmp_path / "corpus"), val_files=("00.txt",))
  path = tokenizer_path_for(c)
  assert not os.path.exists(path)
  tok = get_tokenizer(c)
  assert os.path.isfile(path) and tok.source == path
  assert tok.vocab_size == 300
  stamp = os.path.getmtime(path)
  tok2 = get_tokenizer(c)
  assert os.path.getmtime(path) == stamp
  assert tok2.encode(ROUND_TRIP[0]) == tok.encode(ROUND_TRIP[0])
  # Another model vocabulary trains (and stores) another tokenizer.
  c.model.vocab_size = 320
  assert tokenizer_path_for(c) != path
  assert get_tokenizer(c).vocab_size == 320


def test_corpus_too_small_for_vocab(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "a.txt").write_text("ab " * 50)
  (d / "b.txt").write_text("ab ab")
  c = _config(tmp_path, vocab=4096, path=str(d), val_files=("b.txt",))
  with pytest.raises(DataError, match="too small.*4096"):
    get_tokenizer(c)
  c.model.vocab_size = 100
  with pytest.raises(DataError, match="at least 257"):
    get_tokenizer(c)


def test_add_bos_needs_a_bos_token(tmp_path):
  tok = tokenizer_lib.train_bpe(_corpus_texts(), 300)
  tok.hf_tokenizer.save(str(tmp_path / "plain.json"))  # no side files
  plain = load_tokenizer(str(tmp_path / "plain.json"))
  assert plain.eos_id == 0 and plain.bos_id is None
  c = _config(tmp_path, tokenizer_path=str(tmp_path / "plain.json"),
              add_bos=True)
  with pytest.raises(DataError, match="add_bos.*bos_token"):
    get_tokenizer(c)
  c.data.bos_token = "<|endoftext|>"
  assert get_tokenizer(c).bos_id == 0
  c.data.eos_token = "<nope>"
  with pytest.raises(DataError, match="<nope>.*eos_token"):
    get_tokenizer(c)
