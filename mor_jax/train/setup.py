"""What a training run needs before its first step: devices, data iterators, accounting lines."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

from absl import logging
import jax

from mor_jax import config as config_lib
from mor_jax import distributed
from mor_jax.model.transformer import param_axes
from mor_jax.train import metrics as metrics_lib
from mor_jax.train.aot import format_bytes
from mor_jax.train.parallel import DataParallel
from mor_jax.train.state import num_params


def select_devices(config) -> list:
  """The devices of `parallel.mode` / `parallel.num_devices` (checked against the devices present), before the
  config is validated (validation needs their number)."""
  par = config.parallel
  available = jax.devices() if par.mode == "pjit" else jax.local_devices()
  n = int(par.num_devices or 0)
  if n < 0 or n > len(available):
    raise config_lib.ConfigError(f"config.parallel.num_devices: {n} requested but {len(available)} devices are "
                                 "available; use 0 for all of them.")
  if n and jax.process_count() > 1:
    raise config_lib.ConfigError(f"config.parallel.num_devices: {n} with {jax.process_count()} processes; "
                                 "multi-process runs use every device of every process (set it to 0).")
  return available[:n] if n else available


def data_parallel_for(validated) -> DataParallel:
  """The DataParallel of a config validated for its devices (`select_devices`)."""
  return data_parallel(validated, config_lib.model_config(validated), select_devices(validated))


def data_parallel(config, cfg, devices) -> DataParallel:
  """The DataParallel of the validated `config` on `devices` (FSDP: sharded by the model's logical axes)."""
  par = config.parallel
  fsdp = int(par.fsdp) if par.mode == "pjit" else 1
  axes = None
  if par.mode == "pjit" and config_lib.resolve_mesh_shape(len(devices), par.data, fsdp)[1] > 1:
    axes = param_axes(cfg)
  return DataParallel(par.mode, devices, data=int(par.data), fsdp=fsdp, param_axes=axes)


def data_iterators(config, train_iterator, eval_iterator_fn) -> tuple[object, Callable[[int], Iterable[dict]]]:
  """The given iterators, or the data package's (process 0 prepares the data first when there are several)."""
  if train_iterator is not None and eval_iterator_fn is not None:
    return train_iterator, eval_iterator_fn
  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  multi_process = jax.process_count() > 1
  if multi_process:                          # process 0 builds corpus / tokenizer / shards, the others load them
    if jax.process_index() == 0:
      data_lib.prepare(config)
    distributed.barrier("mor_jax_prepare_data")
  if train_iterator is None:
    train_iterator = data_lib.make_iterator(config, "train", global_batch_size=int(config.train.total_batch_size))
  if eval_iterator_fn is None:
    def eval_iterator_fn(batch_size):
      # several processes: a repeating iterator, so that every process has as many batches as the others
      return data_lib.make_iterator(config, "validation", global_batch_size=batch_size,
                                    num_epochs=None if multi_process else 1)
  return train_iterator, eval_iterator_fn


def epoch_tokens(config) -> int | None:
  """Tokens (with EOS/BOS) in one pass over the training split, when the data package knows it."""
  try:
    from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    split = (data_lib.prepare(config).tokens or {}).get("splits", {}).get("train")
    if not split:
      return None
    per_doc = 1 + (1 if config.data.add_bos else 0)
    return int(split["num_tokens"]) + per_doc * int(split["num_docs"])
  except Exception:  # pylint: disable=broad-except
    return None


def flops_per_token(cfg, seq_len: int) -> float | None:
  try:
    from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
    return float(accounting.flops_per_token(cfg, seq_len)["train"])
  except Exception:  # pylint: disable=broad-except
    return None


def log_model(name: str, config, dp, abstract, fpt: float | None) -> dict:
  """Logs the model size, batch layout and per-device state memory; returns the state memory."""
  t = config.train
  logging.info("model %s: %s trainable parameters; %d x %s (%s), batch %d x %d tokens = per device %d x "
               "accumulation %d x %d devices; %s train FLOPs/token", name, f"{num_params(abstract.params):,}",
               dp.num_devices, dp.devices[0].device_kind, dp.mode, int(t.total_batch_size), int(config.data.seq_len),
               int(t.per_device_batch_size), int(t.grad_accum_steps), dp.num_devices, f"{fpt:.3e}" if fpt else "n/a")
  memory = dp.state_memory(abstract)
  logging.info("%s; train state per device: parameters %s, optimizer state %s, total %s", dp.describe(),
               format_bytes(memory["params"]), format_bytes(memory["opt_state"]), format_bytes(memory["total"]))
  return memory


def save_every(config) -> int:
  """Steps between checkpoints (0: only at the end)."""
  t = config.train
  if int(t.save_every_steps) > 0:
    return int(t.save_every_steps)
  if float(t.save_interval) > 0:
    return max(1, int(round(float(t.save_interval) * int(t.num_steps))))
  return 0


class Timing:
  """When evaluation and saving are due: `due(step) -> (evaluate, save)` (the last step's are the loop's)."""

  def __init__(self, config, eval_at: Callable[[int], bool] | None = None):
    every = int(config.train.eval_every_steps)
    self.eval_at = eval_at or (lambda s: every > 0 and s % every == 0)
    self.save_every = save_every(config)
    self.num_steps = int(config.train.num_steps)

  def due(self, step: int) -> tuple[bool, bool]:
    if step == self.num_steps:
      return False, False
    return bool(self.eval_at(step)), bool(self.save_every and step % self.save_every == 0)


@dataclasses.dataclass(frozen=True)
class Accounting:
  """Per-step batch and FLOP figures of a run (the tracker's and the report's)."""
  rows_per_step: int
  tokens_per_step: int
  flops_per_token: float | None
  peak: float | None                 # per device (metrics.peak_flops), None when unknown
  epoch_tokens: int | None           # tokens in one pass over the training split, when the data package knows


def accounting(config, cfg, dp, own_data: bool = True) -> Accounting:
  rows, seq_len = int(config.train.total_batch_size), int(config.data.seq_len)
  return Accounting(rows_per_step=rows, tokens_per_step=rows * seq_len, flops_per_token=flops_per_token(cfg, seq_len),
                    peak=metrics_lib.peak_flops(dp.devices[0].device_kind),
                    epoch_tokens=epoch_tokens(config) if own_data else None)
