"""`train_and_evaluate(config, workdir)`: the training loop.

config -> validated config -> model + placed initial state (or the latest
good checkpoint in WORKDIR) -> grain iterator -> jitted `train_step` ->
metrics (fetched one step late) -> evaluation, Orbax saves -> report.

What lands in WORKDIR:
  checkpoints/<step>/   Orbax: train state, data-iterator state, config + history
  metrics.jsonl         one JSON object per logged step (see metrics.py)
  tensorboard/          TensorBoard events
  report.md, report.json, loss.png   written at the end, on interruption and on failure

Running again with the same WORKDIR resumes from the latest good checkpoint
(bit-exact: same parameters and loss trace as an uninterrupted run). SIGTERM
or SIGINT finishes the current step, writes a checkpoint and the report and
returns (status 'interrupted'); a second SIGINT aborts at once. A NaN or Inf
loss stops the run without saving (the last good checkpoint stays) and
raises `NonFiniteLossError` after writing the report.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from absl import logging
import jax
import ml_collections
import numpy as np

from mor_jax import config as config_lib
from mor_jax import distributed
from mor_jax.train import checkpoint as ckpt_lib
from mor_jax.train import metrics as metrics_lib
from mor_jax.train import report as report_lib
from mor_jax.train.optimizer import make_optimizer
from mor_jax.train.parallel import DataParallel, DevicePrefetcher, format_bytes
from mor_jax.train.state import abstract_state, init_state, num_params
from mor_jax.train.step import make_eval_step, make_train_step, routing_mode_for_step

META_VERSION = 1
# ModelConfig fields that change the parameter tree; a checkpoint must agree on them to be resumed
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                "tie_embeddings", "scan_layers", "strategy", "num_recursions", "mor_enable", "mor_type",
                "router_type", "balancing")


FIRST_KEYS = ("loss", "total_loss", "learning_rate", "grad_norm")


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; the message names the step and the checkpoint kept."""


class _SignalGuard:
  """First SIGTERM/SIGINT sets `received`; a second SIGINT raises KeyboardInterrupt."""

  def __init__(self):
    self.received: str | None = None
    self._old: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    logging.warning("received %s: finishing this step, writing a checkpoint and the report, then exiting "
                    "(press Ctrl-C again to abort without saving).", self.received)

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
    return False


def _select_devices(config) -> DataParallel:
  par = config.get("parallel", ml_collections.ConfigDict())
  mode = str(par.get("mode", "pjit"))
  available = jax.devices() if mode == "pjit" else jax.local_devices()
  n = int(par.get("num_devices", 0) or 0)
  if n < 0 or n > len(available):
    raise config_lib.ConfigError(f"config.parallel.num_devices: {n} requested but {len(available)} devices are "
                                 "available; use 0 for all of them.")
  if n and jax.process_count() > 1:
    raise config_lib.ConfigError(f"config.parallel.num_devices: {n} with {jax.process_count()} processes; "
                                 "multi-process runs use every device of every process (set it to 0).")
  if mode == "pjit":
    config_lib.resolve_mesh_shape(n or len(available), par.get("data", -1), par.get("fsdp", 1))
  return DataParallel(mode, available[:n] if n else available, data=int(par.get("data", -1)),
                      fsdp=int(par.get("fsdp", 1)) if mode == "pjit" else 1)


def _check_compatible(cfg: config_lib.ModelConfig, meta: dict) -> None:
  saved = meta.get("model_config", {})
  diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {getattr(cfg, k)!r}"
          for k in SHAPE_FIELDS if k in saved and _norm(saved[k]) != _norm(getattr(cfg, k))]
  if diff:
    raise ckpt_lib.CheckpointMismatchError(
        "the workdir holds checkpoints of a different model (" + "; ".join(diff) + "). Use a new --workdir, "
        "or the config that wrote them.")


def _norm(v):
  return list(v) if isinstance(v, (tuple, list)) else v


def _epoch_tokens(config) -> int | None:
  """Tokens (with EOS/BOS) in one pass over the training split, when the data package knows it."""
  try:
    from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    prepared = data_lib.prepare(config)
    split = (prepared.tokens or {}).get("splits", {}).get("train")
    if not split:
      return None
    per_doc = 1 + (1 if config.data.get("add_bos", False) else 0)
    return int(split["num_tokens"]) + per_doc * int(split["num_docs"])
  except Exception:  # pylint: disable=broad-except
    return None


