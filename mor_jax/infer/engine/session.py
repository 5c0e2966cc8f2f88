"""The engine's host-side records: requests, what a step reports, a request in a slot, a serving session."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from mor_jax.infer.generate import Generation
from mor_jax.infer.sampling import FINISH_REASONS, SamplingParams


@jax.jit
def request_keys(seeds_B, rows_B):
  """Sampling key of each request: fold_in(PRNGKey(seed), row id), as the plain path's."""
  return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds_B, rows_B)


@dataclasses.dataclass
class Request:
  id: int
  prompt_tokens: list[int]
  max_new_tokens: int
  row_id: int
  prompt: str | None = None
  submitted: float = 0.0
  sampling: SamplingParams | None = None   # None: the session's
  seed: int | None = None                  # None: the session's


@dataclasses.dataclass
class Progress:
  """What `Engine.step` reports for one request: the tokens it made since the last step (with the recursions
  behind each), and its Generation once it is finished (or cancelled: finish_reason 'stop')."""
  id: int
  tokens: list[int]
  recursions: list[int]
  result: Generation | None = None


@dataclasses.dataclass
class Slot:
  """Host-side record of a request in a slot: its tokens so far (with the recursions behind each)."""
  req: Request
  tokens: list = dataclasses.field(default_factory=list)
  recursions: list = dataclasses.field(default_factory=list)
  sent: int = 0
  prompt_rec: list = dataclasses.field(default_factory=list)

  def generation(self, tokenizer, finish: int) -> Generation:
    """The finished request's result (`finish`: its FINISH_REASONS index)."""
    toks = self.tokens
    text = None if tokenizer is None else tokenizer.decode([t for t in toks if t != tokenizer.eos_id])  # EOS: no text
    return Generation(prompt_tokens=self.req.prompt_tokens, tokens=toks, recursions=self.recursions,
                      prompt_recursions=self.prompt_rec, finish_reason=FINISH_REASONS[finish], text=text,
                      prompt=self.req.prompt)


@dataclasses.dataclass
class Session:
  """Host-side bookkeeping of one serving session (`start` ... `finish`)."""
  owner: list                      # per slot: its Slot, or None
  sampling: SamplingParams
  seed: int
  args: tuple                      # (threshold, eos id): traced arguments of the programs
  stream: bool
  stats0: dict
  t0: float
  done: dict = dataclasses.field(default_factory=dict)
  admit_s: float = 0.0
  admit_calls: int = 0
  resizes: int = 0

  def summary(self, stats: dict, slots: int, capacity: int, wall: float) -> dict:
    """The session's statistics (`stats`: the engine's counters now; the session's share is taken)."""
    s = {k: int(v) - int(self.stats0[k]) for k, v in stats.items()}
    ticks = max(1, s["ticks"])
    gen_tokens = sum(len(g.tokens) for g in self.done.values())
    return {**s, "wall_s": wall, "admit_s": self.admit_s, "admit_calls": self.admit_calls, "resizes": self.resizes,
            "capacity": capacity, "generated_tokens": gen_tokens,
            "slot_utilisation": s["applied_rows"] / (ticks * slots),
            "block_row_occupancy": s["block_rows"] / (ticks * slots),
            "mean_recursions": sum(sum(g.recursions) for g in self.done.values()) / max(1, gen_tokens),
            "tokens_per_tick": s["tokens"] / ticks}


def auto_rows(slots: int, expected_recursions: float) -> int:
  """The entry / exit sub-batch for tokens that take `expected_recursions` ticks each: 1.25 x the slots that enter
  and leave per tick; all slots when that is 85% of them or more (compaction then costs more than it saves)."""
  rows = max(1, int(np.ceil(1.25 * slots / expected_recursions)))
  return slots if rows >= 0.85 * slots else rows


def mib(n: int) -> str:
  return f"{n / 2 ** 20:.1f} MiB"
