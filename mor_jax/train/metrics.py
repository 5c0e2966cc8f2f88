"""Metric sinks and throughput conventions.

- `MetricWriter`: one JSON object per logged step in WORKDIR/metrics.jsonl
  (stable keys: step, loss, total_loss, learning_rate, grad_norm,
  tokens_per_second, and val_loss on evaluation steps) and the same scalars
  as TensorBoard events in WORKDIR/tensorboard (tensorboardX), and to any
  `sinks` (W&B: wandb_log.py). Per-recursion arrays are lists in JSON and
  `name/r<i>` scalars in TensorBoard and W&B.
- Throughput: tokens/s counts input tokens (rows x seq_len); TFLOP/s uses
  `mor_jax.model.accounting.flops_per_token(...)["train"]` (model FLOPs, 3x
  forward, remat not counted); MFU divides by the device's peak dense bf16
  FLOP/s when the device kind is in `PEAK_FLOPS`, else it is omitted.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from mor_jax import files as files_lib

# peak dense bf16 FLOP/s per device, by substring of jax's device_kind (lower case)
# (the longest matching name wins: "h100 pcie" before "h100", which is the SXM part)
PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "h100 pcie": 756e12, "h100 nvl": 835e12, "h800": 989e12, "gh200": 989e12,
    "b200": 2250e12, "a100": 312e12, "l40s": 362e12, "a10g": 125e12, "l4": 121e12, "v100": 125e12,
    "rtx 6000 ada": 364e12, "a6000": 155e12, "tpu v5p": 459e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12,
    "tpu v4": 275e12, "tpu v6": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name in sorted(PEAK_FLOPS, key=len, reverse=True):
    if name in kind:
      return PEAK_FLOPS[name]
  return None


def to_python(value: Any) -> Any:
  """numpy scalars / arrays -> float / list (JSON-able); non-finite floats stay floats."""
  if isinstance(value, dict):
    return {k: to_python(v) for k, v in value.items()}
  arr = np.asarray(value)
  if arr.ndim == 0:
    v = arr.item()
    return float(v) if isinstance(v, (float, np.floating)) else v
  return [to_python(x) for x in arr]


def _json_safe(value):
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)          # 'nan' / 'inf' (JSON has no literal for them)
  if isinstance(value, list):
    return [_json_safe(v) for v in value]
  return value


class MetricWriter:
  """Appends metrics to WORKDIR/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    self.sinks: list = []          # more sinks of each row: objects with write(step, record), e.g. wandb_log.WandbRun
    if not enabled:
      return
    if resume_step >= 0 and os.path.exists(self.path):
      self._truncate_after(resume_step)
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1 if resume_step else None,
                             flush_secs=30)
    self._file = open(self.path, "a", encoding="utf-8")

  def _truncate_after(self, step: int) -> None:
    """Drops lines of steps after `step` (they are redone after a resume from `step`).

    The kept lines go to a temporary file that is renamed over metrics.jsonl: at every moment the file
    holds either all the old rows or the kept ones, never fewer.
    """
    with open(self.path, encoding="utf-8") as f:
      keep = [r for r in _records(f) if r.get("step", 0) <= step]
    files_lib.write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep), sync=True)

  def write(self, step: int, metrics: dict, *, jsonl: bool = True) -> None:
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _json_safe(to_python(v)) for k, v in metrics.items()})
    if jsonl:
      self._file.write(json.dumps(record) + "\n")
      self._file.flush()
    for sink in self.sinks:
      sink.write(step, record)
    for k, v in metrics.items():
      arr = np.asarray(v, dtype=np.float64)
      if arr.ndim == 0:
        self._tb.add_scalar(k, float(arr), int(step))
      else:
        for i, x in enumerate(arr.reshape(-1)):
          self._tb.add_scalar(f"{k}/r{i}", float(x), int(step))

  def histogram(self, step: int, name: str, values) -> None:
    """A TensorBoard histogram (e.g. the recursions of each validation token)."""
    if self.enabled:
      self._tb.add_histogram(name, np.asarray(values, np.float64), int(step))

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _records(lines) -> list[dict]:
  """JSON records of `lines`, skipping a line cut by a kill; a step written twice keeps its last record."""
  by_step: dict = {}
  for line in lines:
    if not line.strip():
      continue
    try:
      r = json.loads(line)
    except json.JSONDecodeError:
      continue
    by_step[r.get("step")] = r
  return sorted(by_step.values(), key=lambda r: r.get("step", 0))


def read_metrics(workdir: str) -> list[dict]:
  """The records of WORKDIR/metrics.jsonl, one per step in step order (for scripts and tests)."""
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return _records(f)
