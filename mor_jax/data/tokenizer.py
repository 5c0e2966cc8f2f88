"""Tokenizers: a Hugging Face `tokenizer.json`, or a byte-level BPE we train.

`get_tokenizer(config)` returns the tokenizer that training, evaluation and
generation share:

* `config.data.tokenizer_path` set: a `tokenizer.json` file or a directory
  holding one (e.g. assets/tokenizers/smollm). EOS/BOS come from
  `config.data.eos_token`/`bos_token`, else the directory's
  `tokenizer_config.json`/`special_tokens_map.json`, else well-known names.
* empty: a byte-level BPE with `config.model.vocab_size` tokens is trained on
  the corpus's training split and stored next to the prepared dataset
  (`<dataset dir>/tokenizer-bpe<V>-<hash>/tokenizer.json`); later calls load it.

Either way the vocabulary must equal `config.model.vocab_size`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from absl import logging

from mor_jax import files as files_lib
from mor_jax.data import corpus as corpus_lib
from mor_jax.data.common import read_json, short_hash
from mor_jax.errors import DataError

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>",
                   "<|eos|>", "[SEP]")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[CLS]")
BPE_FORMAT_VERSION = 1


def _special(value) -> str | None:
  if isinstance(value, dict):  # {"content": "<s>", ...}
    value = value.get("content")
  return value if isinstance(value, str) and value else None


class Tokenizer:
  """A `tokenizers.Tokenizer` plus the ids the pipeline needs.

  encode(str) -> list[int] adds no special tokens; decode(ids) -> str drops
  special tokens. Pickles as its JSON (for grain worker processes).
  """

  def __init__(self, tok, *, eos_token: str, bos_token: str | None = None,
               source: str = ""):
    self._tok = tok
    self.source = source
    self.eos_token, self.bos_token = eos_token, bos_token
    self.eos_id = self._id(eos_token, "EOS", "config.data.eos_token")
    self.bos_id = (None if bos_token is None else
                   self._id(bos_token, "BOS", "config.data.bos_token"))

  def _id(self, token, what, field):
    i = self._tok.token_to_id(token)
    if i is None:
      raise DataError(
          f"the {what} token {token!r} is not in the tokenizer "
          f"{self.source or ''}. Fix: set {field} to a token of its "
          "vocabulary.")
    return i

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def hf_tokenizer(self):
    return self._tok

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in
            self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

  def to_json(self) -> str:
    return self._tok.to_str()

  def save(self, directory: str) -> str:
    """Writes tokenizer.json (+ mor_tokenizer.json with EOS/BOS) to directory."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    self._tok.save(path)
    with open(os.path.join(directory, "mor_tokenizer.json"), "w",
              encoding="utf-8") as f:
      json.dump({"eos_token": self.eos_token, "bos_token": self.bos_token,
                 "vocab_size": self.vocab_size}, f, indent=2)
    return path

  def fingerprint(self) -> str:
    return short_hash([self.to_json(), self.eos_token, self.bos_token], 12)

  def __getstate__(self):
    return {"json": self.to_json(), "eos_token": self.eos_token,
            "bos_token": self.bos_token, "source": self.source}

  def __setstate__(self, state):
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
    self.__init__(HFTokenizer.from_str(state["json"]),
                  eos_token=state["eos_token"], bos_token=state["bos_token"],
                  source=state["source"])

  def __repr__(self):
    return (f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id}, source={self.source!r})")


def load_tokenizer(path: str, *, eos_token: str = "",
                   bos_token: str = "") -> Tokenizer:
  """Loads a tokenizer.json (or a directory with one) from a local path."""
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
  expanded = os.path.abspath(os.path.expanduser(path))
  file = (os.path.join(expanded, "tokenizer.json") if os.path.isdir(expanded)
          else expanded)
  if not os.path.isfile(file):
    raise DataError(
        f"tokenizer not found: {file} does not exist. Fix: set "
        "config.data.tokenizer_path to a tokenizer.json file or a directory "
        "containing one (e.g. assets/tokenizers/smollm), or to '' to "
        "train a byte-level BPE on the corpus.")
  try:
    tok = HFTokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a plain Exception
    raise DataError(
        f"cannot load tokenizer {file}: {e}. Fix: point "
        "config.data.tokenizer_path at a valid Hugging Face tokenizer.json."
    ) from e
  # Special tokens: explicit config > files next to tokenizer.json > names.
  eos, bos = eos_token or None, bos_token or None
  folder = os.path.dirname(file)
  for name in ("mor_tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json"):
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      try:
        meta = read_json(p)
      except (OSError, ValueError):
        continue
      eos = eos or _special(meta.get("eos_token"))
      if bos is None and "bos_token" in meta:
        bos = _special(meta.get("bos_token"))
  vocab = tok.get_vocab(with_added_tokens=True)
  eos = eos or next((t for t in _EOS_CANDIDATES if t in vocab), None)
  if eos is None:
    raise DataError(
        f"cannot tell the end-of-text token of {file}. Fix: set "
        "config.data.eos_token to it (e.g. '</s>').")
  if bos is None:
    bos = next((t for t in _BOS_CANDIDATES if t in vocab), None)
  return Tokenizer(tok, eos_token=eos, bos_token=bos, source=file)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
  """Trains a byte-level BPE with `vocab_size` tokens (incl. <|endoftext|>).

  Byte-level: every string round-trips through encode/decode exactly. The
  end-of-text token doubles as BOS (GPT-2/SmolLM style).
  """
  from tokenizers import (Tokenizer as HFTokenizer, decoders, models,  # pylint: disable=g-import-not-at-top
                          pre_tokenizers, trainers)
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  if vocab_size < len(alphabet) + 1:
    raise DataError(
        f"config.model.vocab_size={vocab_size} is too small for a byte-level "
        f"BPE (at least {len(alphabet) + 1}: 256 bytes + <|endoftext|>). Fix: "
        "raise config.model.vocab_size.")
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False,
                                               use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
      initial_alphabet=alphabet, show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return Tokenizer(tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                   source="trained byte-level BPE")


