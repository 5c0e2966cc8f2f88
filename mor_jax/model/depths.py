"""How deep each token goes: per-token recursion counts, which tokens think harder, and pictures of it.

    rec = token_recursions(cfg, aux, T)            # [B, T] recursions each position ran (pure, from the model's aux)
    tally = DepthTally(vocab_size, R); tally.add(tokens, rec, mask)
    tally.table(tokenizer)                         # the tokens that most often get the full depth vs exit first
    colored_html(pieces, rec, R) / colored_png(...) # a text coloured by each token's depth, with a legend

`--mode=eval` writes the tally of the validation split (causal routing: what generation does) to
WORKDIR/token_depths_step<N>.{md,json}; training (`RoutingPictures`, a trainer hook) records the depth histogram
of a fixed validation sample at every evaluation (TensorBoard), the share of tokens per recursion over training
(routing.png, from routing.jsonl) and the sample coloured by depth at the end (routing_sample.html / .png).
"""

from __future__ import annotations

import html
import json

import numpy as np

from mor_jax import files as files_lib
from mor_jax.config import ModelConfig

# one colour per recursion count (1 = exits first); cycled beyond 6
COLORS = ("#deebf7", "#9ecae1", "#fdd49e", "#fc8d59", "#d7301f", "#7f0000")
MIN_COUNT = 5          # a token must occur this often to be ranked


def is_routed(cfg: ModelConfig) -> bool:
  return bool(cfg.mor_enable)


def max_recursions(cfg: ModelConfig) -> int:
  return int(cfg.recursions) if cfg.strategy != "none" else 1


def token_recursions(cfg: ModelConfig, aux: dict, T: int):
  """[B, T] int32: how many recursions of the shared block each position ran, from the model's aux.

  Token-choice: the router's depth + 1. Expert-choice: the recursions the position was selected for (masked modes
  record them; top-k records the selected positions of each recursion). Non-routed models: the fixed depth.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if not is_routed(cfg):
    return None
  if cfg.mor_type == "token":
    return jnp.asarray(aux["depth"], jnp.int32) + 1
  if "recursions" in aux:
    return jnp.asarray(aux["recursions"], jnp.int32)
  counts = None
  for sel in aux["selected"]:                       # [B, k_r] absolute positions
    hit = jnp.zeros(sel.shape[:1] + (T,), jnp.int32).at[jnp.arange(sel.shape[0])[:, None], sel].add(1)
    counts = hit if counts is None else counts + hit
  return counts


def make_depth_fn(cfg: ModelConfig, mode: str = "causal", threshold=None):
  """jit(fn(variables, tokens [B, T]) -> recursions [B, T] int32), every row alone (as evaluation scores rows)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import MoRLM  # pylint: disable=g-import-not-at-top
  model = MoRLM(cfg)

  def one(variables, tok_T):
    _, aux = model.apply(variables, tok_T[None], routing_mode=mode, threshold=threshold, method=MoRLM.hidden)
    return token_recursions(cfg, aux, tok_T.shape[0])[0]

  return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def shares(rec: np.ndarray, R: int, mask: np.ndarray | None = None) -> list[float]:
  """Share of (counted) tokens that ran exactly 1..R recursions."""
  rec = np.asarray(rec).reshape(-1)
  if mask is not None:
    rec = rec[np.asarray(mask, bool).reshape(-1)]
  n = max(1, rec.size)
  return [float(np.sum(rec == d) / n) for d in range(1, R + 1)]


