"""Host-side bookkeeping of a training run's fetched metrics: NaN guard, history, throughput, logging,
progress bar; rows go to the MetricWriter (metrics.jsonl, TensorBoard)."""

from __future__ import annotations

import logging as pylogging
import math
import time

from absl import logging

from mor_jax.errors import NonFiniteLossError

FIRST_KEYS = ("loss", "total_loss", "learning_rate", "grad_norm")
SEEN_KEYS = ("examples", "tokens", "target_tokens")   # chat data: running totals logged as <key>_seen


class _ClearBar(pylogging.Filter):
  """On the absl handler while a progress bar is shown: clears the bar before each log line is written, so that
  the line starts on its own (the bar is drawn again at its next update)."""

  def __init__(self, bar):
    super().__init__()
    self.bar = bar

  def filter(self, record):
    self.bar.clear()
    return True


class Tracker:
  """Host-side bookkeeping of fetched metrics: history, throughput, logging, progress bar."""

  def __init__(self, *, config, meta, writer, start_step, tokens_per_step, rows_per_step, flops_per_token, peak,
               num_devices, show_bar):
    t = config.train
    self.meta, self.writer = meta, writer
    self.num_steps = int(t.num_steps)
    self.log_every = max(1, int(t.log_every_steps))
    self.tokens_per_step, self.rows_per_step = tokens_per_step, rows_per_step
    self.flops_per_token, self.peak, self.num_devices = flops_per_token, peak, num_devices
    self.start_step = self.last_step = start_step
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
                      desc=str(config.name))
      self.clear_bar = _ClearBar(self.bar)
      logging.get_absl_handler().addFilter(self.clear_bar)
    self.show_bar = show_bar

  def start_clock(self):
    """Restart throughput timing (after compilation, evaluation or a save)."""
    self.mark = time.perf_counter()

  def pause(self):
    self.mark = None

  def exclude(self, seconds: float):
    """Leaves `seconds` just spent outside the steps (e.g. writing a profile) out of the throughput."""
    if self.mark is not None and seconds > 0:
      self.mark += seconds

  def process(self, step: int, metrics: dict, *, defer_log: bool = False) -> None:
    """Host metrics of `step`: NaN check, history, timing; logs them (or later, in `flush`, with val_loss)."""
    now = time.perf_counter()
    loss = float(metrics["loss"])
    total = float(metrics["total_loss"])
    gnorm = float(metrics["grad_norm"])
    bad = [name for name, v in (("loss", loss), ("total loss", total), ("gradient norm", gnorm))
           if not math.isfinite(v)]
    if bad:
      raise NonFiniteLossError(f"{' and '.join(bad)} at step {step} (loss {loss}, total loss {total}, gradient "
                               f"norm {gnorm})", step=step)
    if "examples" in metrics:      # chat data: totals so far, kept in the checkpoint's meta (a resumed run goes on)
      seen = self.meta.setdefault("seen", {})
      for k in SEEN_KEYS:
        seen[k] = seen.get(k, 0) + int(round(float(metrics[k])))
      metrics = {**metrics, **{f"{k}_seen": v for k, v in seen.items()}}
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
    if self.bar is not None and self.seen == 1:   # the first step includes compilation: the time since the bar
      self.bar.unpause()                            # was drawn counts neither in its clock nor in its rate and ETA
      self.bar.initial = self.bar.n = self.bar.last_print_n = step
      self.bar.refresh()
    elif self.bar is not None:
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
      logging.get_absl_handler().removeFilter(self.clear_bar)
