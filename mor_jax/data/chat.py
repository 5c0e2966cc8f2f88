"""Chat data for supervised fine-tuning (`data.corpus='chat'`): JSONL conversations -> packed rows with a loss mask.

  data.path (a .jsonl[.gz] file, directory or glob; formats: chat_records.py)
  -> each record rendered with the chat template (the tokenizer's own, or data.chat_template=chatml) and tokenized,
     with a loss mask (data.loss_on: the assistant turns, or all tokens)
  -> malformed records (data.on_corrupt_record) and conversations longer than seq_len + 1 tokens
     (data.on_long_record: skip | truncate | fail) counted, skipped or refused with file and line; none is dropped
     silently: records = train + validation examples + skipped, in summary.json and the run's report
  -> held-out validation examples: data.val_files (file names) or data.val_fraction of the records (seeded by
     data.shuffle_seed)
  -> prepared once into DATA_DIR/chat/chat-<hash>/ (token ids, loss masks, offsets per split as .npy; summary.json
     written last), keyed by the files' contents, tokenizer, template and these settings
  -> grain: shard by process -> shuffle (a fresh order every epoch) -> repeat -> first-fit packing of whole
     examples into rows of seq_len + 1 tokens (grain's FirstFitPackIterDataset: `segment_ids` 1, 2, ... per
     example, 0 = padding; `positions` restart at 0 for each example) -> batch.

Rows carry `tokens`, `segment_ids`, `positions` and `loss_mask` (1 where the token is a trained target); the
train step counts target t + 1 only where loss_mask and the segment id are set, so the loss is per trained
(assistant) token, and `data.document_mask` (required for chat) keeps packed examples from attending to each
other. The iterator is checkpointable (`get_state` / `set_state`) like the text pipeline's.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import os
from typing import Any

from absl import logging
import grain
import numpy as np

from mor_jax import files as files_lib
from mor_jax.data import batching
from mor_jax.data import chat_records
from mor_jax.data import tokenizer as tokenizer_lib
from mor_jax.data.common import data_root, read_json, short_hash
from mor_jax.errors import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
MAX_LISTED = 10                     # records named per kind of problem in summary.json and the log


@dataclasses.dataclass(repr=False)
class ChatData:
  """Prepared chat data: where the arrays are, what summary.json says, the tokenizer and template used."""
  directory: str
  summary: dict
  tokenizer_path: str
  tokenizer: Any
  template: str = ""

  def __repr__(self):
    return f"ChatData({self.directory!r}: {skipped_line(self.summary)})"

  @property
  def num_examples(self) -> dict[str, int]:
    return {s: int(self.summary["splits"][s]["examples"]) for s in SPLITS}


def chat_files(path: str) -> list[str]:
  """The JSONL files of data.path (a file, directory or glob)."""
  from mor_jax.data.sources import files as files_lib  # pylint: disable=g-import-not-at-top
  if not path:
    raise DataError("config.data.corpus='chat' but config.data.path is empty. Fix: set config.data.path to a "
                    ".jsonl file (one conversation per line), a directory or a glob of them.")
  _, files = files_lib.list_local_files(path)
  bad = [f for f in files if not f.endswith(JSONL_SUFFIXES)]
  if bad:
    raise DataError(f"chat data must be JSON lines (.jsonl or .jsonl.gz), got {bad[0]}. Fix: convert it, or narrow "
                    "config.data.path.")
  return files


def _lines(path: str):
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      yield from enumerate(f, 1)
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path} ({e}). Fix: check the file, or remove it from config.data.path.") from e


def _content_hash(files: list[str]) -> str:
  h = hashlib.sha256()
  for path in files:
    h.update(path.encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:16]


class _Tally:
  """Skipped records by kind, with the first few named; raises instead under a 'fail' policy."""

  def __init__(self, config):
    d = config.data
    self.corrupt_policy, self.long_policy, self.limit = d.on_corrupt_record, d.on_long_record, int(d.seq_len) + 1
    self.malformed: list[str] = []
    self.too_long: list[str] = []
    self.truncated: list[str] = []

  def bad(self, where: str, why: str) -> None:
    if self.corrupt_policy == "fail":
      raise DataError(f"malformed chat record {where}: {why}. Fix: repair or remove that record, or set "
                      "config.data.on_corrupt_record=skip (such records are skipped, counted and reported).")
    self.malformed.append(f"{where}: {why}")

  def fit(self, where: str, ids: np.ndarray, mask: np.ndarray):
    """(ids, mask) that fit a row of seq_len + 1 tokens, or None when the record is skipped."""
    n = ids.size
    if n <= self.limit:
      return ids, mask
    what = f"{where}: {n} tokens > data.seq_len + 1 = {self.limit}"
    if self.long_policy == "fail":
      raise DataError(f"chat record {what}. Fix: raise config.data.seq_len, or set config.data.on_long_record="
                      "skip (skipped and counted) or truncate (cut at seq_len + 1 tokens).")
    if self.long_policy == "truncate" and mask[1:self.limit].any():
      self.truncated.append(what)
      return ids[:self.limit], mask[:self.limit]
    self.too_long.append(what + (" (nothing trained left after truncation)" if self.long_policy == "truncate" else ""))
    return None

  def summary(self) -> dict:
    return {"malformed": {"count": len(self.malformed), "policy": self.corrupt_policy,
                          "first": self.malformed[:MAX_LISTED]},
            "too_long": {"count": len(self.too_long), "policy": self.long_policy, "first": self.too_long[:MAX_LISTED]},
            "truncated": {"count": len(self.truncated), "first": self.truncated[:MAX_LISTED]}}


def _read_records(files: list[str], tally: _Tally) -> list[tuple[str, int, list]]:
  records = []
  for path in files:
    for n, line in _lines(path):
      try:
        msgs = chat_records.parse_line(line)
      except chat_records.BadRecord as e:
        tally.bad(f"{path}:{n}", str(e))
        continue
      if msgs is not None:
        records.append((path, n, msgs))
  return records


def _validation(records, files, d) -> np.ndarray:
  """Boolean per record: held out for validation (data.val_files by name, else data.val_fraction, seeded)."""
  if d.val_files:
    names = {os.path.basename(f) for f in files}
    missing = [v for v in d.val_files if v not in names]
    if missing:
      raise DataError(f"config.data.val_files names {missing[0]!r}, which is not among the chat files "
                      f"({', '.join(sorted(names)[:5])}). Fix: list file names of config.data.path.")
    return np.asarray([os.path.basename(p) in set(d.val_files) for p, _, _ in records], bool)
  n = len(records)
  k = int(round(float(d.val_fraction) * n))
  if float(d.val_fraction) > 0 and n >= 2:
    k = min(max(k, 1), n - 1)
  val = np.zeros(n, bool)
  val[np.random.RandomState(int(d.shuffle_seed)).permutation(n)[:k]] = True
  return val


def _turn_end_is_eos(ids, mask, eos_id) -> bool:
  """Whether the last trained token run ends with EOS (possibly followed by whitespace): --chat stops there."""
  trained = np.flatnonzero(mask)
  return trained.size == 0 or eos_id in ids[max(0, trained[-1] - 2):trained[-1] + 1].tolist()


def _build(config, files, tok, settings, tmp) -> dict:
  d = config.data
  tally = _Tally(config)
  records = _read_records(files, tally)
  unparsed = len(tally.malformed)
  val = _validation(records, files, d)
  bos = tok.bos_id if d.add_bos else None
  splits, eos_ok = {}, True
  for split, held in (("train", False), ("validation", True)):
    ids_all, mask_all, offsets = [], [], [0]
    for (path, n, msgs), v in zip(records, val):
      if bool(v) != held:
        continue
      try:
        ids, mask = chat_records.encode(tok, settings, msgs, d.loss_on, bos)
      except chat_records.BadRecord as e:
        tally.bad(f"{path}:{n}", str(e))
        continue
      fitted = tally.fit(f"{path}:{n}", ids, mask)
      if fitted is None:
        continue
      eos_ok = eos_ok and _turn_end_is_eos(ids, mask, tok.eos_id)     # as rendered (before any truncation)
      ids_all.append(fitted[0])
      mask_all.append(fitted[1])
      offsets.append(offsets[-1] + fitted[0].size)
    tokens = np.concatenate(ids_all) if ids_all else np.zeros(0, np.int32)
    masks = np.concatenate(mask_all) if mask_all else np.zeros(0, np.uint8)
    np.save(os.path.join(tmp, f"{split}.tokens.npy"), tokens.astype(np.int32))
    np.save(os.path.join(tmp, f"{split}.loss_mask.npy"), masks.astype(np.uint8))
    np.save(os.path.join(tmp, f"{split}.offsets.npy"), np.asarray(offsets, np.int64))
    splits[split] = {"examples": len(ids_all), "tokens": int(tokens.size), "trained_tokens": int(masks.sum())}
  return {"format": FORMAT_VERSION, "files": files, "records": len(records) + unparsed, "splits": splits,
          **tally.summary(), "loss_on": d.loss_on, "seq_len": int(d.seq_len),
          "chat_template": d.chat_template or "the tokenizer's own", "turn_ends_with_eos": bool(eos_ok)}


def prepare_chat(config) -> ChatData:
  """Renders, tokenizes and splits the chat data of `config.data` once (reused afterwards); see the module doc."""
  d = config.data
  if not d.tokenizer_path:
    raise DataError("config.data.tokenizer_path is empty: chat data is rendered with the model's tokenizer and chat "
                    "template. Fix: set config.init.from_path=W (its tokenizer is used) or config.data.tokenizer_path.")
  files = chat_files(d.path)
  tok = tokenizer_lib.get_tokenizer(config)
  tok_path = tokenizer_lib.tokenizer_path_for(config)
  try:
    settings = chat_records.template_settings(tok_path, d.chat_template, tok.eos_token, tok.bos_token)
  except ValueError as e:
    raise DataError(str(e)) from None
  key = dict(v=FORMAT_VERSION, files=_content_hash(files), tok=tok.fingerprint(), template=settings["chat_template"],
             special=[settings.get("eos_token"), settings.get("bos_token")], loss_on=d.loss_on, seq_len=int(d.seq_len),
             long=d.on_long_record, corrupt=d.on_corrupt_record, val=[float(d.val_fraction), sorted(d.val_files)],
             seed=int(d.shuffle_seed), bos=bool(d.add_bos))
  final = os.path.join(data_root(config), "chat", f"chat-{short_hash(key, 12)}")
  if not os.path.isfile(os.path.join(final, "summary.json")):
    logging.info("preparing chat data from %d file(s) of %s", len(files), d.path)
    with files_lib.atomic_dir(final, "summary.json") as tmp:
      summary = _build(config, files, tok, settings, tmp)
      if not summary["splits"]["train"]["examples"]:
        raise DataError(f"no usable training conversation in {d.path}: {skipped_line(summary)}. Fix: check the "
                        "records (see the first ones named above), data.seq_len and data.loss_on.")
      with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
  summary = read_json(os.path.join(final, "summary.json"))
  return ChatData(directory=final, summary=summary, tokenizer_path=tok_path, tokenizer=tok,
                  template=settings["chat_template"])


def skipped_line(s: dict) -> str:
  """One line: how many records were read, kept, truncated and skipped (and why)."""
  sp = s["splits"]
  return (f"{s['records']:,} records: {sp['train']['examples']:,} training and {sp['validation']['examples']:,} "
          f"validation examples; {s['malformed']['count']:,} malformed skipped, {s['too_long']['count']:,} longer "
          f"than data.seq_len + 1 = {s['seq_len'] + 1} tokens skipped, {s['truncated']['count']:,} truncated")


def log_summary(s: dict) -> None:
  bad = s["malformed"]["count"] + s["too_long"]["count"] + s["truncated"]["count"]
  (logging.warning if bad else logging.info)("chat data: %s", skipped_line(s))
  for kind in ("malformed", "too_long", "truncated"):
    for line in s[kind]["first"]:
      logging.warning("chat data, %s: %s", kind.replace("_", " "), line)
  if not s.get("turn_ends_with_eos", True):
    logging.warning("chat data: the assistant turns do not end with the tokenizer's EOS token, where generation with "
                    "--chat and serving stop; set config.data.eos_token to the template's end-of-turn token.")


# ------------------------------------------------------------------ the pipeline
class ChatSource:
  """Random-access source over one prepared split: `src[i]` -> {'tokens': int32 [n], 'loss_mask': int32 [n]}.
  Pickles as (directory, split); the arrays are memory-mapped on first use."""

  def __init__(self, directory: str, split: str):
    self.directory, self.split = directory, split
    self._arrays = None
    self._len = int(np.load(self._file("offsets"), mmap_mode="r").size) - 1

  def _file(self, what: str) -> str:
    return os.path.join(self.directory, f"{self.split}.{what}.npy")

  def _open(self):
    if self._arrays is None:
      self._arrays = tuple(np.load(self._file(w), mmap_mode="r") for w in ("tokens", "loss_mask", "offsets"))
    return self._arrays

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    tokens, mask, offsets = self._open()
    a, b = int(offsets[index]), int(offsets[index + 1])
    return {"tokens": np.asarray(tokens[a:b], np.int32), "loss_mask": np.asarray(mask[a:b], np.int32)}

  def __getstate__(self):
    return {**self.__dict__, "_arrays": None}

  def __setstate__(self, state):
    self.__dict__.update(state)

  def __repr__(self):
    return f"ChatSource({self.directory!r}, {self.split!r})"


class _Rows(grain.transforms.Map):
  """grain's packed features -> the row layout of the text pipeline, plus `loss_mask`."""

  def map(self, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": x["tokens"], "segment_ids": x["tokens_segment_ids"], "positions": x["tokens_positions"],
            "loss_mask": x["loss_mask"]}


