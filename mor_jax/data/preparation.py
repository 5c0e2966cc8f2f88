"""Preparation: corpus (TFDS) -> tokenizer -> optional token-id shards.

`prepare(config)` is what `main.py --mode=prepare` calls; training calls it
too, so the embedded default corpus is built on first use. Every step is
idempotent (a finished result is reused) and atomic (written to a temporary
directory, renamed when complete, completion marker written last), so an
interrupted run is detected and redone.

Pre-tokenized layout (`<dataset dir>/tokens-<tokenizer fingerprint>/`):
  tokenizer.json, mor_tokenizer.json     the tokenizer that made the shards
  <split>.array_record-0000i-of-0000n   one record per document, in the same
                                         order as the TFDS split: token ids
                                         (uint16 if the vocabulary allows,
                                         else uint32), no EOS/BOS
  metadata.json                          written last (completion marker)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
from typing import Any

from absl import logging
import numpy as np

from mor_jax import files as files_lib
from mor_jax.data import chat
from mor_jax.data import corpus as corpus_lib
from mor_jax.data import tokenizer as tokenizer_lib
from mor_jax.data.workers import ExitWithParent
from mor_jax.data.common import read_json
from mor_jax.errors import DataError

TOKENS_FORMAT_VERSION = 1
_DOCS_PER_SHARD = 50_000
_ENCODE_CHUNK = 256
_WRITER_OPTIONS = "group_size:1"


@dataclasses.dataclass
class PreparedData:
  """What `prepare` built; `make_iterator` reads from it."""
  corpus: corpus_lib.CorpusInfo
  tokenizer_path: str                        # tokenizer.json in use
  tokenizer: tokenizer_lib.Tokenizer = dataclasses.field(repr=False)
  tokens_dir: str | None = None              # pre-tokenized shards, if any
  tokens: dict[str, Any] | None = None       # their metadata.json

  @property
  def num_docs(self) -> dict[str, int]:
    return self.corpus.num_docs


def prepare(config, *, pretokenize: bool | None = None) -> PreparedData:
  """Builds everything config.data needs; reuses what is already built.

  corpus (TFDS ArrayRecord dataset) -> tokenizer (trained or loaded; a copy
  is stored with the dataset) -> token-id shards when `pretokenize` (default:
  config.data.pretokenized). Returns a PreparedData.
  """
  if config.data.corpus == "chat":         # conversations for fine-tuning: rendered and tokenized once (chat.py)
    return chat.prepare_chat(config)
  if pretokenize is None:
    pretokenize = bool(config.data.pretokenized)
  corpus = corpus_lib.build_corpus(config)
  md = corpus.metadata
  if md.get("skipped_records"):
    logging.warning("%s: %d corrupt records were skipped (%s)", corpus.name,
                    md["skipped_records"], md.get("skipped_by_file"))
  tok = tokenizer_lib.get_tokenizer(config, corpus)
  tok_path = tokenizer_lib.tokenizer_path_for(config)
  if config.data.tokenizer_path:  # keep a copy next to the prepared data
    copy_dir = os.path.join(corpus.dataset_dir,
                            f"tokenizer-{tok.fingerprint()}")
    if not os.path.isfile(os.path.join(copy_dir, "mor_tokenizer.json")):
      with files_lib.atomic_dir(copy_dir, "mor_tokenizer.json") as tmp:
        tok.save(tmp)
  tokens_dir = tokens = None
  if pretokenize:
    tokens_dir = pretokenize_corpus(config, corpus, tok)
    tokens = read_json(os.path.join(tokens_dir, "metadata.json"))
  return PreparedData(corpus=corpus, tokenizer_path=tok_path, tokenizer=tok,
                      tokens_dir=tokens_dir, tokens=tokens)


def tokens_dir_for(corpus: corpus_lib.CorpusInfo,
                   tok: tokenizer_lib.Tokenizer) -> str:
  return os.path.join(corpus.dataset_dir, f"tokens-{tok.fingerprint()}")


def token_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def _tokenize_shard(job: dict[str, Any]) -> dict[str, Any]:
  """Worker: tokenizes documents [start, stop) of a split into one shard."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
  tok = HFTokenizer.from_str(job["tokenizer_json"])
  dtype = np.dtype(job["dtype"])
  writer = array_record_module.ArrayRecordWriter(job["path"], _WRITER_OPTIONS)
  n_docs = n_tokens = 0
  texts = corpus_lib.iter_texts(job["dataset_dir"], job["split"], job["start"],
                             job["stop"])
  try:
    batch = []
    for text in texts:
      batch.append(text)
      if len(batch) == _ENCODE_CHUNK:
        n_docs, n_tokens = _write(tok, batch, writer, dtype, n_docs, n_tokens)
        batch = []
    n_docs, n_tokens = _write(tok, batch, writer, dtype, n_docs, n_tokens)
  finally:
    writer.close()
  return {"path": job["path"], "docs": n_docs, "tokens": n_tokens}


