"""Prompt handling for every inference path (Generator, Engine, the lm-eval harness, the generate command):
encoding with the checks that name what is wrong, length bucketing (powers of two; prompts also at 1.5x steps),
and reading a prompts file.

No JAX here: the generate command checks its inputs with these before it loads anything.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from mor_jax import chat_template
from mor_jax.errors import ChatTemplateError
from mor_jax.infer.errors import InferenceError

MIN_BUCKET = 16


def bucket_length(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
  """The padded length for `n` tokens: the next power of two from `minimum` on, at most `cap` (few compilations)."""
  b = minimum
  while b < n:
    b *= 2
  return min(b, cap)


def prompt_length(n: int, cap: int) -> int:
  """The padded length of a prompt of `n` tokens for a prefill: the next of 16, 24, 32, 48, 64, 96, ... (powers of
  two and the steps halfway between them), at most `cap`. A prefill's cost grows with its padded length: these
  buckets pad a prompt by at most half its length instead of doubling it (a 33-token prompt: 48, not 64), for
  twice the programs of power-of-two buckets."""
  b = bucket_length(n, cap)
  return min(b, max(b * 3 // 4, MIN_BUCKET)) if n <= b * 3 // 4 else b


def batch_rows(n: int, cap: int) -> int:
  """Rows of a batch holding `n` requests: the next power of two, at most `cap`."""
  return bucket_length(n, cap, minimum=1)


def check_tokenizer(vocab_size: int, tokenizer, add_bos: bool) -> None:
  """The tokenizer fits the model's vocabulary; add_bos has a BOS token to add."""
  if tokenizer is not None and tokenizer.vocab_size > vocab_size:
    raise InferenceError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                         f"{vocab_size}: they do not belong together. Use the tokenizer the model was trained with "
                         "(--tokenizer=PATH for generate and eval).")
  if add_bos and (tokenizer is None or tokenizer.bos_id is None):
    raise InferenceError("add_bos needs a tokenizer with a BOS token.")


def encode_prompt(prompt, i: int, *, vocab_size: int, tokenizer=None, add_bos: bool = False,
                  context: int | None = None) -> list[int]:
  """Token ids of prompt `i` (text needs the tokenizer; a sequence of ints is taken as is), checked: not empty,
  inside the vocabulary, and (with `context`) leaving room for at least one new token."""
  if isinstance(prompt, str):
    if tokenizer is None:
      raise InferenceError("text prompts need a tokenizer; pass token ids or a tokenizer.")
    t = list(tokenizer.encode(prompt))
  else:
    t = [int(x) for x in prompt]
  if not t:
    raise InferenceError(f"prompt {i} is empty: the model needs at least one token to condition on.")
  if add_bos:
    t = [tokenizer.bos_id] + t
  if context is not None and len(t) >= context:
    raise InferenceError(f"prompt {i} has {len(t)} tokens but the model's context is {context} tokens "
                         f"(model.max_seq_len), leaving no room to generate. Shorten it to at most {context - 1}.")
  bad = [x for x in t if not 0 <= x < vocab_size]
  if bad:
    raise InferenceError(f"prompt {i} has token ids outside the model's vocabulary [0, {vocab_size}): "
                         f"{bad[:5]}; tokenizer and model do not match.")
  return t


def encode_prompts(prompts: Sequence, **kwargs) -> list[list[int]]:
  """`encode_prompt` for each prompt (at least one)."""
  ids = [encode_prompt(p, i, **kwargs) for i, p in enumerate(prompts)]
  if not ids:
    raise InferenceError("no prompts given.")
  return ids


def unescape(s: str) -> str:
  """The \\n and \\t escapes of a command-line prompt."""
  return s.replace("\\n", "\n").replace("\\t", "\t")


def _parse_line(path: str, n: int, line: str, jsonl: bool) -> str | None:
  if not jsonl:
    return line if line.strip() else None
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise InferenceError(f"{path}:{n}: not valid JSON ({e}).") from e
  p = obj.get("prompt") if isinstance(obj, dict) else obj
  if not isinstance(p, str):
    raise InferenceError(f"{path}:{n}: expected a JSON string or an object with a 'prompt' string.")
  return p


def read_prompts_file(path: str, flag: str = "--prompts_file") -> list[str]:
  """Prompts of a file: one per line (blank lines skipped), or one JSON string / {"prompt": ...} per line (.jsonl)."""
  if os.path.isdir(path):
    raise InferenceError(f"{flag}={path} is a directory; give a text file with one prompt per line (or .jsonl).")
  if not os.path.isfile(path):
    raise InferenceError(f"{flag}={path} does not exist; give a text file with one prompt per line (or .jsonl).")
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except UnicodeDecodeError as e:
    raise InferenceError(f"{flag}={path} is not UTF-8 text (byte {e.start}: {e.reason}); give a text file with one "
                         "prompt per line (or .jsonl).") from None
  except OSError as e:
    raise InferenceError(f"{flag}={path} cannot be read ({e.strerror}).") from None
  if "\x00" in "".join(lines):
    raise InferenceError(f"{flag}={path} holds NUL bytes (a binary file?); give a text file with one prompt per line.")
  jsonl = path.endswith(".jsonl")
  prompts = [p for n, line in enumerate(lines, 1) if (p := _parse_line(path, n, line, jsonl)) is not None]
  if not prompts:
    raise InferenceError(f"{flag}={path} holds no prompts.")
  return prompts


# ------------------------------------------------------------------ chat
# The one renderer is mor_jax.chat_template (fine-tuning data uses it too); here its errors become
# InferenceErrors, the type generate and serve answer with (400 in the server).

def chat_settings(tokenizer_path: str | None, what: str = "--chat") -> dict:
  """The model's chat settings (`chat_template.settings`): {'chat_template', 'bos_token', 'eos_token', ...}."""
  try:
    return chat_template.settings(tokenizer_path, what)
  except ChatTemplateError as e:
    raise InferenceError(str(e)) from None


def render_chat(settings: dict, messages: Sequence[dict], add_generation_prompt: bool = True,
                what: str = "--chat") -> str:
  """The prompt text for chat `messages` ([{role, content}]) (`chat_template.render`)."""
  try:
    return chat_template.render(settings, messages, add_generation_prompt, what)
  except ChatTemplateError as e:
    raise InferenceError(str(e)) from None