def _close(it) -> None:
  close = getattr(it, "close", None)
  if callable(close):
    try:
      close()
    except Exception:  # pylint: disable=broad-except
      pass


def _now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


class _Tracker:
  """Host-side bookkeeping of fetched metrics: history, throughput, logging, progress bar."""

  def __init__(self, *, config, meta, writer, start_step, tokens_per_step, rows_per_step, flops_per_token, peak,
               num_devices, show_bar):
    t = config.train
    self.meta, self.writer = meta, writer
    self.num_steps = int(t.num_steps)
    self.log_every = max(1, int(t.log_every_steps))
    self.tokens_per_step, self.rows_per_step = tokens_per_step, rows_per_step
    self.flops_per_token, self.peak, self.num_devices = flops_per_token, peak, num_devices
    self.last_step = start_step
    self.interval_steps, self.interval_time = 0, 0.0
    self.mark = None                  # time of the previous fetch (None: excluded pause)
    self.steady_steps, self.steady_time = 0, 0.0
    self.val_pending: dict[int, float] = {}
    self.deferred = None
    self.seen = 0
    self.last_tps = None
    self.bar = None
    if show_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self.bar = tqdm(total=self.num_steps, initial=start_step, unit="step", dynamic_ncols=True, smoothing=0.05,
                      desc=str(config.get("name", "train")))
    self.show_bar = show_bar

  def start_clock(self):
    """Restart throughput timing (after compilation, evaluation or a save)."""
    self.mark = time.perf_counter()

  def pause(self):
    self.mark = None

  def process(self, step: int, metrics: dict, *, defer_log: bool = False) -> None:
    """Host metrics of `step`: NaN check, history, timing; logs them (or later, in `flush`, with val_loss)."""
    now = time.perf_counter()
    loss = float(metrics["loss"])
    total = float(metrics["total_loss"])
    gnorm = float(metrics["grad_norm"])
    if not (math.isfinite(loss) and math.isfinite(total) and math.isfinite(gnorm)):
      raise NonFiniteLossError(f"loss at step {step}: loss {loss}, total loss {total}, grad norm {gnorm}")
    h = self.meta["history"]
    h["step"].append(int(step))
    h["loss"].append(loss)
    h["learning_rate"].append(float(metrics["learning_rate"]))
    if self.mark is not None:
      dt = now - self.mark
      self.interval_steps += 1
      self.interval_time += dt
      if self.seen:                # the first step of a run includes compilation: not steady state
        self.steady_steps += 1
        self.steady_time += dt
    self.seen += 1
    self.mark = now
    self.last_step = step
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
    if step % self.log_every == 0 or step == self.num_steps or step == 1 or defer_log:
      if defer_log:
        self.deferred = (step, metrics)
      else:
        self.log(step, metrics)

  def flush(self) -> None:
    """Logs a deferred step (with its validation loss, if one was recorded meanwhile)."""
    if self.deferred is not None:
      self.log(*self.deferred)
      self.deferred = None

  def rates(self) -> dict:
    if not self.interval_steps or self.interval_time <= 0:
      return {}
    sps = self.interval_steps / self.interval_time
    out = {"steps_per_second": sps, "tokens_per_second": sps * self.tokens_per_step}
    if self.flops_per_token:
      tf = out["tokens_per_second"] * self.flops_per_token / 1e12
      out["tflops_per_second"] = tf
      out["tflops_per_second_per_device"] = tf / self.num_devices
      if self.peak:
        out["mfu"] = tf * 1e12 / (self.peak * self.num_devices)
    return out

  def log(self, step: int, metrics: dict):
    rates = self.rates()
    if rates:
      self.last_tps = rates
    rates = self.last_tps or {"tokens_per_second": float("nan"), "steps_per_second": float("nan")}
    record = {k: metrics[k] for k in FIRST_KEYS if k in metrics}
    record["tokens_per_second"] = rates["tokens_per_second"]
    record.update({k: v for k, v in metrics.items() if k not in record and k != "target_tokens"})
    record.update(rates)
    if step in self.val_pending:
      record["val_loss"] = self.val_pending.pop(step)
    self.writer.write(step, record)
    self.interval_steps, self.interval_time = 0, 0.0
    post = {"loss": f"{float(metrics['loss']):.4f}", "lr": f"{float(metrics['learning_rate']):.2e}"}
    if rates:
      post["tok/s"] = f"{rates['tokens_per_second']:,.0f}"
      if "mfu" in rates:
        post["MFU"] = f"{100 * rates['mfu']:.1f}%"
      elif "tflops_per_second" in rates:
        post["TFLOP/s"] = f"{rates['tflops_per_second']:.3g}"
    if "val_loss" in record:
      post["val"] = f"{record['val_loss']:.4f}"
    if self.bar is not None:
      self.bar.set_postfix(post, refresh=False)
    else:
      logging.info("step %d/%d %s", step, self.num_steps, " ".join(f"{k}={v}" for k, v in post.items()))

  def close(self):
    if self.bar is not None:
      self.bar.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_iterator: Iterator[dict] | None = None,
                       eval_iterator_fn: Callable[[int], Iterable[dict]] | None = None) -> dict:
  """Trains `config` in `workdir` (resuming from its latest good checkpoint) and returns the report dict.

  Args:
    config: a config from configs/ (validated here for the devices in use:
      `parallel.mode`, `parallel.num_devices`).
    workdir: where checkpoints, metrics, TensorBoard events and the report go.
    train_iterator: optional checkpointable iterator of host batches (dicts of
      int32 [total_batch_size, seq_len + 1] arrays with `get_state`/`set_state`);
      default `mor_jax.data.make_iterator(config, "train", ...)`.
    eval_iterator_fn: optional `f(global_batch_size) -> iterable of batches`
      for validation; default: one pass over the validation split (the first
      `train.eval_batches` batches).

  Raises:
    NonFiniteLossError: the loss became NaN/Inf (report written, no checkpoint of the bad state).
  """
  t_begin = time.time()
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  dp = _select_devices(config)
  config = config_lib.validate(config, num_devices=dp.num_devices)
  cfg = config_lib.model_config(config)
  pretrained = bool(config.get("init") and config.init.get("from_path"))
  if pretrained:                 # check init.from_path up front (skipped when the workdir will resume)
    from mor_jax.interop import pretrained_init  # pylint: disable=g-import-not-at-top
    pretrained_init.check_source(config, cfg, workdir)
  t = config.train
  num_steps, accum = int(t.num_steps), int(t.grad_accum_steps)
  seq_len = int(config.data.seq_len)
  document_mask = bool(config.data.get("document_mask", False))
  is_main = jax.process_index() == 0
  tx, schedule = make_optimizer(config)

  default_data = train_iterator is None
  multi_process = jax.process_count() > 1
  if multi_process and eval_iterator_fn is None and int(t.eval_batches) < 0:
    raise config_lib.ConfigError(f"config.train.eval_batches: -1 (the whole validation split) needs one process; "
                                 f"with {jax.process_count()} processes every process must score the same number of "
                                 "batches: set a positive number.")
  if train_iterator is None or eval_iterator_fn is None:
    from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    if multi_process:                        # process 0 builds corpus / tokenizer / shards, the others then load them
      if is_main:
        data_lib.prepare(config)
      distributed.barrier("mor_jax_prepare_data")
  if train_iterator is None:
    train_iterator = data_lib.make_iterator(config, "train", global_batch_size=int(t.total_batch_size))
  if eval_iterator_fn is None:
    def eval_iterator_fn(batch_size):
      # several processes: a repeating iterator, so that every process has its eval_batches batches
      return data_lib.make_iterator(config, "validation", global_batch_size=batch_size,
                                    num_epochs=None if multi_process else 1)

  # ------------------------------------------------------------ state: resume or start
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(t.keep_checkpoints),
                               async_save=bool(t.get("async_checkpoints", True)))
  abstract = abstract_state(cfg, tx, int(t.seed))
  restored = ckpt.restore_latest(abstract, dp.state_shardings(abstract),
                                 check_meta=functools.partial(_check_compatible, cfg))
  if restored is not None:
    state = dp.place_state(restored.state)
    if restored.data is not None:
      train_iterator.set_state(restored.data)
    meta = restored.meta
    start = restored.step
    logging.info("resuming from the checkpoint at step %d in %s", start, ckpt.directory)
  else:
    state = dp.create_state(lambda: init_state(cfg, tx, int(t.seed)))
    if pretrained:               # fresh run only: a resumed run keeps its checkpoint (spec section 7)
      state = pretrained_init.apply_to_state(config, cfg, state, dp)
    start = 0
    meta = {"version": META_VERSION, "name": str(config.get("name", "")),
            "history": {"step": [], "loss": [], "learning_rate": []}, "val_history": [],
            "training_time_seconds": 0.0, "checkpoints_written": [], "runs": []}
  meta["config"] = json.loads(config.to_json_best_effort())
  meta["model_config"] = json.loads(json.dumps(dataclasses.asdict(cfg)))
  run_info = {"started": _now(), "start_step": start, "devices": dp.num_devices, "mode": dp.mode,
              "processes": jax.process_count()}
  meta["runs"].append(run_info)

  # ------------------------------------------------------------ accounting
  n_params = num_params(abstract.params)
  rows_per_step = int(t.total_batch_size)
  tokens_per_step = rows_per_step * seq_len
  try:
    from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
    flops_per_token = float(accounting.flops_per_token(cfg, seq_len)["train"])
  except Exception:  # pylint: disable=broad-except
    flops_per_token = None
  device_kind = dp.devices[0].device_kind
  peak = metrics_lib.peak_flops(device_kind)
  logging.info("model %s: %s trainable parameters; %d x %s (%s), batch %d x %d tokens = per device %d x "
               "accumulation %d x %d devices; %s train FLOPs/token", meta["name"], f"{n_params:,}",
               dp.num_devices, device_kind, dp.mode, rows_per_step, seq_len, int(t.per_device_batch_size), accum,
               dp.num_devices, f"{flops_per_token:.3e}" if flops_per_token else "n/a")
  state_memory = dp.state_memory(abstract)
  logging.info("%s; train state per device: parameters %s, optimizer state %s, total %s", dp.describe(),
               format_bytes(state_memory["params"]), format_bytes(state_memory["opt_state"]),
               format_bytes(state_memory["total"]))

  writer = metrics_lib.MetricWriter(workdir, resume_step=start, enabled=is_main)
  show_bar = is_main and bool(t.get("progress_bar", True))
  tracker = _Tracker(config=config, meta=meta, writer=writer, start_step=start, tokens_per_step=tokens_per_step,
                     rows_per_step=rows_per_step, flops_per_token=flops_per_token, peak=peak,
                     num_devices=dp.num_devices, show_bar=show_bar)

  if dp.mode == "pjit":                       # exactly the placement the step is compiled for (no-op when it is)
    state = dp.place_state(state)
  train_fn = dp.ahead_of_time(dp.compile_train_step(        # pjit: compiled ahead of time, memory analysis logged
      make_train_step(cfg, tx, schedule, document_mask=document_mask),
      dp.state_shardings(abstract) if dp.mode == "pjit" else None))
  eval_fn = dp.compile_eval_step(make_eval_step(cfg, document_mask=document_mask))
  eval_batches = int(t.eval_batches)
  eval_every = int(t.eval_every_steps)
  eval_rows = int(t.per_device_batch_size) * dp.num_devices
  if int(t.save_every_steps) > 0:
    save_every = int(t.save_every_steps)
  elif float(t.save_interval) > 0:
    save_every = max(1, int(round(float(t.save_interval) * num_steps)))
  else:
    save_every = 0                           # only at the end
  max_this_run = int(t.get("max_steps_per_run", 0) or 0)

  def evaluate(st) -> float | None:
    if eval_batches == 0:
      return None
    it = eval_iterator_fn(eval_rows)
    nll = count = 0.0
    try:
      for i, batch in enumerate(it):
        if 0 < eval_batches <= i:
          break
        out = dp.fetch(eval_fn(st, dp.shard_eval_batch(batch)))
        nll += float(out["nll_sum"])
        count += float(out["count"])
    finally:
      _close(it)
    return nll / count if count else None

  def record_val(step, st):
    tracker.pause()
    v = evaluate(st)
    if v is not None:
      meta["val_history"].append([int(step), float(v)])
      tracker.val_pending[step] = v
      if step == 0:
        writer.write(0, {"val_loss": v}, jsonl=False)
      logging.info("step %d: validation loss %.4f", step, v)
    tracker.start_clock()

  last_saved = start if restored is not None else -1

  def save(step, st, data_state):
    nonlocal last_saved
    tracker.pause()
    meta["training_time_seconds"] = meta_time_base + (time.time() - t_loop)
    meta["checkpoints_written"].append(int(step))
    run_info["end_step"] = int(step)
    ckpt.save(step, dp.unreplicate(st), data_state, copy.deepcopy(meta))
    last_saved = step
    tracker.start_clock()

  status, message, error = "completed", "", None
  step = start
  data_state = train_iterator.get_state() if hasattr(train_iterator, "get_state") else None
  meta_time_base = float(meta.get("training_time_seconds", 0.0))
  t_loop = time.time()
  pending = None                              # (step, device metrics) not yet fetched
  feed = DevicePrefetcher(train_iterator, lambda b: dp.shard_train_batch(b, accum),
                          int(config.parallel.get("prefetch", 0)) if "parallel" in config else 0)
  stop_flags: list = []                       # several processes: 'any process got a signal', per step (device)
  try:
    with _SignalGuard() as guard:
      if start == 0 and eval_batches != 0:
        record_val(0, state)
      if start >= num_steps:
        message = f"already complete at step {start} of {num_steps}; nothing to do"
        logging.info(message)
      tracker.start_clock()
      while step < num_steps:
        if multi_process:                     # all processes stop at the same step: decide on a flag two steps old
          if len(stop_flags) > 1 and bool(dp.fetch(stop_flags.pop(0))):
            status, message = "interrupted", f"stopped by a signal to one of the processes at step {step}"
            break
        elif guard.received:
          status, message = "interrupted", f"stopped by {guard.received} at step {step}"
          break
        if max_this_run and step - start >= max_this_run:
          status, message = "paused", f"train.max_steps_per_run={max_this_run} reached at step {step}; run again to continue"
          break
        try:
          device_batch, data_state = next(feed)   # the iterator's state right after this batch
        except StopIteration:
          status, message = "stopped", f"the training data ran out at step {step}"
          break
        state, metrics = train_fn(state, device_batch, routing_mode_for_step(cfg, step))
        step += 1
        if multi_process:
          stop_flags.append(dp.any_process(guard.received is not None))
        if pending is not None:               # the previous step's metrics: the device is busy with this one
          tracker.process(pending[0], dp.fetch(pending[1]))
        pending = (step, metrics)
        do_eval = eval_every > 0 and step % eval_every == 0 and step != num_steps
        do_save = save_every and step % save_every == 0 and step != num_steps
        if do_eval or do_save:                # these wait for the step anyway; never save an unchecked step
          tracker.process(step, dp.fetch(metrics), defer_log=True)
          pending = None
          if do_eval:
            record_val(step, state)
          tracker.flush()
          if do_save:
            save(step, state, data_state)
      if pending is not None:
        tracker.process(pending[0], dp.fetch(pending[1]), defer_log=True)
        pending = None
      if status == "completed" and eval_batches != 0 and step > start:
        record_val(step, state)
      tracker.flush()
      if step > max(last_saved, start):
        save(step, state, data_state)
  except NonFiniteLossError as e:
    ckpt.wait()
    good = ckpt.all_steps()
    status = "failed"
    message = (f"non-finite {e}. Training stopped and nothing was saved after it; the last good checkpoint is "
               f"{'step ' + str(good[-1]) if good else 'none'}. Lower train.learning_rate or check the data; "
               "running again resumes from that checkpoint.")
    error = NonFiniteLossError(message)
    logging.error(message)
  except BaseException as e:  # pylint: disable=broad-except
    status, message, error = "aborted", f"{type(e).__name__}: {e}", e
  finally:
    tracker.close()
    feed.close()
    try:
      ckpt.close()
    finally:
      writer.close()
      _close(train_iterator)

  elapsed = time.time() - t_begin
  stored = os.path.join(workdir, "report.json")
  if status == "completed" and step == start and start >= num_steps and os.path.exists(stored):
    with open(stored, encoding="utf-8") as f:            # a finished run: keep its report as it is
      report = json.load(f)
    report.update(message=message, steps_this_run=0, resumed_from_step=start)
    return report
  meta["training_time_seconds"] = meta_time_base + (time.time() - t_loop)
  run_info.update(end_step=int(tracker.last_step), status=status)
  report = _build_report(config, meta, status=status, message=message, workdir=workdir, dp=dp,
                         start=start, step=tracker.last_step, elapsed=elapsed, tracker=tracker,
                         n_params=n_params, flops_per_token=flops_per_token, peak=peak, ckpt=ckpt,
                         rows_per_step=rows_per_step, tokens_per_step=tokens_per_step, run_time=time.time() - t_loop,
                         state_memory=state_memory,
                         epoch_tokens=_epoch_tokens(config) if default_data else None)
  if is_main:
    report_lib.write_report(workdir, report, meta["history"], meta["val_history"])
    logging.info("report: %s (status %s)", os.path.join(workdir, "report.md"), status)
  if error is not None:
    raise error
  return report


