"""The grain input pipeline: documents -> packed, batched token rows.

  random-access source (TFDS text or pre-tokenized shards)
  -> shard by JAX process (documents i::process_count)
  -> deterministic global shuffle (seed; a fresh order every epoch) -> repeat
  -> tokenize (raw text only; in worker processes when num_workers > 0)
  -> [BOS] doc EOS -> concat-then-split packing into rows of seq_len + 1
  -> batch -> prefetch (worker processes, or a thread)

Packing keeps every token exactly once: a document longer than the space
left in a row continues at the start of the next row. Each row carries
`segment_ids` (1, 2, ... per document piece in the row; 0 = padding) and
`positions` (0, 1, ... within that piece; they restart at 0 when a document
continues from the previous row, so they never exceed seq_len), enough for
document masking. Only a finite run (num_epochs set) has padding: its last
row and last batch are padded.

With data.num_workers > 0 the pipeline runs in grain worker processes. They
are spawned: each re-imports the main module, so a script that iterates must
keep its set-up under functions (`if __name__ == "__main__":`); and each exits
when the process that started it dies (workers.py), so a kill -9 leaves none.

The iterator is a grain `DatasetIterator`: `get_state()` returns a JSON-able
dict and `set_state(state)` resumes at exactly the next batch (same config,
process count and num_workers). Use `grain.checkpoint.CheckpointSave/
CheckpointRestore` with Orbax, or store the dict yourself.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mor_jax.data import batching
from mor_jax.data import chat
from mor_jax.errors import DataError
from mor_jax.data.preparation import PreparedData, prepare
from mor_jax.data.records import TextSource, TokenSource

SPLIT_ALIASES = {"train": "train", "validation": "validation",
                 "valid": "validation", "val": "validation",
                 "eval": "validation"}


class _Tokenize(grain.transforms.Map):
  """UTF-8 bytes -> int32 token ids (the tokenizer pickles as its JSON)."""

  def __init__(self, tokenizer):
    self._tok = tokenizer

  def map(self, element: bytes) -> np.ndarray:
    return np.asarray(self._tok.encode(element.decode("utf-8")),
                      dtype=np.int32)


class _ToInt32(grain.transforms.Map):

  def map(self, element: np.ndarray) -> np.ndarray:
    return element.astype(np.int32)


class _PackIterator(grain.DatasetIterator):
  """Concat-then-split packing with checkpointable state.

  State = parent state *before* the document being split plus how many of
  its tokens were already emitted, so restoring re-reads that one document
  instead of storing its tokens.
  """

  def __init__(self, parent, *, row_len, eos_id, bos_id, pad_id,
               flush_final):
    super().__init__(parent)
    self._row_len, self._eos, self._bos = row_len, eos_id, bos_id
    self._pad, self._flush = pad_id, flush_final
    self._doc: np.ndarray | None = None
    self._off = 0
    self._doc_state = None
    self._resume_off = 0
    self._done = False

  def _fetch(self) -> bool:
    state = self._parent.get_state()
    try:
      ids = next(self._parent)
    except StopIteration:
      return False
    parts = [ids.astype(np.int32, copy=False), np.array([self._eos], np.int32)]
    if self._bos is not None:
      parts.insert(0, np.array([self._bos], np.int32))
    self._doc = np.concatenate(parts)
    self._doc_state = state
    self._off, self._resume_off = self._resume_off, 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    if self._done:
      raise StopIteration
    n = self._row_len
    tokens = np.full(n, self._pad, np.int32)
    segs = np.zeros(n, np.int32)
    pos = np.zeros(n, np.int32)
    fill = seg = 0
    while fill < n:
      if self._doc is None or self._off >= self._doc.size:
        self._doc = None
        if not self._fetch():
          self._done = True
          if fill and self._flush:
            break
          raise StopIteration
      take = min(n - fill, self._doc.size - self._off)
      seg += 1
      tokens[fill:fill + take] = self._doc[self._off:self._off + take]
      segs[fill:fill + take] = seg
      pos[fill:fill + take] = np.arange(take, dtype=np.int32)
      fill += take
      self._off += take
    return {"tokens": tokens, "segment_ids": segs, "positions": pos}

  def get_state(self) -> dict[str, Any]:
    if self._doc is not None and self._off < self._doc.size:
      return {"parent": self._doc_state, "offset": int(self._off),
              "done": self._done}
    return {"parent": self._parent.get_state(),
            "offset": int(self._resume_off if self._doc is None else 0),
            "done": self._done}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._doc_state = None, None
    self._off, self._resume_off = 0, int(state["offset"])
    self._done = bool(state["done"])


class PackIterDataset(grain.IterDataset):
  """Packs 1-D int32 documents into rows of `row_len` (see module doc)."""

  def __init__(self, parent, *, row_len: int, eos_id: int,
               bos_id: int | None = None, pad_id: int = 0,
               flush_final: bool = False):
    super().__init__(parent)
    self._kw = dict(row_len=int(row_len), eos_id=int(eos_id),
                    bos_id=None if bos_id is None else int(bos_id),
                    pad_id=int(pad_id), flush_final=bool(flush_final))

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), **self._kw)

  def __str__(self):
    return f"PackIterDataset(row_len={self._kw['row_len']})"


def _resolve_split(split: str) -> str:
  if split not in SPLIT_ALIASES:
    raise DataError(f"unknown split {split!r}; use 'train' or 'validation'.")
  return SPLIT_ALIASES[split]


def make_dataset(config, split: str, *, local_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 seed: int | None = None, num_epochs: int | None = None,
                 prepared: PreparedData | None = None,
                 drop_remainder: bool = False) -> grain.IterDataset:
  """The grain IterDataset behind `make_iterator` (see there)."""
  d = config.data
  split = _resolve_split(split)
  if d.corpus == "chat":                   # conversations: whole examples packed with a loss mask (chat.py)
    return chat.make_chat_dataset(config, split, local_batch_size=local_batch_size, process_index=process_index,
                                  process_count=process_count, seed=seed, num_epochs=num_epochs,
                                  drop_remainder=drop_remainder)
  if local_batch_size < 1:
    raise DataError(f"local batch size {local_batch_size} must be >= 1.")
  if not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} not in "
                    f"[0, {process_count}).")
  if int(d.seq_len) < 1:
    raise DataError(f"config.data.seq_len={d.seq_len} must be >= 1.")
  if num_epochs is not None and num_epochs < 1:
    raise DataError(f"num_epochs={num_epochs}: use None (forever) or >= 1.")
  prepared = prepared or prepare(config)
  tok = prepared.tokenizer
  if d.pretokenized:
    if prepared.tokens_dir is None:
      prepared = prepare(config, pretokenize=True)
    source = TokenSource(prepared.tokens_dir, split)
    to_ids = _ToInt32()
  else:
    source = TextSource(prepared.corpus.dataset_dir, split)
    to_ids = _Tokenize(tok)
  if len(source) < process_count:
    raise DataError(
        f"the {split} split has {len(source)} documents, fewer than the "
        f"{process_count} processes that share it. Fix: use more data or "
        "fewer processes.")
  seed = int(d.shuffle_seed if seed is None else seed)
  finite = num_epochs is not None
  ds = grain.MapDataset.source(source)
  if drop_remainder:                       # equal shards: drop the last len % count documents
    ds = ds[:len(source) - len(source) % process_count]
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=seed).repeat(num_epochs)
  ds = ds.map(to_ids)
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=max(1, int(d.read_threads)),
      prefetch_buffer_size=64))
  it = PackIterDataset(it, row_len=int(d.seq_len) + 1, eos_id=tok.eos_id,
                       bos_id=tok.bos_id if d.add_bos else None,
                       pad_id=tok.eos_id, flush_final=finite)
  it = it.batch(int(local_batch_size), drop_remainder=not finite)
  if finite:
    it = it.map(batching.PadBatch(int(local_batch_size), tok.eos_id))
  return batching.prefetched(it, d)


def make_iterator(config, split: str, *, global_batch_size: int,
                  process_index: int | None = None,
                  process_count: int | None = None, seed: int | None = None,
                  num_epochs: int | None = None,
                  shard_options: grain.sharding.ShardOptions | None = None
                  ) -> grain.DatasetIterator:
  """A checkpointable iterator of packed batches for one split.

  Args:
    config: the full config; reads config.data and config.model.vocab_size.
      Prepares (builds corpus/tokenizer/shards) on first use.
    split: 'train' or 'validation' (aliases: 'val', 'valid', 'eval').
    global_batch_size: rows per step over all processes; each process gets
      global_batch_size // process_count rows.
    process_index, process_count: this process's shard of the documents
      (default: jax.process_index(), jax.process_count(), i.e. grain's
      `ShardByJaxProcess`). Shards are disjoint and together cover the split.
    shard_options: a `grain.sharding.ShardOptions` (e.g.
      `grain.sharding.ShardByJaxProcess(drop_remainder=True)`) instead of
      process_index / process_count; drop_remainder gives every shard the
      same number of documents.
    seed: shuffle seed (default config.data.shuffle_seed). Each epoch is
      shuffled differently, deterministically.
    num_epochs: None repeats forever; an int stops after that many epochs,
      padding the last row and last batch (segment_ids 0). Processes may then
      get different numbers of batches; multi-process evaluation should
      rather take a fixed number of batches from a repeating iterator.

  Yields:
    dicts of numpy int32 arrays [local_batch, seq_len + 1]: `tokens`,
    `segment_ids` (1-based document piece within the row, 0 = padding) and
    `positions` (within the piece). Inputs are tokens[:, :-1], targets
    tokens[:, 1:]. Chat data (data.corpus='chat', chat.py) packs whole
    conversations and adds `loss_mask` (1 where a token is trained).

  The iterator supports `get_state()` / `set_state(state)` (JSON-able dict):
  restoring yields exactly the batches that followed. Call `close()` when
  done if num_workers > 0.
  """
  drop_remainder = False
  if shard_options is not None:
    process_index, process_count = shard_options.shard_index, shard_options.shard_count
    drop_remainder = bool(shard_options.drop_remainder)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = (jax.process_index() if process_index is None
                     else process_index)
    process_count = (jax.process_count() if process_count is None
                     else process_count)
  if global_batch_size % process_count:
    raise DataError(
        f"global_batch_size={global_batch_size} is not divisible by "
        f"process_count={process_count}.")
  ds = make_dataset(config, split,
                    local_batch_size=global_batch_size // process_count,
                    process_index=process_index, process_count=process_count,
                    seed=seed, num_epochs=num_epochs,
                    drop_remainder=drop_remainder)
  return iter(ds)


def count_batches(config, split: str, *, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1) -> int:
  """How many batches one epoch of `split` gives (`make_iterator(..., num_epochs=1)`), without packing it.

  Packing keeps every token once, so the rows are ceil(sum over this process's documents of
  ([BOS] + ids + EOS) / (seq_len + 1)). Pre-tokenized data: read from the shards' metadata (one process) or the
  shards; raw text: the documents are tokenized once in batches (the Rust tokenizer; a validation split takes
  seconds). Used for the total of the eval progress bar.
  """
  split = _resolve_split(split)
  if config.data.corpus == "chat":
    return chat.count_chat_batches(config, split, global_batch_size=global_batch_size, process_index=process_index,
                                   process_count=process_count)
  prepared = prepare(config)
  d = config.data
  extra = 1 + int(bool(d.add_bos) and prepared.tokenizer.bos_id is not None)
  local = global_batch_size // process_count
  if d.pretokenized and prepared.tokens and process_count == 1:
    s = prepared.tokens["splits"][split]
    tokens = int(s["num_tokens"]) + extra * int(s["num_docs"])
  else:
    source = (TokenSource(prepared.tokens_dir, split) if d.pretokenized and prepared.tokens_dir
              else TextSource(prepared.corpus.dataset_dir, split))
    idx = list(range(process_index, len(source), process_count))
    tokens = extra * len(idx)
    for start in range(0, len(idx), 256):
      docs = [source[i] for i in idx[start:start + 256]]
      if isinstance(source, TokenSource):
        tokens += sum(int(x.size) for x in docs)
      else:
        texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in docs]
        tokens += sum(len(ids) for ids in prepared.tokenizer.encode_batch(texts))
  rows = -(-tokens // (int(d.seq_len) + 1))
  return -(-rows // max(1, local))