def _write(tok, batch, writer, dtype, n_docs, n_tokens):
  if batch:
    for enc in tok.encode_batch(batch, add_special_tokens=False):
      ids = np.asarray(enc.ids, dtype=dtype)
      writer.write(ids.tobytes())
      n_docs += 1
      n_tokens += ids.size
  return n_docs, n_tokens


def pretokenize_corpus(config, corpus: corpus_lib.CorpusInfo,
                       tok: tokenizer_lib.Tokenizer) -> str:
  """Writes (once) the token-id shards of every split; returns their dir."""
  final = tokens_dir_for(corpus, tok)
  if os.path.isfile(os.path.join(final, "metadata.json")):
    return final
  workers = int(config.data.prepare_workers) or os.cpu_count() or 1
  dtype = np.dtype(token_dtype(tok.vocab_size)).name
  with files_lib.atomic_dir(final, "metadata.json") as tmp:
    tok.save(tmp)
    tok_json = tok.to_json()
    jobs = []
    for split in corpus_lib.SPLITS:
      n = corpus.num_docs.get(split, 0)
      num_shards = max(1, min(n, max(workers, math.ceil(n / _DOCS_PER_SHARD))))
      bounds = np.linspace(0, n, num_shards + 1).astype(int)
      for i in range(num_shards):
        jobs.append(dict(
            dataset_dir=corpus.dataset_dir, split=split,
            start=int(bounds[i]), stop=int(bounds[i + 1]), dtype=dtype,
            tokenizer_json=tok_json,
            path=os.path.join(
                tmp, f"{split}.array_record-{i:05d}-of-{num_shards:05d}")))
    logging.info("pre-tokenizing %s into %d shards with %d processes",
                 corpus.name, len(jobs), min(workers, len(jobs)))
    if workers <= 1 or len(jobs) == 1:
      results = [_tokenize_shard(j) for j in jobs]
    else:
      with concurrent.futures.ProcessPoolExecutor(
          max_workers=min(workers, len(jobs)),
          mp_context=multiprocessing.get_context("spawn"),
          initializer=ExitWithParent()) as pool:
        results = list(pool.map(_tokenize_shard, jobs))
    splits: dict[str, Any] = {}
    for job, res in zip(jobs, results):
      s = splits.setdefault(job["split"], {"files": [], "num_docs": 0,
                                           "num_tokens": 0})
      s["files"].append(os.path.basename(res["path"]))
      s["num_docs"] += res["docs"]
      s["num_tokens"] += res["tokens"]
    for split, s in splits.items():
      if s["num_docs"] != corpus.num_docs[split]:
        raise DataError(
            f"pre-tokenizing {split} wrote {s['num_docs']} documents, "
            f"expected {corpus.num_docs[split]}; nothing was kept. Fix: rerun "
            "--mode=prepare; if it repeats, delete "
            f"{corpus.dataset_dir} and rebuild.")
    meta = dict(format=TOKENS_FORMAT_VERSION, dtype=dtype,
                vocab_size=tok.vocab_size, eos_id=tok.eos_id,
                bos_id=tok.bos_id, fingerprint=tok.fingerprint(),
                corpus=corpus.name, splits=splits)
    with open(os.path.join(tmp, "metadata.json"), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=2)
  return final

