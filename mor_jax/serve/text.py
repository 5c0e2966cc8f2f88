"""Incremental detokenisation of one request: a text piece per generated token, and stop strings.

Text that may be the start of a stop string is held back until it is not (or the request ends); a token that
ends inside a multi-byte character gets an empty piece and the next token carries the character.
"""

from __future__ import annotations

from typing import Sequence

from mor_jax.infer.generate import find_stop


class TokenText:
  """Feed `add(ids, depths)`; it returns the (piece, depth) pairs safe to send. `finish()` returns the rest."""

  def __init__(self, tokenizer, stop: Sequence[str] = (), eos_id: int | None = None):
    self.tokenizer, self.stop, self.eos_id = tokenizer, tuple(stop), eos_id
    self.hold = max((len(s) for s in self.stop), default=1) - 1
    self.ids: list[int] = []
    self.text = ""               # decoded so far (whole characters), cut before a stop string once one is found
    self.emitted = 0             # characters sent
    self.pending: list[list] = []   # [piece, depth] not sent yet
    self.stopped = False

  def add(self, ids: Sequence[int], depths: Sequence[int]) -> list[tuple[str, int]]:
    for t, d in zip(ids, depths):
      if self.stopped:
        break
      self.ids.append(int(t))
      full = self.tokenizer.decode([i for i in self.ids if i != self.eos_id])   # EOS has no text (as generate)
      piece = ""
      if not full.endswith("\ufffd") and full.startswith(self.text):
        piece, self.text = full[len(self.text):], full
      elif not full.endswith("\ufffd"):       # a decoder that rewrote earlier text: send the difference at the end
        self.text = full
      self.pending.append([piece, int(d)])
      cut = find_stop(self.text, self.stop, self.emitted - self.hold) if self.stop else None
      if cut is not None:
        self._cut(cut)
    return self._flush(everything=self.stopped)

  def finish(self) -> list[tuple[str, int]]:
    return self._flush(everything=True)

  def _cut(self, cut: int) -> None:
    keep, out = cut - self.emitted, []
    for piece, d in self.pending:
      if keep <= 0:
        break
      out.append([piece[:keep], d])
      keep -= len(piece)
    self.pending, self.text, self.stopped = out, self.text[:cut], True

  def _flush(self, everything: bool) -> list[tuple[str, int]]:
    safe = len(self.text) if everything else len(self.text) - self.hold
    out = []
    while self.pending and self.emitted + len(self.pending[0][0]) <= safe:
      piece, d = self.pending.pop(0)
      out.append((piece, d))
      self.emitted += len(piece)
    if everything and self.emitted < len(self.text):   # text a rewriting decoder produced: attach it to the last token
      out.append((self.text[self.emitted:], out[-1][1] if out else 0))
      self.emitted = len(self.text)
    return out
