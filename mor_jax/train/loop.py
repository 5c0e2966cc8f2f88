"""`train_and_evaluate(config, workdir)`: one training run with the Trainer (see trainer.py).

Running again with the same WORKDIR resumes from the latest good checkpoint (bit-exact: same parameters
and loss trace as an uninterrupted run). SIGTERM or SIGINT finishes the current step, writes a checkpoint
and the report and returns (status 'interrupted'); a second SIGINT aborts at once. A NaN or Inf loss stops
the run without saving (the last good checkpoint stays) and raises `NonFiniteLossError` after writing the
report. The guarantees, statuses and exit codes are in docs/run-safety.md.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import ml_collections

from mor_jax.train.finetune import ChatDataReport
from mor_jax.train.hooks import Hook
from mor_jax.train.routing_pictures import RoutingPictures
from mor_jax.train.trainer import InitParamsFn, Trainer


def default_hooks(config) -> list[Hook]:
  """The hooks every run of `config` gets: pictures of routing during training (routed models with
  train.routing_pictures), the chat data's counts in the report (data.corpus='chat')."""
  hooks: list[Hook] = []
  if config.mor.enable and config.train.routing_pictures:
    hooks.append(RoutingPictures())
  if config.data.corpus == "chat":
    hooks.append(ChatDataReport())
  return hooks


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_iterator: Iterator[dict] | None = None,
                       eval_iterator_fn: Callable[[int], Iterable[dict]] | None = None,
                       hooks: Iterable[Hook] = (), init_params_fn: InitParamsFn | None = None) -> dict:
  """Trains `config` in `workdir` (resuming from its latest good checkpoint) and returns the report dict.

  Args:
    config: a config (validated here for the devices in use: `parallel.mode`, `parallel.num_devices`).
    workdir: where checkpoints, metrics, TensorBoard events and the report go (locked while training).
    train_iterator: optional checkpointable iterator of host batches (dicts of int32
      [total_batch_size, seq_len + 1] arrays with `get_state`/`set_state`); default
      `mor_jax.data.make_iterator(config, "train", ...)`.
    eval_iterator_fn: optional `f(global_batch_size) -> iterable of batches` for validation; default: one
      pass over the validation split, of which the first `train.eval_sequences` sequences count.
    hooks: `hooks.Hook`s (metrics, evaluation, saves, the end), after `default_hooks(config)`.
    init_params_fn: a fresh run's initial parameters, `f(config, model config, placed state, DataParallel) ->
      state`; with config.init.from_path set, the entry point passes what
      `mor_jax.interop.pretrained_init.resolve(config, workdir)` returns (with its config), as main.py does.

  Raises:
    NonFiniteLossError: the loss became NaN/Inf (report written, no checkpoint of the bad state).
    DeviceMemoryError: the step does not fit the devices' memory: no candidate of train.per_device_batch_size=0 /
      execution.remat_policy=auto fits (nothing written), or XLA ran out while training (report written, no
      checkpoint touched); one line naming the bytes needed and available and settings that fit.
    mor_jax.checkpoint.CheckpointError: the workdir is locked by another run, its checkpoints belong to
      another model or are unreadable (nothing written), or a checkpoint could not be written (report written).
  """
  return Trainer(config, workdir, train_iterator=train_iterator, eval_iterator_fn=eval_iterator_fn,
                 hooks=tuple(default_hooks(config)) + tuple(hooks), init_params_fn=init_params_fn).run()
