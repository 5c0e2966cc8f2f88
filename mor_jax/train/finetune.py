"""What the trainer adds for fine-tuning on chat data (configs/finetune_chat.py, docs/fine-tuning.md).

`resolve_config(config)`, before validation (the trainer calls it for every config; it returns `config` itself
when there is nothing to resolve). The fields a config leaves unset (None) and an empty data.tokenizer_path were
taken from the model it starts from by the entry point before (`interop.pretrained_init.resolve`); then
  - train.epochs > 0 (chat data) sets train.num_steps: that many passes over the packed training examples;
  - train.warmup_fraction > 0 sets train.warmup_steps to that fraction of the steps.

`ChatDataReport`: a hook that logs what the chat data holds when the run starts and adds a "Chat data"
section to report.md (and `chat` to report.json): records read, examples per split, what was skipped or
truncated (the first records named), and the examples, tokens and trained tokens seen so far.
"""

from __future__ import annotations

import json
import os

import ml_collections

from mor_jax import files as files_lib
from mor_jax import config as config_lib
from mor_jax import data as data_lib
from mor_jax.data import chat
from mor_jax.train import report as report_lib
from mor_jax.train.hooks import Hook


def resolve_config(config):
  """`config` with the step count and the warm-up resolved (see the module docstring)."""
  if any(config_lib.get_field(config, f.key) is None for f in config_lib.FIELDS):
    return config                            # still unset: validation names the field and init.from_path
  t = config.train
  epochs, fraction = float(t.epochs), float(t.warmup_fraction)
  chat_epochs = epochs > 0 and config.data.corpus == "chat"
  if not chat_epochs and fraction <= 0:
    return config
  c = ml_collections.ConfigDict(config.to_dict())
  if chat_epochs:
    c.train.num_steps = chat.steps_for_epochs(c)
  if fraction > 0:
    c.train.warmup_steps = int(round(fraction * int(c.train.num_steps)))
  return c


def chat_summary(config, seen: dict | None = None) -> dict:
  """What the chat data of `config` holds (summary.json) plus the totals seen so far and the epochs they make."""
  prepared = data_lib.prepare(config)
  s = dict(prepared.summary)
  seen = dict(seen or {})
  train = s["splits"]["train"]
  s["seen"] = {**seen, "epochs": seen.get("examples", 0) / train["examples"] if train["examples"] else None}
  s["directory"] = prepared.directory
  return s


def summary_lines(s: dict) -> list[str]:
  """The report.md section: a table, then the first skipped or truncated records."""
  sp, seen = s["splits"], s.get("seen", {})
  fmt = lambda v: f"{v:,}" if isinstance(v, int) else (f"{v:.3g}" if isinstance(v, float) else "n/a")
  rows = [("records read", fmt(s["records"])),
          ("training / validation examples", f"{fmt(sp['train']['examples'])} / {fmt(sp['validation']['examples'])}"),
          ("training tokens / of them trained", f"{fmt(sp['train']['tokens'])} / {fmt(sp['train']['trained_tokens'])}"),
          ("malformed, skipped", fmt(s["malformed"]["count"])),
          (f"longer than seq_len + 1 = {s['seq_len'] + 1} tokens, skipped", fmt(s["too_long"]["count"])),
          ("truncated to seq_len + 1 tokens", fmt(s["truncated"]["count"])),
          ("loss on", f"{s['loss_on']} tokens"), ("chat template", s["chat_template"]),
          ("examples seen", f"{fmt(seen.get('examples', 0))} ({fmt(seen.get('epochs'))} epochs)"),
          ("tokens seen (no padding) / trained tokens seen",
           f"{fmt(seen.get('tokens', 0))} / {fmt(seen.get('target_tokens', 0))}")]
  lines = ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in rows]
  named = [f"- {kind.replace('_', ' ')}: `{line}`" for kind in ("malformed", "too_long", "truncated")
           for line in s[kind]["first"]]
  if named:
    lines += ["", f"First records skipped or truncated ({chat.MAX_LISTED} at most of each kind):", ""] + named
  return lines


class ChatDataReport(Hook):
  """Logs the chat data's counts at the start; adds them, with what was seen, to the report at the end."""

  def on_start(self, ctx) -> None:
    chat.log_summary(data_lib.prepare(ctx.config).summary)

  def on_end(self, ctx, report: dict) -> None:
    if not ctx.is_main:
      return
    s = chat_summary(ctx.config, ctx.seen())
    report["chat"] = s
    try:
      report_lib.add_section(ctx.workdir, "Chat data", summary_lines(s))
      files_lib.write_text(os.path.join(ctx.workdir, "report.json"), json.dumps(report_lib.clean(report), indent=2))
    except OSError:
      pass                                   # the trainer reported its own write failure already
