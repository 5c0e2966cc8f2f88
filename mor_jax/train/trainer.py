"""The trainer: init or restore, step, evaluate, save, with hooks; `Trainer(config, workdir).run()`.

config -> validated config -> the workdir lock -> model + placed initial state, or the newest good
checkpoint (checked: mor_jax.checkpoint) -> data iterator -> jitted `train_step` -> metrics (fetched one
step late) -> evaluation, Orbax saves -> report.

What lands in WORKDIR:
  .lock                 the workdir lock (one run per workdir)
  checkpoints/<step>/   Orbax: train state, data-iterator state, meta; checksums.json
  metrics.jsonl         one JSON object per logged step (see metrics.py)
  tensorboard/          TensorBoard events
  wandb/, wandb_run_id  with logging.wandb=offline|online: the W&B run folders and the run id (wandb_log.py)
  profile/              with train.profile_steps=START,COUNT: the jax.profiler trace (profile.py)
  report.md, report.json, loss.png   written at the end, on interruption and on failure

Statuses (`report["status"]`): 'completed'; 'interrupted' (SIGTERM/SIGINT: the step finishes, a checkpoint
and the report are written) and 'paused' (train.max_steps_per_run reached): run again to continue;
'stopped' (the training data ran out), 'failed' (non-finite loss, a checkpoint that could not be written:
the report is written, then the error raised; also out of device memory, as one-line DeviceMemoryError),
'aborted' (any other exception, re-raised). Errors before the first step (lock held, checkpoint mismatch or
unreadable, bad config, no micro-batch fits the memory budget) raise and write nothing.

Hooks (hooks.py: `Hook` subclasses with a small `HookContext`, on_metrics every `Hook.every` steps) see the
start, fetched steps' metrics, each validation loss, each save, an early stop (signal, pause, end of data) and the
report. When evaluation and saving are due is the `Schedule`'s (setup.py), not the step's. A fresh run's initial
parameters come from `init_params_fn` when given (the entry point's: pretrained weights, interop/pretrained_init.py).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Callable, Iterable, Sequence

from absl import logging
import jax

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as config_lib
from mor_jax.checkpoint import integrity, schema
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.errors import ConfigError, NonFiniteLossError
from mor_jax.kernels import policy as policy_lib
from mor_jax.train import evaluation
from mor_jax.train import finetune
from mor_jax.train import fit as fit_lib
from mor_jax.train import metrics as metrics_lib
from mor_jax.train import report as report_lib
from mor_jax.train import setup
from mor_jax.train import wandb_log
from mor_jax.train.optimizer import make_optimizer
from mor_jax.train.prefetch import DevicePrefetcher
from mor_jax.train.profile import StepProfiler
from mor_jax.train.signals import SignalGuard
from mor_jax.train.state import abstract_state, init_state, num_params
from mor_jax.train.step import make_eval_step, routing_mode_for_step
from mor_jax.train.hooks import Hook, HookContext
from mor_jax.train.tracker import Tracker


InitParamsFn = Callable[..., object]   # (validated config, ModelConfig, fresh placed TrainState, DataParallel) -> state


def _close(it) -> None:
  close = getattr(it, "close", None)
  if callable(close):
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      pass


class Trainer:
  """One training run of `config` in `workdir` (see the module docstring)."""

  def __init__(self, config, workdir: str, *, train_iterator=None,
               eval_iterator_fn: Callable[[int], Iterable[dict]] | None = None, hooks: Sequence[Hook] = (),
               eval_at: Callable[[int], bool] | None = None, init_params_fn: InitParamsFn | None = None):
    self.workdir = os.path.abspath(os.path.expanduser(workdir))
    config = finetune.resolve_config(config)    # chat data: epochs -> steps; warm-up fraction -> steps
    devices = setup.select_devices(config)
    self.config = config_lib.validate(config, num_devices=len(devices))   # once (FSDP's axes use it too)
    self.cfg = config_lib.model_config(self.config)
    self.dp = setup.data_parallel(self.config, self.cfg, devices)
    wandb_log.check_installed(self.config)      # before any heavy work
    self.policy = policy_lib.resolve(self.config, jax.default_backend())   # how this backend runs the model
    logging.info("%s", self.policy.describe())
    self.tx, self.schedule = make_optimizer(self.config)
    self.num_steps = int(self.config.train.num_steps)
    self.eval_sequences = int(self.config.train.eval_sequences)   # -1: the whole split, 0: none
    evaluation.check_multi_process(self.eval_sequences, eval_iterator_fn is not None)
    if self.config.init.from_path and init_params_fn is None and not ckpt_lib.has_checkpoints(self.workdir):
      raise ConfigError("config.init.from_path: set, but nothing initialises from it: pass init_params_fn="
                        "mor_jax.interop.pretrained_init.apply_to_state (after pretrained_init.resolve(config, "
                        "workdir), as main.py does), or set it to '' to train from scratch.")
    self.init_params_fn = init_params_fn
    self.hooks = list(hooks)
    self.timing = setup.Timing(self.config, eval_at)       # when evaluation and saving are due
    self._given = (train_iterator, eval_iterator_fn)
    self.is_main = jax.process_index() == 0
    self.ckpt = self.state = self.meta = None
    self.start = self.step = 0
    self.abstract = abstract_state(self.cfg, self.tx, int(self.config.train.seed))
    # train.per_device_batch_size=0 / execution.remat_policy=auto: candidates compiled (not run) against the budget
    self.steps, self.fit, self.policy = fit_lib.fit_run(self.config, self.dp, self.cfg, self.tx, self.schedule,
                                                        self.policy, self.abstract)

  # ------------------------------------------------------------------ the run
  def run(self) -> dict:
    """Trains to `train.num_steps` (or until interrupted); returns the report dict."""
    self.t_begin = time.time()
    with ckpt_lib.WorkdirLock(self.workdir):
      self.train_iterator, self.eval_iterator_fn = setup.data_iterators(self.config, *self._given)
      try:
        self.init_or_restore()
        self._prepare()
      except BaseException as e:
        _close(self.train_iterator)
        if self.ckpt is not None:
          self.ckpt.close()
        if fit_lib.is_out_of_memory(e):      # one line instead of XLA's trace; nothing was written
          raise self._aborted(e)[2] from None
        raise
      return self._train()

  def init_or_restore(self) -> None:
    """The newest good checkpoint's state, iterator position and meta, or a fresh (or pretrained) state."""
    t = self.config.train
    self.ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoints_dir(self.workdir), max_to_keep=int(t.keep_checkpoints),
                                      async_save=bool(t.async_checkpoints))
    allow = schema.allowed_changes(self.config)

    def check(meta):
      for line in schema.change_lines(schema.config_changes(meta, self.config)):
        logging.info("config differs from the checkpoint's: %s", line)
      changed = schema.check_compatible(meta, self.config, self.abstract, where=self.ckpt.directory, allow=allow)
      if changed:
        logging.warning("resuming with changed fields %s (allowed by train.allow_changes).",
                        ", ".join(schema.config_key(k) for k in changed))
    restored = self.ckpt.restore_latest(self.abstract, self.dp.state_shardings(self.abstract), check_meta=check)
    if restored is not None:
      self.state = self.dp.place_state(restored.state)
      if restored.data is not None:
        self.train_iterator.set_state(restored.data)
      self.meta, self.start = restored.meta, restored.step
      logging.info("resuming from the checkpoint at step %d in %s", self.start, self.ckpt.directory)
    else:
      self.state = self.dp.create_state(lambda: init_state(self.cfg, self.tx, int(t.seed)))
      if self.init_params_fn is not None:   # fresh run only: a resumed run keeps its checkpoint (spec section 7)
        self.state = self.init_params_fn(self.config, self.cfg, self.state, self.dp)
      self.meta = schema.new_meta(self.config, self.abstract)
    self.meta.pop("model_config", None)              # version 1's name of the architecture
    self.meta.update(schema.describe(self.config, self.abstract))
    self.meta.update(ckpt_params.store_tokenizer(self.workdir, config=self.config, write=self.is_main))
    self.step = self.start
    self.last_saved = self.start if restored is not None else -1
    self.run_info = {"started": report_lib.now(), "start_step": self.start, "devices": self.dp.num_devices,
                     "mode": self.dp.mode, "processes": jax.process_count(), **fit_lib.run_record(self.config,
                                                                                                  self.fit)}
    self.meta["runs"].append(self.run_info)

  def _prepare(self) -> None:
    """Accounting, metric sinks, compiled train and eval steps, the hooks' context."""
    t = self.config.train
    self.accounting = setup.accounting(self.config, self.cfg, self.dp, own_data=self._given[0] is None)
    self.state_memory = setup.log_model(self.meta["name"], self.config, self.dp, self.abstract,
                                        self.accounting.flops_per_token)
    self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=self.start, enabled=self.is_main)
    self.tracker = Tracker(config=self.config, meta=self.meta, writer=self.writer, start_step=self.start,
                           tokens_per_step=self.accounting.tokens_per_step, rows_per_step=int(t.total_batch_size),
                           flops_per_token=self.accounting.flops_per_token, peak=self.accounting.peak,
                           num_devices=self.dp.num_devices, show_bar=self.is_main and bool(t.progress_bar))
    if self.dp.mode == "pjit":                # exactly the placement the step is compiled for (no-op when it is)
      self.state = self.dp.place_state(self.state)
    self.train_fn = self.steps.run_fn(self.fit, self.policy.remat_policy)
    eval_fn = self.dp.compile_eval_step(make_eval_step(self.cfg, document_mask=bool(self.config.data.document_mask),
                                                       policy=self.policy))
    self.evaluator = evaluation.make_evaluator(self.config, self.dp, eval_fn, self.eval_iterator_fn,
                                               self.eval_sequences)
    self.profiler = StepProfiler(self.config, self.workdir, self.start)
    self.ctx = HookContext(config=self.config, cfg=self.cfg, workdir=self.workdir, is_main=self.is_main,
                           tokenizer_dir=ckpt_params.tokenizer_folder(self.workdir),
                           variables=lambda: self.dp.unreplicate(self.state).variables(),
                           eval_batches=self.eval_iterator_fn, seen=lambda: dict(self.meta.get("seen") or {}),
                           histogram=getattr(self.writer, "histogram", None))

  def _train(self) -> dict:
    status, message, error = "completed", "", None
    self.data_state = self.train_iterator.get_state() if hasattr(self.train_iterator, "get_state") else None
    self.meta_time_base = float(self.meta.get("training_time_seconds", 0.0))
    self.t_loop = time.time()
    self.feed = DevicePrefetcher(self.train_iterator, lambda b: self.dp.shard_train_batch(b, int(
        self.config.train.grad_accum_steps)), int(self.config.parallel.prefetch))
    self.wandb = wandb_log.open_run(self.config, self.workdir, enabled=self.is_main)
    if self.wandb is not None:
      self.writer.sinks.append(self.wandb)
    try:
      with SignalGuard() as guard:
        status, message = self._loop(guard)
    except NonFiniteLossError as e:
      status, message, error = self._non_finite(e)
    except ckpt_lib.CheckpointSaveError as e:
      status, message, error = "failed", str(e), e
    except BaseException as e:  # pylint: disable=broad-except
      status, message, error = self._aborted(e)
    finally:
      closing_error = self._close_all()
    if closing_error is not None and error is None:
      status, message, error = "failed", str(closing_error), closing_error
    if status == "failed":
      logging.error(message)
    report = self._report(status, message)
    if self.wandb is not None:
      self.wandb.finish(report, self.workdir)
    if error is not None:
      raise error
    return report

  def _aborted(self, e: BaseException) -> tuple[str, str, BaseException]:
    if not fit_lib.is_out_of_memory(e):
      return "aborted", f"{type(e).__name__}: {e}", e
    error = fit_lib.runtime_error(e, config=self.config, dp=self.dp, state_bytes=self.steps.state_bytes,
                                  step=self.step, last_checkpoint=getattr(self, "last_saved", -1))
    return "failed", str(error), error       # out of device memory: one line; no checkpoint of this state

  def _close_all(self) -> ckpt_lib.CheckpointSaveError | None:
    self.profiler.stop()
    self.tracker.close()
    self.feed.close()
    try:
      self.ckpt.close()                       # waits for the last save: its failure is reported here
    except ckpt_lib.CheckpointSaveError as e:
      return e
    finally:
      self.writer.close()
      _close(self.train_iterator)
    return None

  # ------------------------------------------------------------------ steps
  def _hooks(self, event: str, *args) -> None:
    for h in self.hooks:
      getattr(h, event)(self.ctx, *args)

  def _loop(self, guard: SignalGuard) -> tuple[str, str]:
    status, message = "completed", ""
    self.stop_flags: list = []              # several processes: 'any process got a signal', per step (device)
    self._hooks("on_start")
    if self.start == 0 and self.eval_sequences != 0:
      self.evaluate(0)
    if self.start >= self.num_steps:
      message = f"already complete at step {self.start} of {self.num_steps}; nothing to do"
      logging.info(message)
    self.tracker.start_clock()
    pending = None                           # (step, device metrics) not yet fetched
    while self.step < self.num_steps:
      stop = self._stop_reason(guard)
      if stop is None:
        try:
          device_batch, self.data_state = next(self.feed)   # the iterator's state right after this batch
        except StopIteration:
          stop = "stopped", f"the training data ran out at step {self.step}"
      if stop is not None:
        status, message = stop
        self._hooks("on_stop", status, message)
        break
      metrics = self.train_step(device_batch, guard)
      pending = self._after_step(self.step, metrics, pending)
    if pending is not None:
      self._metrics(pending[0], self.dp.fetch(pending[1]), defer_log=True)
    if status == "completed" and self.eval_sequences != 0 and self.step > self.start:
      self.evaluate(self.step)
    self.tracker.flush()
    if self.step > max(self.last_saved, self.start):
      self.save(self.step)
    return status, message

  def _stop_reason(self, guard: SignalGuard) -> tuple[str, str] | None:
    if jax.process_count() > 1:              # all processes stop at the same step: decide on a flag two steps old
      if len(self.stop_flags) > 1 and bool(self.dp.fetch(self.stop_flags.pop(0))):
        return "interrupted", f"stopped by a signal to one of the processes at step {self.step}"
    elif guard.received:
      return "interrupted", f"stopped by {guard.received} at step {self.step}"
    limit = int(self.config.train.max_steps_per_run)
    if limit and self.step - self.start >= limit:
      return "paused", f"train.max_steps_per_run={limit} reached at step {self.step}; run again to continue"
    return None

  def train_step(self, device_batch, guard: SignalGuard):
    """One optimizer step; returns its metrics (on the device, not waited for)."""
    self.tracker.exclude(self.profiler.before(self.step + 1))   # starting or writing a trace is no step time
    self.state, metrics = self.train_fn(self.state, device_batch, routing_mode_for_step(self.cfg, self.step))
    self.step += 1
    if self.step == self.start + 1:          # this process's first step was compiled in the call: time from here
      self.tracker.start_clock()
    self.tracker.exclude(self.profiler.after(self.step, self.state))
    if jax.process_count() > 1:
      self.stop_flags.append(self.dp.any_process(guard.received is not None))
    return metrics

  def _after_step(self, step: int, metrics, pending):
    """The previous step's metrics (fetched while the device runs this one), then evaluation / a save when due;
    returns what is still to fetch."""
    if pending is not None:
      self._metrics(pending[0], self.dp.fetch(pending[1]))
    self.ckpt.poll()                         # a failed background save stops the run now
    do_eval, do_save = self.timing.due(step)
    if not (do_eval or do_save):
      return step, metrics
    self._metrics(step, self.dp.fetch(metrics), defer_log=True)   # they wait for the step anyway; never save an
    if do_eval:                                                     # unchecked step
      self.evaluate(step)
    self.tracker.flush()
    if do_save:
      self.save(step)
    return None

  def _metrics(self, step: int, metrics: dict, *, defer_log: bool = False) -> None:
    self.tracker.process(step, metrics, defer_log=defer_log)
    for h in self.hooks:
      if h.due(step):
        h.on_metrics(self.ctx, step, metrics)

  def evaluate(self, step: int) -> float | None:
    """Validation loss of the current state (recorded under `step`), or None without evaluation."""
    self.tracker.pause()
    v = self.evaluator(self.state)
    if v is not None:
      self.meta["val_history"].append([int(step), float(v)])
      self.tracker.val_pending[step] = v
      if step == 0:
        self.writer.write(0, {"val_loss": v}, jsonl=False)
      logging.info("step %d: validation loss %.4f", step, v)
      self._hooks("on_eval", step, v)
    self.tracker.start_clock()
    return v

  def save(self, step: int) -> None:
    """Starts the checkpoint of the current state at `step` (the previous save is checked first)."""
    self.tracker.pause()
    self.meta["training_time_seconds"] = self.meta_time_base + (time.time() - self.t_loop)
    self.meta["checkpoints_written"].append(int(step))
    self.run_info["end_step"] = int(step)
    try:
      self.ckpt.save(step, self.dp.unreplicate(self.state), self.data_state, copy.deepcopy(self.meta))
    except ckpt_lib.CheckpointSaveError:
      self.meta["checkpoints_written"].pop()
      raise
    self.last_saved = step
    self._hooks("on_save", step)
    self.tracker.start_clock()

  # ------------------------------------------------------------------ the end
  def _non_finite(self, e: NonFiniteLossError) -> tuple[str, str, Exception]:
    try:
      self.ckpt.wait()
    except ckpt_lib.CheckpointSaveError as save_error:
      logging.error("%s", save_error)
    good = self.ckpt.all_steps()
    try:
      bad = integrity.nonfinite_leaves(self.state.params)
    except Exception:  # pylint: disable=broad-except
      bad = []
    params = f"; non-finite parameters after it: {', '.join(bad[:3])}" if bad else ""
    message = (f"non-finite {e}{params}. Training stopped and nothing was saved after it; the last good "
               f"checkpoint is {'step ' + str(good[-1]) if good else 'none'}. Lower train.learning_rate or check "
               "the data; running again resumes from that checkpoint.")
    return "failed", message, NonFiniteLossError(message, step=e.step)

  def _report(self, status: str, message: str) -> dict:
    stored = os.path.join(self.workdir, "report.json")
    if status == "completed" and self.step == self.start >= self.num_steps and os.path.exists(stored):
      with open(stored, encoding="utf-8") as f:            # a finished run: keep its report as it is
        report = json.load(f)
      report.update(message=message, steps_this_run=0, resumed_from_step=self.start)
      return report
    self.meta["training_time_seconds"] = self.meta_time_base + (time.time() - self.t_loop)
    self.run_info.update(end_step=int(self.tracker.last_step), status=status)
    report = report_lib.build_report(
        self.config, self.meta, self.accounting, status=status, message=message, workdir=self.workdir, dp=self.dp,
        tracker=self.tracker, ckpt=self.ckpt, n_params=num_params(self.abstract.params),
        elapsed=time.time() - self.t_begin, run_time=time.time() - self.t_loop, state_memory=self.state_memory)
    if self.is_main:
      try:
        report_lib.write_report(self.workdir, report, self.meta["history"], self.meta["val_history"])
        logging.info("report: %s (status %s)", os.path.join(self.workdir, "report.md"), status)
      except OSError as e:
        logging.error("could not write the report to %s: %s", self.workdir, e)
    self._hooks("on_end", report)
    return report