def _build_report(config, meta, *, status, message, workdir, dp, start, step, elapsed, tracker, n_params,
                  flops_per_token, peak, ckpt, rows_per_step, tokens_per_step, run_time, epoch_tokens,
                  state_memory=None) -> dict:
  t = config.train
  h = meta["history"]
  steps_this_run = max(0, step - start)
  tokens_seen = step * tokens_per_step
  val = meta["val_history"]
  rep = {
      "name": meta.get("name", ""), "status": status, "message": message, "workdir": workdir,
      "finished": _now(), "total_time_seconds": elapsed,
      "training_time_seconds": meta.get("training_time_seconds"),
      "steps_completed": int(step), "num_steps": int(t.num_steps), "resumed_from_step": int(start),
      "steps_this_run": steps_this_run,
      "epochs_completed": tokens_seen / epoch_tokens if epoch_tokens else None,
      "tokens_seen": int(tokens_seen), "samples_seen": int(step * rows_per_step),
      "loss": report_lib.loss_summary(h["step"], h["loss"]),
      "learning_rate": {"start": h["learning_rate"][0] if h["learning_rate"] else None,
                        "end": h["learning_rate"][-1] if h["learning_rate"] else None},
      "trainable_parameters": int(n_params),
      "total_batch_size": rows_per_step, "per_device_batch_size": int(t.per_device_batch_size),
      "grad_accum_steps": int(t.grad_accum_steps), "seq_len": int(config.data.seq_len),
      "devices": {"count": dp.num_devices, "kind": dp.devices[0].device_kind, "platform": dp.devices[0].platform,
                  "mode": dp.mode, "processes": jax.process_count(),
                  "mesh": {"data": dp.data_size, "fsdp": dp.fsdp_size}},
      "memory": {"state_per_device": state_memory or {}, "compiled": dict(dp.compiled_memory)},
      "checkpoints": {"directory": ckpt.directory, "written": list(meta.get("checkpoints_written", [])),
                      "kept": ckpt.all_steps()},
      "runs": meta.get("runs", []),
      "compilations": dict(dp.trace_counts),    # traces of train_step / eval_step in this run
  }
  if val:
    rep["val_loss"] = {"initial": val[0][1], "initial_step": val[0][0], "final": val[-1][1], "final_step": val[-1][0]}
  if steps_this_run and run_time > 0:
    sps = steps_this_run / run_time
    rep.update(steps_per_second=sps, samples_per_second=sps * rows_per_step, tokens_per_second=sps * tokens_per_step)
  if tracker.steady_steps and tracker.steady_time > 0:
    steady = tracker.steady_steps / tracker.steady_time
    rep["steady_tokens_per_second"] = steady * tokens_per_step
    if flops_per_token:
      rep["tflops_per_second"] = steady * tokens_per_step * flops_per_token / 1e12
      if peak:
        rep["mfu"] = rep["tflops_per_second"] * 1e12 / (peak * dp.num_devices)
  if flops_per_token:
    rep["flops_per_token"] = flops_per_token
    rep["total_training_flops"] = float(flops_per_token * tokens_seen)
  return rep
