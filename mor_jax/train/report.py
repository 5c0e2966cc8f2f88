"""The run report: WORKDIR/report.json, report.md and loss.png.

Written at the end of training, on interruption and on a non-finite loss,
with what the reference run's report had: status, times, steps and epochs,
initial / final / average loss and the loss at 10%, 50% and 90% of training,
learning rate at start and end, trainable parameters, samples/s, tokens/s,
steps/s, total training FLOPs, devices and checkpoints.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Sequence

import jax
import numpy as np

from mor_jax import files as files_lib


def loss_summary(steps: Sequence[int], losses: Sequence[float]) -> dict:
  """initial / final / average loss and the loss at 10%, 50%, 90% of the steps run."""
  if not losses:
    return {}
  steps = np.asarray(steps)
  losses = np.asarray(losses, dtype=np.float64)
  finite = losses[np.isfinite(losses)]
  out = {"initial": float(losses[0]), "final": float(losses[-1]),
         "average": float(finite.mean()) if finite.size else float("nan")}
  last = int(steps[-1])
  for pct in (10, 50, 90):
    target = max(int(steps[0]), int(round(last * pct / 100)))
    i = int(np.argmin(np.abs(steps - target)))
    out[f"at_{pct}pct"] = float(losses[i])
    out[f"at_{pct}pct_step"] = int(steps[i])
  return out


def _fmt(v: Any, digits: int = 4) -> str:
  if v is None:
    return "n/a"
  if isinstance(v, float):
    if not math.isfinite(v):
      return str(v)
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
      return f"{v:.{digits - 1}e}"
    return f"{v:,.{digits}f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:,.0f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


def _seconds(s: float | None) -> str:
  if s is None:
    return "n/a"
  s = int(round(s))
  return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s ({s:,} s)"


def markdown(report: dict) -> str:
  r, loss, lr = report, report.get("loss", {}), report.get("learning_rate", {})
  val = report.get("val_loss", {})
  lines = [f"# Training report: {r.get('name', '')}", "",
           f"**Status: {r['status']}**" + (f" - {r['message']}" if r.get("message") else ""), "",
           "| | |", "| --- | --- |"]

  def row(k, v):
    lines.append(f"| {k} | {v} |")
  row("workdir", f"`{r.get('workdir', '')}`")
  row("total time (this run)", _seconds(r.get("total_time_seconds")))
  row("training time (all runs)", _seconds(r.get("training_time_seconds")))
  row("steps completed", f"{_fmt(r.get('steps_completed'))} / {_fmt(r.get('num_steps'))}"
      + (f" (resumed from step {r['resumed_from_step']:,})" if r.get("resumed_from_step") else ""))
  row("epochs completed", _fmt(r.get("epochs_completed"), 3))
  row("tokens seen", _fmt(r.get("tokens_seen")))
  row("initial loss", _fmt(loss.get("initial")))
  row("final loss", _fmt(loss.get("final")))
  row("average loss", _fmt(loss.get("average")))
  for pct in (10, 50, 90):
    if f"at_{pct}pct" in loss:
      row(f"loss at {pct}% (step {loss[f'at_{pct}pct_step']:,})", _fmt(loss[f"at_{pct}pct"]))
  if val:
    row("validation loss: initial", _fmt(val.get("initial")))
    at = f" (step {val['final_step']:,})" if "final_step" in val else ""
    row("validation loss: final", _fmt(val.get("final")) + at)
  row("learning rate: start / end", f"{_fmt(lr.get('start'))} / {_fmt(lr.get('end'))}")
  row("trainable parameters", _fmt(r.get("trainable_parameters")))
  row("samples / s", _fmt(r.get("samples_per_second"), 2))
  row("tokens / s", _fmt(r.get("tokens_per_second"), 1))
  row("steps / s", _fmt(r.get("steps_per_second"), 4))
  row("TFLOP/s (model FLOPs)", _fmt(r.get("tflops_per_second"), 3))
  if r.get("mfu") is not None:
    row("MFU", f"{100 * r['mfu']:.1f}%")
  row("total training FLOPs", _fmt(r.get("total_training_flops")))
  dev = r.get("devices", {})
  row("devices", f"{dev.get('count')} x {dev.get('kind')} ({dev.get('mode')}, {dev.get('processes', 1)} process(es))")
  row("batch", f"{_fmt(r.get('total_batch_size'))} sequences x {_fmt(r.get('seq_len'))} tokens "
      f"(per device {r.get('per_device_batch_size')} x accumulation {r.get('grad_accum_steps')} x "
      f"{dev.get('count')} devices)")
  ck = r.get("checkpoints", {})
  row("checkpoints written", ", ".join(str(s) for s in ck.get("written", [])) or "none")
  row("checkpoints kept", ", ".join(str(s) for s in ck.get("kept", [])) or "none")
  lines += ["", "![loss](loss.png)", ""]
  return "\n".join(lines)


def plot(path: str, steps, losses, lrs, val_steps=(), val_losses=()) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
  ax1.plot(steps, losses, lw=0.8, label="train loss (cross entropy)")
  if len(val_steps):
    ax1.plot(val_steps, val_losses, "o-", ms=3, label="validation loss")
  ax1.set_ylabel("loss")
  ax1.legend()
  ax1.grid(alpha=0.3)
  ax2.plot(steps, lrs, color="tab:orange")
  ax2.set_ylabel("learning rate")
  ax2.set_xlabel("step")
  ax2.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def clean(v):
  """`v` with non-finite floats as strings ('nan', 'inf') and tuples as lists (JSON-able)."""
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  if isinstance(v, dict):
    return {k: clean(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [clean(x) for x in v]
  return v


def add_section(workdir: str, title: str, lines) -> None:
  """Appends (or replaces) the section `## title` of WORKDIR/report.md, atomically (hooks add figures this way)."""
  path = os.path.join(workdir, "report.md")
  text = open(path, encoding="utf-8").read() if os.path.exists(path) else ""
  head = f"## {title}\n"
  if head in text:
    start = text.index(head)
    nxt = text.find("\n## ", start + len(head))
    text = text[:start] + (text[nxt + 1:] if nxt >= 0 else "")
  files_lib.write_text(path, text.rstrip("\n") + "\n\n" + head + "\n" + "\n".join(lines) + "\n")


def now() -> str:
  return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_report(workdir: str, report: dict, history: dict, val_history: Sequence[Sequence[float]] = ()) -> None:
  """Writes report.json and report.md (atomically) and loss.png into `workdir`."""
  files_lib.write_text(os.path.join(workdir, "report.json"), json.dumps(clean(report), indent=2))
  files_lib.write_text(os.path.join(workdir, "report.md"), markdown(report))
  if history.get("step"):
    vs = [int(s) for s, _ in val_history]
    vl = [float(v) for _, v in val_history]
    plot(os.path.join(workdir, "loss.png"), history["step"], history["loss"], history["learning_rate"], vs, vl)


def build_report(config, meta, acc, *, status, message, workdir, dp, tracker, ckpt, n_params, elapsed, run_time,
                 state_memory=None) -> dict:
  """The report dict of a run (see the module docstring); `acc`: the run's `setup.Accounting` (batch, FLOPs)."""
  t = config.train
  start, step = tracker.start_step, tracker.last_step
  rows_per_step, tokens_per_step, flops_per_token = acc.rows_per_step, acc.tokens_per_step, acc.flops_per_token
  peak, epoch_tokens = acc.peak, acc.epoch_tokens
  h = meta["history"]
  steps_this_run = max(0, step - start)
  tokens_seen = step * tokens_per_step
  val = meta["val_history"]
  rep = {
      "name": meta.get("name", ""), "status": status, "message": message, "workdir": workdir,
      "finished": now(), "total_time_seconds": elapsed,
      "training_time_seconds": meta.get("training_time_seconds"),
      "steps_completed": int(step), "num_steps": int(t.num_steps), "resumed_from_step": int(start),
      "steps_this_run": steps_this_run,
      "epochs_completed": tokens_seen / epoch_tokens if epoch_tokens else None,
      "tokens_seen": int(tokens_seen), "samples_seen": int(step * rows_per_step),
      "loss": loss_summary(h["step"], h["loss"]),
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
