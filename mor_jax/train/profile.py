"""`--config.train.profile_steps=START,COUNT`: a jax.profiler trace of optimizer steps START..START+COUNT-1.

The trace goes to WORKDIR/profile (WORKDIR/profile/process_<i> for process i > 0 of a multi-process run),
as plugins/profile/<time>/<host>.xplane.pb (TensorBoard's profile plugin: `tensorboard --logdir
WORKDIR/profile`) and <host>.trace.json.gz (Perfetto, ui.perfetto.dev). Steps are numbered from 1, as in
metrics.jsonl; the trace starts before step START is dispatched and stops once step START+COUNT-1 has finished
on the device.
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax

from mor_jax.config.validate import profile_steps


class StepProfiler:
  """Starts and stops the trace around the configured steps (a no-op without train.profile_steps)."""

  def __init__(self, config, workdir: str, start_step: int):
    self.window = profile_steps(config.train.profile_steps)
    self.active = False
    self.dir = os.path.join(workdir, "profile")
    if jax.process_count() > 1 and jax.process_index() > 0:
      self.dir = os.path.join(self.dir, f"process_{jax.process_index()}")
    if self.window is not None and self.window[0] <= start_step:
      logging.warning("config.train.profile_steps=%d,%d: the run resumes at step %d, after START; no trace is "
                      "written (pick a START after %d).", *self.window, start_step, start_step)
      self.window = None

  def before(self, step: int) -> float:
    """Called before optimizer step `step` (1-based) is dispatched; returns the seconds spent starting a trace."""
    if self.window is None or step != self.window[0] or self.active:
      return 0.0
    t = time.perf_counter()
    try:
      jax.profiler.start_trace(self.dir)
    except Exception as e:  # pylint: disable=broad-except  (e.g. another trace is running): train on
      logging.warning("could not start the profile of train.profile_steps in %s (%s: %s)", self.dir,
                      type(e).__name__, e)
      self.window = None
      return time.perf_counter() - t
    self.active = True
    logging.info("profiling steps %d to %d into %s", step, step + self.window[1] - 1, self.dir)
    return time.perf_counter() - t

  def after(self, step: int, state) -> float:
    """Called after step `step` was dispatched with its output `state`: once the last traced step has finished
    on the device, stops the trace; returns the seconds spent writing it."""
    if not self.active or step < self.window[0] + self.window[1] - 1:
      return 0.0
    jax.block_until_ready(state)
    t = time.perf_counter()
    self.stop()
    return time.perf_counter() - t

  def stop(self) -> None:
    """Ends an active trace (also when the run stops inside the window)."""
    if not self.active:
      return
    self.active = False
    try:
      jax.profiler.stop_trace()
      logging.info("profile written to %s (tensorboard --logdir %s, or the .trace.json.gz in ui.perfetto.dev)",
                   self.dir, self.dir)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("the profile in %s could not be written (%s: %s)", self.dir, type(e).__name__, e)
