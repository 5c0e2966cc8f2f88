"""Trainer hooks: what they see (`HookContext`) and when they run (`Hook.every`), as levanter's and clu's do.

A hook gets a small context, not the trainer: the run's validated config and model config, the workdir, whether
this is process 0, the workdir's tokenizer folder, and functions for what changes while training (the current
variables on the host, the validation batches, the running totals of chat data, a TensorBoard histogram).

  class MyHook(Hook):
    every = 10                                   # on_metrics after every 10th step (1: each step, 0: never)
    def on_metrics(self, ctx, step, metrics): ...

`train_and_evaluate` (loop.py) runs the default hooks (`default_hooks(config)`: the routing pictures of routed
models, the chat-data report of fine-tuning) before the caller's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import ml_collections

from mor_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class HookContext:
  """What a hook sees of the run (see the module docstring)."""
  config: ml_collections.ConfigDict             # validated for the devices in use
  cfg: ModelConfig
  workdir: str
  is_main: bool                                 # process 0 (writes files)
  tokenizer_dir: str | None                     # WORKDIR/tokenizer/ when it holds a tokenizer.json
  variables: Callable[[], dict]                 # the current params (and router bias), on the host
  eval_batches: Callable[[int], Iterable[dict]]  # validation batches of the given global size
  seen: Callable[[], dict]                      # running totals of chat data (examples, tokens, ...)
  histogram: Callable[[int, str, Any], None] | None = None   # TensorBoard histogram (step, tag, values)


class Hook:
  """Called by the trainer on every process; override what you need. `every`: on_metrics after every N-th step."""

  every: int = 1

  def due(self, step: int) -> bool:
    return self.every > 0 and step % self.every == 0

  def on_start(self, ctx: HookContext) -> None:
    """The state is initialised or restored; the first step comes next."""

  def on_metrics(self, ctx: HookContext, step: int, metrics: dict) -> None:
    """Host metrics of a finished step (loss, grad_norm, learning_rate, ...), for the steps `due`."""

  def on_eval(self, ctx: HookContext, step: int, val_loss: float) -> None:
    """A validation loss of the state after `step` steps."""

  def on_save(self, ctx: HookContext, step: int) -> None:
    """A checkpoint of `step` was started."""

  def on_stop(self, ctx: HookContext, status: str, message: str) -> None:
    """The loop stops early: a signal ('interrupted'), train.max_steps_per_run ('paused'), no more data."""

  def on_end(self, ctx: HookContext, report: dict) -> None:
    """The run ended (any status); `report` is what was written."""

