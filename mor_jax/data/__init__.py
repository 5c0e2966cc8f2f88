"""Data: corpus sources, TFDS corpora, tokenizers, preparation and the grain pipeline.

  sources/        raw documents, one source per file (shakespeare.py, files.py)
  corpus.py       TFDS builders on top of the sources; build_corpus, iter_texts
  tokenizer.py    Hugging Face tokenizer.json or a trained byte-level BPE
  preparation.py  corpus -> tokenizer -> optional pre-tokenized shards
  records.py      grain's random-access sources over prepared data
  pipeline.py     the grain pipeline (packing, sharding, checkpointable state)
  chat_records.py chat records (messages / prompt+completion) -> chat template -> token ids + loss mask
  chat.py         chat data for fine-tuning (data.corpus='chat'): prepared once, whole examples packed
  workers.py      worker processes that exit with their parent

Public API:
  prepare(config) -> PreparedData            build corpus, tokenizer, shards
  get_tokenizer(config) -> Tokenizer         trained or loaded; vocab-checked
  tokenizer_path_for(config) -> str          where that tokenizer.json lives
  make_iterator(config, split, *, global_batch_size, ...) -> grain iterator
"""

from mor_jax.errors import DataError
from mor_jax.data.corpus import CorpusInfo, build_corpus, iter_texts
from mor_jax.data.pipeline import count_batches, make_dataset, make_iterator
from mor_jax.data.preparation import PreparedData, prepare
from mor_jax.data.tokenizer import Tokenizer, get_tokenizer, load_tokenizer, tokenizer_path_for

__all__ = [
    "CorpusInfo", "DataError", "PreparedData", "Tokenizer", "build_corpus",
    "count_batches", "get_tokenizer", "iter_texts", "load_tokenizer", "make_dataset", "make_iterator",
    "prepare", "tokenizer_path_for",
]
