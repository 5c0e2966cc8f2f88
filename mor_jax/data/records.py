"""Random-access sources that grain reads: prepared documents by index.

* `TextSource`: one split of a built TFDS corpus (`src[i]` -> UTF-8 bytes).
* `TokenSource`: one split of the pre-tokenized shards (`src[i]` -> ids).

Both pickle as (directory, split): grain's worker processes open their own
file handles.
"""

from __future__ import annotations

import os

import numpy as np

from mor_jax.data import corpus as corpus_lib
from mor_jax.data.common import read_json
from mor_jax.errors import DataError


class _LazySource:
  """Pickles without its open reader (`_ds`); subclasses define `_open`."""

  _ds = None

  def _source(self):
    if self._ds is None:
      self._ds = self._open()
    return self._ds

  def __len__(self) -> int:
    return self._len

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)


class TextSource(_LazySource):
  """Random-access source over one corpus split: `src[i]` -> the text as bytes."""

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir, self.split = str(dataset_dir), split
    self._ds = None
    self._len = len(self._source())

  def _open(self):
    return corpus_lib.open_split(self.dataset_dir, self.split)

  def __getitem__(self, index: int) -> bytes:
    return self._source()[index]["text"]

  def __repr__(self):
    return f"TextSource({self.dataset_dir!r}, {self.split!r})"


class TokenSource(_LazySource):
  """Random-access source over pre-tokenized shards: `src[i]` -> np ids."""

  def __init__(self, tokens_dir: str, split: str):
    self.tokens_dir, self.split = str(tokens_dir), split
    meta = read_json(os.path.join(self.tokens_dir, "metadata.json"))
    if split not in meta["splits"]:
      raise DataError(f"split {split!r} not in {self.tokens_dir} (splits: "
                      f"{sorted(meta['splits'])}).")
    self._files = [os.path.join(self.tokens_dir, f)
                   for f in meta["splits"][split]["files"]]
    corpus_lib.check_files(self._files, self.tokens_dir, split)
    self._dtype = np.dtype(meta["dtype"])
    self._len = int(meta["splits"][split]["num_docs"])
    self._ds = None

  def _open(self):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    return array_record_data_source.ArrayRecordDataSource(self._files)

  def __getitem__(self, index: int) -> np.ndarray:
    return np.frombuffer(self._source()[index], dtype=self._dtype)

  def __repr__(self):
    return f"TokenSource({self.tokens_dir!r}, {self.split!r})"
