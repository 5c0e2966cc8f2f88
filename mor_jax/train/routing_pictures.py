"""Pictures of routing during training (routed MoR models): a trainer hook.

At every evaluation the hook runs the current model with causal routing (what generation does) over a fixed
sample of validation rows and records how many recursions each token got:

  WORKDIR/routing.jsonl        {"step", "shares": [share of tokens with 1..R recursions], "mean_recursions"}
  TensorBoard                  histogram "routing/recursions_per_token" at each evaluation
  WORKDIR/routing.png          the shares over training (from routing.jsonl, so resumed runs continue it)
  WORKDIR/routing_sample.html  the sample's text coloured by each token's depth (and routing_sample.png)

and report.md gets a section with both figures. One process only (several processes: skipped with a note).
"""

from __future__ import annotations

import json
import os

from absl import logging
import jax
import numpy as np

from mor_jax import files as files_lib
from mor_jax.data import tokenizer as tokenizer_lib
from mor_jax.model import depths
from mor_jax.train import report as report_lib
from mor_jax.train.hooks import Hook

ROUTING_FILE = "routing.jsonl"
SAMPLE_ROWS = 2


def read_history(workdir: str) -> dict[int, dict]:
  """routing.jsonl rows by step (a resumed run's row for the same step replaces the earlier one)."""
  rows = {}
  path = os.path.join(workdir, ROUTING_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          row = json.loads(line)
        except json.JSONDecodeError:      # a torn last line after a kill
          continue
        rows[int(row["step"])] = row
  return dict(sorted(rows.items()))


def plot_shares(history: dict[int, dict], R: int, path: str) -> str:
  """Stacked shares of tokens per recursion count against the training step."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = list(history)
  shares = np.array([history[s]["shares"] for s in steps]).T.reshape(R, -1)
  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  ax.stackplot(steps, shares, colors=[depths.color(d) for d in range(1, R + 1)],
               labels=[f"{d} recursion{'s' if d > 1 else ''}" for d in range(1, R + 1)])
  ax.set_xlabel("step")
  ax.set_ylabel("share of validation tokens")
  ax.set_ylim(0, 1)
  ax.set_title("recursions per token (causal routing)")
  ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
  fig.tight_layout()
  with files_lib.replacing(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=110)
  plt.close(fig)
  return path


def _pieces(folder: str | None, ids) -> list[str]:
  """Each token's text with the tokenizer in `folder` (the workdir's), else its id in brackets."""
  if folder is None:
    return [f"[{int(i)}]" for i in ids]
  tok = tokenizer_lib.load_tokenizer(folder)
  return [tok.decode([int(i)]) for i in ids]


class RoutingPictures(Hook):
  """See the module docstring. `rows`: validation rows in the sample."""

  def __init__(self, rows: int = SAMPLE_ROWS):
    self.rows = rows
    self.sample = self.rec = self.fn = None
    self.active = True

  def on_start(self, ctx) -> None:
    self.active = depths.is_routed(ctx.cfg) and jax.process_count() == 1 and ctx.is_main
    if depths.is_routed(ctx.cfg) and ctx.is_main and not self.active:
      logging.info("routing pictures: skipped with several processes")

  def _setup(self, ctx) -> bool:
    if self.fn is not None or not self.active:
      return self.active
    it = ctx.eval_batches(self.rows)
    try:
      batch = next(iter(it))
    finally:
      close = getattr(it, "close", None)
      if callable(close):
        close()
    self.sample = {k: np.asarray(v)[:self.rows] for k, v in batch.items()}
    self.sample.setdefault("segment_ids", np.ones_like(self.sample["tokens"]))   # batches without packing info
    self.fn = depths.make_depth_fn(ctx.cfg, "causal")
    return True

  def on_eval(self, ctx, step: int, val_loss: float) -> None:
    if not self._setup(ctx):
      return
    tokens = self.sample["tokens"][:, :-1]
    mask = self.sample["segment_ids"][:, :-1] > 0
    self.rec = np.asarray(jax.device_get(self.fn(ctx.variables(), tokens)))
    R = depths.max_recursions(ctx.cfg)
    row = {"step": int(step), "shares": depths.shares(self.rec, R, mask),
           "mean_recursions": float(self.rec[mask].mean()) if mask.any() else float("nan")}
    with open(os.path.join(ctx.workdir, ROUTING_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    if ctx.histogram is not None:
      ctx.histogram(int(step), "routing/recursions_per_token", self.rec[mask])

  def on_end(self, ctx, report: dict) -> None:
    if not self.active or self.rec is None:
      return
    R = depths.max_recursions(ctx.cfg)
    w = ctx.workdir
    history = read_history(w)
    plot_shares(history, R, os.path.join(w, "routing.png"))
    mask = self.sample["segment_ids"][0, :-1] > 0
    ids = self.sample["tokens"][0, :-1][mask]
    pieces = _pieces(ctx.tokenizer_dir, ids)
    title = f"{ctx.config.name} at step {max(history)}: recursions per token (causal routing)"
    files_lib.write_text(os.path.join(w, "routing_sample.html"), depths.colored_html(pieces, self.rec[0][mask],
                                                                                          R, title))
    depths.colored_png(pieces, self.rec[0][mask], R, os.path.join(w, "routing_sample.png"),
                       title="recursions per token")
    last = history[max(history)]
    report_lib.add_section(w, "Routing", [
        f"Validation tokens by recursions at step {last['step']} (causal routing, {int(mask.sum())}-token sample x "
        f"{self.rows}): " + ", ".join(f"{d}: {s:.0%}" for d, s in enumerate(last["shares"], 1)) + ".", "",
        "![routing](routing.png)", "",
        "A validation sample coloured by each token's depth ([routing_sample.html](routing_sample.html)):", "",
        "![routing sample](routing_sample.png)"])
