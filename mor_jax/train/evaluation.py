"""Validation during training: a fixed number of validation sequences, whatever the device count.

`train.eval_sequences` sequences (-1: the whole split, 0: no evaluation) are scored in batches of
per_device_batch_size x devices rows; the last batch is filled with zero-weight rows (their targets are
masked out), so exactly the same sequences count on 1 or 8 devices. (The deprecated `train.eval_batches` is converted
to `eval_sequences` by config validation.)
"""

from __future__ import annotations

from typing import Callable, Iterable

from absl import logging
import jax
import numpy as np

from mor_jax import config as config_lib


def check_multi_process(n: int, custom_iterator: bool) -> None:
  if jax.process_count() > 1 and not custom_iterator and n < 0:
    raise config_lib.ConfigError(
        f"config.train.eval_sequences: -1 (the whole validation split) needs one process; with "
        f"{jax.process_count()} processes every process must score the same number of batches: set a positive "
        "number.")


def weighted_batch(batch: dict, rows: int, keep: int) -> dict:
  """`batch` with `rows` rows, of which only the first `keep` count (the others get segment id 0)."""
  have = int(batch["tokens"].shape[0])
  if have == rows and keep >= rows:
    return batch
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    pad = np.zeros((rows - min(have, rows),) + v.shape[1:], v.dtype)
    out[k] = np.concatenate([v[:rows], pad]) if have < rows else np.array(v[:rows])
  seg = out.get("segment_ids")
  seg = np.ones_like(out["tokens"]) if seg is None else seg
  seg[min(keep, have):] = 0
  out["segment_ids"] = seg
  return out


def _local_keep(remaining: int, local_rows: int) -> int:
  """Rows of this process's share of a global batch that count, when `remaining` global rows still count."""
  first = jax.process_index() * local_rows
  return int(np.clip(remaining - first, 0, local_rows))


def evaluate(state, *, dp, eval_fn, batches: Iterable[dict], sequences: int, rows: int) -> float | None:
  """Mean validation NLL per target token over the first `sequences` sequences of `batches` (None: none)."""
  local_rows = rows // max(1, jax.process_count())
  nll = count = 0.0
  seen = 0
  try:
    for batch in batches:
      remaining = rows if sequences < 0 else sequences - seen
      if remaining <= 0:
        break
      keep = _local_keep(min(remaining, rows), local_rows)
      out = dp.fetch(eval_fn(state, dp.shard_eval_batch(weighted_batch(batch, local_rows, keep))))
      nll += float(out["nll_sum"])
      count += float(out["count"])
      seen += min(remaining, rows, int(batch["tokens"].shape[0]) * max(1, jax.process_count()))
  finally:
    close = getattr(batches, "close", None)
    if callable(close):
      close()
  if 0 < seen < sequences:
    logging.warning("validation: the split holds %d sequences, fewer than train.eval_sequences=%d.", seen, sequences)
  return nll / count if count else None


def make_evaluator(config, dp, eval_fn, eval_iterator_fn: Callable[[int], Iterable[dict]], sequences: int
                   ) -> Callable[..., float | None]:
  """`f(state) -> validation loss or None` for the trainer."""
  rows = int(config.train.per_device_batch_size) * dp.num_devices

  def run(state):
    if sequences == 0:
      return None
    return evaluate(state, dp=dp, eval_fn=eval_fn, batches=eval_iterator_fn(rows), sequences=sequences, rows=rows)
  return run