class DepthTally:
  """Per token id: occurrences, total recursions, times at full depth and times exiting after the first."""

  def __init__(self, vocab_size: int, R: int):
    self.R = int(R)
    self.count = np.zeros(vocab_size, np.int64)
    self.total = np.zeros(vocab_size, np.int64)
    self.full = np.zeros(vocab_size, np.int64)
    self.first = np.zeros(vocab_size, np.int64)

  def add(self, tokens, rec, mask=None) -> None:
    tokens, rec = np.asarray(tokens).reshape(-1), np.asarray(rec).reshape(-1)
    keep = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask, bool).reshape(-1)
    tokens, rec = tokens[keep], rec[keep]
    np.add.at(self.count, tokens, 1)
    np.add.at(self.total, tokens, rec)
    np.add.at(self.full, tokens, (rec >= self.R).astype(np.int64))
    np.add.at(self.first, tokens, (rec <= 1).astype(np.int64))

  def rows(self, key: str, top: int, min_count: int = MIN_COUNT) -> list[dict]:
    ids = np.nonzero((self.count >= min_count) & (getattr(self, key) > 0))[0]
    frac = getattr(self, key)[ids] / self.count[ids]
    order = np.lexsort((-self.count[ids], -frac))[:top]
    return [{"id": int(ids[i]), "count": int(self.count[ids[i]]), "share": float(frac[i]),
             "mean_recursions": float(self.total[ids[i]] / self.count[ids[i]])} for i in order]

  def summary(self, top: int = 20) -> dict:
    n = int(self.count.sum())
    return {"tokens": n, "recursions": self.R, "mean_recursions": float(self.total.sum() / max(1, n)),
            "full_depth": self.rows("full", top), "exit_first": self.rows("first", top)}

  def table(self, decode=None, top: int = 20) -> str:
    """Markdown: the tokens that most often run all R recursions, and those that most often exit after one."""
    s = self.summary(top)
    show = (lambda i: repr(decode([i]))) if decode else str
    out = [f"{s['tokens']:,} tokens, mean {s['mean_recursions']:.3f} of {self.R} recursions "
           f"(tokens seen at least {MIN_COUNT} times are ranked).", ""]
    for key, title in (("full_depth", f"most often at full depth ({self.R} recursions)"),
                       ("exit_first", "most often exit after the first recursion")):
      out += [f"### {title}", "", "| token | id | count | share | mean recursions |", "|---|---:|---:|---:|---:|"]
      out += [f"| {show(r['id'])} | {r['id']} | {r['count']} | {r['share']:.2f} | {r['mean_recursions']:.2f} |"
              for r in s[key]]
      out.append("")
    return "\n".join(out)

  def write(self, prefix: str, decode=None, top: int = 20) -> tuple[str, str]:
    """PREFIX.md and PREFIX.json (atomically); returns their paths."""
    s = self.summary(top)
    if decode:
      for key in ("full_depth", "exit_first"):
        for r in s[key]:
          r["text"] = decode([r["id"]])
    paths = (prefix + ".md", prefix + ".json")
    for path, text in zip(paths, (self.table(decode, top), json.dumps(s, indent=2))):
      files_lib.write_text(path, text)
    return paths


def color(depth: int) -> str:
  return COLORS[(max(1, int(depth)) - 1) % len(COLORS)]


def colored_html(pieces: list[str], rec, R: int, title: str = "recursions per token") -> str:
  """A standalone HTML page: each text piece on the background colour of its recursion count, with a legend."""
  legend = " ".join(f'<span class="d d{d}" style="background:{color(d)}">{d}</span>' for d in range(1, R + 1))
  spans = "".join(f'<span class="d d{int(d)}" style="background:{color(d)}" title="{int(d)} recursion(s)">'
                  f"{html.escape(p)}</span>" for p, d in zip(pieces, np.asarray(rec).reshape(-1)))
  return ("<!doctype html><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
          "<style>body{font-family:monospace;max-width:60em;margin:2em auto;white-space:pre-wrap;line-height:1.7}"
          ".d{border-radius:2px;padding:0 1px}</style>"
          f"<h3 style='font-family:sans-serif'>{html.escape(title)}</h3><p>legend (recursions): {legend}</p>"
          f"<div>{spans}</div>")


def _wrap(pieces, rec, width: int) -> list[list[tuple[str, int]]]:
  """Text pieces with their depths, broken into lines of at most `width` characters (and at newlines)."""
  lines, cur = [[]], 0
  for p, d in zip(pieces, np.asarray(rec).reshape(-1)):
    for k, part in enumerate(p.split("\n")):
      if k or cur + len(part) > width:
        lines.append([])
        cur = 0
      lines[-1].append((part, int(d)))
      cur += len(part)
  return lines


def colored_png(pieces: list[str], rec, R: int, path: str, title: str = "recursions per token",
                width: int = 90, max_lines: int = 24) -> str:
  """The same picture as `colored_html`, drawn with matplotlib (for markdown reports); one unit = one character."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  lines = _wrap(pieces, rec, width)[:max_lines]
  fs = 9
  unit = 0.6 * fs / 72                    # inches per monospace character at font size fs
  fig = plt.figure(figsize=((width + 2) * unit, (len(lines) + 3) * 2.1 * unit))
  ax = fig.add_axes([0, 0, 1, 1])
  ax.set_axis_off()
  ax.set_xlim(0, width + 2)
  ax.set_ylim((len(lines) + 3) * 2.1 * unit / unit, 0)
  ax.text(1, 1.4, title + ":", family="monospace", fontsize=fs, va="center")
  x = len(title) + 3
  for d in range(1, R + 1):
    ax.add_patch(plt.Rectangle((x, 0.5), 3, 1.8, color=color(d), linewidth=0))
    ax.text(x + 1, 1.4, str(d), family="monospace", fontsize=fs, va="center")
    x += 4
  for y, line in enumerate(lines):
    x, top = 1.0, 3.4 + 2.1 * y
    for part, d in line:
      if part:
        ax.add_patch(plt.Rectangle((x, top), len(part), 1.9, color=color(d), linewidth=0))
        ax.text(x, top + 0.95, part.replace("$", r"\$"), family="monospace", fontsize=fs, va="center")
      x += len(part)
  with files_lib.replacing(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)
  return path
