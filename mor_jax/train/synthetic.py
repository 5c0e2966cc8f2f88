"""A checkpointable iterator of random token batches (tests, benchmarks, no data needed).

Batch i is a pure function of (seed, i), so `get_state()` is just the index
and `set_state()` resumes exactly; it yields the same dicts as
`mor_jax.data.make_iterator`: int32 `tokens`, `segment_ids` (all 1: one
document per row) and `positions` of shape [rows, seq_len + 1].
"""

from __future__ import annotations

import numpy as np


class SyntheticIterator:

  def __init__(self, *, vocab_size: int, seq_len: int, rows: int, seed: int = 0, num_batches: int | None = None):
    self.vocab_size, self.seq_len, self.rows, self.seed = vocab_size, seq_len, rows, seed
    self.num_batches = num_batches
    self.index = 0

  def __iter__(self):
    return self

  def make_batch(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, index])
    tokens = rng.integers(0, self.vocab_size, (self.rows, self.seq_len + 1), dtype=np.int64).astype(np.int32)
    positions = np.broadcast_to(np.arange(self.seq_len + 1, dtype=np.int32), tokens.shape).copy()
    return {"tokens": tokens, "segment_ids": np.ones_like(tokens), "positions": positions}

  def __next__(self) -> dict:
    if self.num_batches is not None and self.index >= self.num_batches:
      raise StopIteration
    batch = self.make_batch(self.index)
    self.index += 1
    return batch

  def get_state(self) -> dict:
    return {"index": self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state["index"])
