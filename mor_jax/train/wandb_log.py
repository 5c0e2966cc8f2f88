"""Weights & Biases logging (`--config.logging.wandb=offline|online`), on process 0 only.

The run logs the rows of metrics.jsonl (per-recursion lists as `name/r<i>` scalars, as in TensorBoard), the
validated config, and at the end the report's summary and loss.png. Offline mode writes WORKDIR/wandb/
offline-run-*/ with no network (upload later with `wandb sync WORKDIR/wandb/offline-run-*`); the run id is
kept in WORKDIR/wandb_run_id so that a resumed run continues the same W&B run. wandb is imported only when
enabled; it prints nothing to the console, and a failing call is warned about once and never stops training.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from absl import logging
import numpy as np

from mor_jax import files as files_lib
from mor_jax.errors import ConfigError
from mor_jax.train import report as report_lib

RUN_ID_FILE = "wandb_run_id"
INSTALL = "pip install -r requirements-logging.txt"


def mode(config) -> str:
  """'off', 'offline' or 'online' (logging.wandb)."""
  return str(config.logging.wandb)


def check_installed(config) -> None:
  """Raises a one-line ConfigError when W&B logging is on but the wandb package is missing."""
  if mode(config) == "off":
    return
  try:
    import wandb  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(f"config.logging.wandb: '{mode(config)}' needs the wandb package ({e}); run `{INSTALL}` or "
                      "set --config.logging.wandb=off.") from None


def run_id(workdir: str, new_id) -> str:
  """The W&B run id of `workdir` (WORKDIR/wandb_run_id), created with `new_id()` and written atomically."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      stored = f.read().strip()
    if stored:
      return stored
  rid = str(new_id())
  files_lib.write_text(path, rid + "\n")
  return rid


def scalars(record: dict) -> dict[str, float]:
  """A metrics row as W&B scalars: numbers ('nan' / 'inf' strings too) as floats, arrays as `name/r<i>`; other
  values are left out."""
  out = {}
  for k, v in record.items():
    if k == "step":
      continue
    try:
      arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
      continue
    if arr.ndim == 0:
      out[k] = float(arr)
    else:
      out.update({f"{k}/r{i}": float(x) for i, x in enumerate(arr.reshape(-1))})
  return out


def summary(report: dict, prefix: str = "") -> dict[str, Any]:
  """The report's scalars and strings, nested keys joined by '/' (lists and the workdir left out)."""
  out = {}
  for k, v in report.items():
    if isinstance(v, dict):
      out.update(summary(v, f"{prefix}{k}/"))
    elif isinstance(v, (bool, int, float, str)) and k != "workdir":
      out[f"{prefix}{k}"] = v
  return out


class WandbRun:
  """The W&B run of a training run; every call is guarded (a failure is warned about once)."""

  def __init__(self, run):
    self.run = run
    self.warned = False

  def _guard(self, what: str, fn, *args, **kwargs) -> None:
    if self.run is None:
      return
    try:
      fn(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      if not self.warned:
        logging.warning("W&B: %s failed (%s: %s); training goes on, metrics.jsonl and TensorBoard are complete "
                        "(further W&B errors are not reported).", what, type(e).__name__, e)
        self.warned = True

  def write(self, step: int, record: dict) -> None:
    """Logs one metrics row (what metrics.jsonl gets) at `step`."""
    self._guard("log", lambda: self.run.log(scalars(record), step=int(step)))

  def finish(self, report: dict, workdir: str) -> None:
    """The report's summary and plot, then the run's end (exit code 1 for a failed or aborted run)."""
    def end():
      self.run.summary.update(summary(report))
      plot = os.path.join(workdir, "loss.png")
      if os.path.exists(plot):
        import wandb  # pylint: disable=g-import-not-at-top
        self.run.log({"report/loss": wandb.Image(plot)}, commit=True)
    self._guard("the report", end)
    code = 1 if report.get("status") in ("failed", "aborted") else 0
    self._guard("finish", self.run.finish, exit_code=code)
    self.run = None


def open_run(config, workdir: str, *, enabled: bool) -> WandbRun | None:
  """Starts (or resumes) the W&B run of `workdir` when logging.wandb is on and `enabled` (process 0)."""
  kind = mode(config)
  if kind == "off" or not enabled:
    return None
  import wandb  # pylint: disable=g-import-not-at-top
  # no Weave advertising on the console (wandb prints it whenever e.g. openai is imported in the process)
  os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
  lg = config.logging
  tags = [p.strip() for t in lg.wandb_tags for p in str(t).split(",") if p.strip()]   # 'a,b' from a flag too
  try:
    rid = run_id(workdir, lambda: uuid.uuid4().hex[:16])
    run = wandb.init(project=str(lg.wandb_project) or None, entity=str(lg.wandb_entity) or None,
                     name=str(lg.wandb_run_name or config.name) or None, tags=tags or None,
                     id=rid, resume="allow", dir=workdir, mode=kind, config=report_lib.clean(config.to_dict()),
                     settings=wandb.Settings(silent=True, console="off"))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("W&B: could not start the run (%s: %s); training goes on without W&B.", type(e).__name__, e)
    return None
  where = os.path.join(workdir, "wandb")
  if kind == "offline":
    logging.info("W&B offline run %s in %s (upload it with: wandb sync %s/offline-run-*)", rid, where, where)
  else:
    logging.info("W&B run %s: %s", rid, getattr(run, "url", None) or where)
  return WandbRun(run)