def check_vocab(tokenizer: Tokenizer, config) -> None:
  model_vocab = int(config.model.vocab_size)
  if tokenizer.vocab_size != model_vocab:
    raise DataError(
        f"tokenizer vocabulary ({tokenizer.vocab_size} tokens, "
        f"{tokenizer.source}) does not match config.model.vocab_size="
        f"{model_vocab}. Fix: set config.model.vocab_size="
        f"{tokenizer.vocab_size}, or use a tokenizer with {model_vocab} tokens"
        " (config.data.tokenizer_path; '' trains one of that size).")


def trained_tokenizer_dir(config, dataset_dir: str) -> str:
  key = dict(v=int(config.model.vocab_size), fmt=BPE_FORMAT_VERSION,
             max_bytes=int(config.data.get("tokenizer_train_bytes", 0)))
  return os.path.join(dataset_dir,
                      f"tokenizer-bpe{key['v']}-{short_hash(key, 8)}")


def train_and_store(config, dataset_dir: str, texts: Iterable[str]) -> str:
  """Trains the BPE for config on `texts`, stores it atomically; returns path."""
  final = trained_tokenizer_dir(config, dataset_dir)
  path = os.path.join(final, "tokenizer.json")
  if os.path.isfile(os.path.join(final, "mor_tokenizer.json")):
    return path
  max_bytes = int(config.data.get("tokenizer_train_bytes", 0))

  def capped():
    total = 0
    for t in texts:
      yield t
      total += len(t)
      if max_bytes and total >= max_bytes:
        return

  logging.info("training a byte-level BPE (vocab %d) on %s",
               config.model.vocab_size, dataset_dir)
  tok = train_bpe(capped(), int(config.model.vocab_size))
  if tok.vocab_size != int(config.model.vocab_size):
    raise DataError(
        f"the corpus is too small to train a BPE of {config.model.vocab_size}"
        f" tokens (got {tok.vocab_size}). Fix: lower config.model.vocab_size "
        "to at most that, or use a larger corpus or config.data.tokenizer_path.")
  with files_lib.atomic_dir(final, "mor_tokenizer.json") as tmp:
    tok.save(tmp)  # mor_tokenizer.json is written last: the completion mark
  return path


# ------------------------------------------------------------------ the tokenizer of a config
def tokenizer_path_for(config) -> str:
  """Path of the tokenizer.json that `get_tokenizer(config)` uses.

  Does not build anything; the file exists once `prepare`/`get_tokenizer`
  has run (generation reads it from here).
  """
  d = config.data
  if d.tokenizer_path:
    p = os.path.abspath(os.path.expanduser(d.tokenizer_path))
    return os.path.join(p, "tokenizer.json") if os.path.isdir(p) else p
  dataset_dir = str(corpus_lib.make_builder(config).data_dir)
  return os.path.join(trained_tokenizer_dir(config, dataset_dir),
                      "tokenizer.json")


def get_tokenizer(config,
                  corpus: corpus_lib.CorpusInfo | None = None
                  ) -> Tokenizer:
  """The tokenizer for config: loaded from data.tokenizer_path, or trained.

  Training (only when data.tokenizer_path is '' and no stored BPE exists)
  builds the corpus first. Raises DataError (a ValueError) if the vocabulary
  differs from config.model.vocab_size.
  """
  d = config.data
  if d.tokenizer_path:
    tok = load_tokenizer(
        d.tokenizer_path, eos_token=d.eos_token,
        bos_token=d.bos_token)
  else:
    path = tokenizer_path_for(config)
    marker = os.path.join(os.path.dirname(path), "mor_tokenizer.json")
    if not os.path.isfile(marker):
      corpus = corpus or corpus_lib.build_corpus(config)
      train_and_store(
          config, corpus.dataset_dir,
          corpus_lib.iter_texts(corpus.dataset_dir, "train"))
    tok = load_tokenizer(
        path, eos_token=d.eos_token,
        bos_token=d.bos_token)
  check_vocab(tok, config)
  if d.add_bos and tok.bos_id is None:
    raise DataError(
        f"config.data.add_bos=True but the tokenizer {tok.source} has no BOS "
        "token. Fix: set config.data.bos_token, or add_bos=False.")
  return tok