def make_chat_dataset(config, split: str, *, local_batch_size: int, process_index: int = 0, process_count: int = 1,
                      seed: int | None = None, num_epochs: int | None = None, drop_remainder: bool = False,
                      prepared: ChatData | None = None) -> grain.IterDataset:
  """Packed batches of one chat split (see the module doc); `make_dataset`'s arguments."""
  d = config.data
  prepared = prepared or prepare_chat(config)
  source = ChatSource(prepared.directory, split)
  finite = num_epochs is not None
  if len(source) < process_count:
    if split == "validation" and finite:
      return grain.MapDataset.source([]).to_iter_dataset()          # no held-out examples: no validation loss
    raise DataError(f"the chat {split} split has {len(source)} examples, fewer than the {process_count} processes "
                    "that share it. Fix: use more data (or a larger data.val_fraction for validation).")
  ds = grain.MapDataset.source(source)
  if drop_remainder:
    ds = ds[:len(source) - len(source) % process_count]
  ds = ds[process_index::process_count]
  ds = ds.shuffle(seed=int(d.shuffle_seed if seed is None else seed)).repeat(num_epochs)
  row = int(d.seq_len) + 1
  it = grain.experimental.FirstFitPackIterDataset(
      ds.to_iter_dataset(), length_struct={"tokens": row, "loss_mask": row}, num_packing_bins=int(local_batch_size),
      shuffle_bins=False)
  it = it.map(_Rows()).batch(int(local_batch_size), drop_remainder=not finite)
  if finite:
    it = it.map(batching.PadBatch(int(local_batch_size), 0))
  return batching.prefetched(it, d)


def count_chat_batches(config, split: str, *, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, rows: bool = False) -> int:
  """Batches (or, with `rows`, rows holding examples) of one epoch of `split`: the prepared arrays are packed,
  nothing is tokenized."""
  ds = make_chat_dataset(_no_prefetch(config), split, local_batch_size=global_batch_size // process_count,
                         process_index=process_index, process_count=process_count, num_epochs=1)
  if rows:
    return sum(int(np.sum(b["segment_ids"].max(axis=-1) > 0)) for b in ds)
  return sum(1 for _ in ds)


def _no_prefetch(config):
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.num_workers, c.data.prefetch = 0, 0
  return c


def steps_for_epochs(config) -> int:
  """train.num_steps for train.epochs passes over the training examples: epochs x packed rows of one pass (one
  process, the global batch's packing) / total_batch_size, rounded up; the same on every process."""
  batch = int(config.train.total_batch_size)
  rows = count_chat_batches(config, "train", global_batch_size=batch, rows=True)
  return max(1, math.ceil(float(config.train.epochs) * rows / batch - 1e-9))
