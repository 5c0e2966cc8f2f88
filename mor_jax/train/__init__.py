"""Training: optax optimizer, train state, pure train step, pjit/pmap data parallelism,
Orbax checkpoints with exact resume, metrics and the run report.

Public API:
  train_and_evaluate(config, workdir, *, train_iterator=None, eval_iterator_fn=None) -> report dict
  Trainer(config, workdir, ...).run();  Hook   the trainer behind it (init or restore, step, evaluate, save)
  make_optimizer(config) -> (tx, schedule);  make_schedule(config);  decay_mask(params)
  TrainState;  init_state(cfg, tx, seed);  abstract_state(cfg, tx, seed)
  train_step(state, batch, *, cfg, tx, schedule, routing_mode, ...) -> (state, metrics);  eval_step
  DataParallel(mode, devices)            placement and compilation for 'pjit' / 'pmap'
  DeviceMemoryError                      the step does not fit the devices' memory (fit.py: the automatic micro-batch)
  Checkpointer(directory, max_to_keep)   Orbax save / verified restore with fallback (mor_jax.checkpoint)
"""

from mor_jax.checkpoint import Checkpointer, CheckpointMismatchError
from mor_jax.errors import DeviceMemoryError, NonFiniteLossError
from mor_jax.train.loop import train_and_evaluate
from mor_jax.train.hooks import Hook, HookContext
from mor_jax.train.trainer import Trainer
from mor_jax.train.metrics import read_metrics
from mor_jax.train.optimizer import decay_mask, make_optimizer, make_schedule
from mor_jax.train.parallel import DataParallel
from mor_jax.train.state import TrainState, abstract_state, init_state
from mor_jax.train.step import (eval_step, make_eval_step, make_train_step, routing_mode_for_step,
                                train_step)
from mor_jax.train.synthetic import SyntheticIterator

__all__ = [
    "Checkpointer", "CheckpointMismatchError", "DataParallel", "DeviceMemoryError", "Hook", "HookContext",
    "NonFiniteLossError", "SyntheticIterator",
    "TrainState", "Trainer", "abstract_state", "decay_mask", "eval_step", "init_state", "make_eval_step",
    "make_optimizer", "make_schedule", "make_train_step", "read_metrics", "routing_mode_for_step",
    "train_and_evaluate", "train_step",
]
