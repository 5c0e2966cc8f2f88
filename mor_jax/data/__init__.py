"""Data: corpora (TFDS), tokenizers, the grain pipeline and preparation.

Public API:
  prepare(config) -> PreparedData            build corpus, tokenizer, shards
  get_tokenizer(config) -> Tokenizer         trained or loaded; vocab-checked
  tokenizer_path_for(config) -> str          where that tokenizer.json lives
  make_iterator(config, split, *, global_batch_size, ...) -> grain iterator
"""

from mor_jax.data.common import DataError
from mor_jax.data.corpora import CorpusInfo, build_corpus
from mor_jax.data.pipeline import make_dataset, make_iterator
from mor_jax.data.preparation import (PreparedData, get_tokenizer, prepare,
                                  tokenizer_path_for)
from mor_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "CorpusInfo", "DataError", "PreparedData", "Tokenizer", "build_corpus",
    "get_tokenizer", "load_tokenizer", "make_dataset", "make_iterator",
    "prepare", "tokenizer_path_for",
]
