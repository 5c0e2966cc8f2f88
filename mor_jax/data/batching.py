"""Batch-level steps shared by the pipelines (text, pre-tokenized, chat): padding the last batch, reading ahead."""

from __future__ import annotations

import grain
import numpy as np

from mor_jax.data import workers
from mor_jax.data.common import ensure_absl_flags_parsed


class PadBatch(grain.transforms.Map):
  """Pads a short last batch with all-padding rows (segment id 0)."""

  def __init__(self, batch_size: int, pad_id: int):
    self._n, self._pad = batch_size, pad_id

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    short = self._n - batch["tokens"].shape[0]
    if short <= 0:
      return batch
    out = {}
    for k, v in batch.items():
      fill = self._pad if k == "tokens" else 0
      pad = np.full((short,) + v.shape[1:], fill, dtype=v.dtype)
      out[k] = np.concatenate([v, pad], axis=0)
    return out


def prefetched(it: grain.IterDataset, d) -> grain.IterDataset:
  """`it` read ahead by data.num_workers worker processes, or by a thread (data.prefetch batches)."""
  num_workers = int(d.num_workers)
  if num_workers > 0:
    ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, int(d.prefetch))),
        worker_init_fn=workers.ExitWithParent())
  elif int(d.prefetch) > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(
        it, prefetch_buffer_size=int(d.prefetch))
  return it
