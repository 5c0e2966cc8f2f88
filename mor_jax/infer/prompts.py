"""Prompt handling for every inference path (Generator, Engine, the lm-eval harness, the generate command):
encoding with the checks that name what is wrong, power-of-two length bucketing, and reading a prompts file.

No JAX here: the generate command checks its inputs with these before it loads anything.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

from mor_jax.infer.errors import InferenceError

MIN_BUCKET = 16


def bucket_length(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
  """The padded length for `n` tokens: the next power of two from `minimum` on, at most `cap` (few compilations)."""
  b = minimum
  while b < n:
    b *= 2
  return min(b, cap)


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
CHAT_HINT = ("leave out --chat, or pass --tokenizer=FOLDER whose tokenizer_config.json has a 'chat_template' "
             "(a Hugging Face chat model's tokenizer folder)")


def chat_settings(tokenizer_path: str | None, what: str = "--chat") -> dict:
  """The tokenizer_config.json next to the model's tokenizer (a folder or its tokenizer.json), checked for --chat
  (`what` starts the error messages): {'chat_template', 'bos_token', 'eos_token', ...}."""
  folder = tokenizer_path if tokenizer_path and os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path or "")
  file = os.path.join(folder, "tokenizer_config.json")
  settings = {}
  if tokenizer_path and os.path.isfile(file):
    try:
      with open(file, encoding="utf-8") as f:
        settings = json.load(f)
    except (OSError, ValueError) as e:
      raise InferenceError(f"{what}: {file} cannot be read as JSON ({e}); {CHAT_HINT}.") from None
  template = settings.get("chat_template") if isinstance(settings, dict) else None
  if isinstance(template, list):             # [{'name': 'default', 'template': ...}, ...]
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  if not isinstance(template, str) or not template.strip():
    where = file if os.path.isfile(file) else (folder or "the model's tokenizer")
    raise InferenceError(f"{what}: this model has no chat template (no 'chat_template' in {where}); {CHAT_HINT}.")
  return {**settings, "chat_template": template}


def _token_text(value) -> str:
  """A special token of tokenizer_config.json: a string or an AddedToken dict ({'content': ...})."""
  if isinstance(value, dict):
    return str(value.get("content", ""))
  return str(value or "")


def _refuse(message):
  raise InferenceError(f"the chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """The Jinja template (sandboxed, Hugging Face's whitespace settings), compiled once per template text."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = _refuse
  return env.from_string(template)


def render_chat(settings: dict, messages: Sequence[dict], add_generation_prompt: bool = True,
                what: str = "--chat") -> str:
  """The prompt text for chat `messages` ([{role, content}]) with a Hugging Face chat template (Jinja, sandboxed);
  `what` starts the error messages."""
  import jinja2  # pylint: disable=g-import-not-at-top
  hint = f"; {CHAT_HINT}" if what == "--chat" else ""
  try:
    return _compiled(settings["chat_template"]).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=_token_text(settings.get("bos_token")), eos_token=_token_text(settings.get("eos_token")))
  except InferenceError as e:
    raise InferenceError(f"{what}: {e}") from None
  except jinja2.TemplateError as e:
    raise InferenceError(f"{what}: the model's chat template does not render ({type(e).__name__}: {e})"
                         f"{hint}.") from None
