"""Chat records: JSONL lines -> checked conversations -> token ids with a loss mask.

A record (one JSON object per line of a `.jsonl` / `.jsonl.gz` file) is either

  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}   (OpenAI / Hugging Face)
  {"prompt": "...", "completion": "..."}        (a user turn and the assistant's answer; both may also be
                                                 lists of messages, as in TRL's conversational form)

`conversation(obj)` returns the messages or raises `BadRecord` saying what is wrong. `encode(...)` renders them
with the chat template (`mor_jax.chat_template.render`, the renderer `--chat` and serving use) and
tokenizes the text piece by piece: the prompt up to each assistant turn exactly as `--chat` renders it for
generation (`add_generation_prompt=True`), then the turn itself (its content and the template's end of turn),
whose tokens are the ones trained with `data.loss_on=assistant`. With `loss_on=all` every token of the
conversation is trained except its first (nothing in the example predicts it).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from mor_jax import chat_template
from mor_jax.errors import ChatTemplateError

ROLES = ("system", "user", "assistant")
# ChatML's layout for models whose tokenizer has no chat template (data.chat_template=chatml). Each turn ends with
# the tokenizer's EOS token (`<|im_end|>` for ChatML tokenizers such as SmolLM2's), so that generation with --chat
# and serving stop at the end of the assistant's turn whatever the tokenizer.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NAMED_TEMPLATES = {"chatml": CHATML}


class BadRecord(ValueError):
  """A record that cannot be trained on; the message says why (the caller adds file and line)."""


def _message(m: Any, i: int, where: str) -> dict:
  if not isinstance(m, dict):
    raise BadRecord(f"{where}[{i}] is not an object with 'role' and 'content'")
  role, content = m.get("role"), m.get("content")
  if role not in ROLES:
    raise BadRecord(f"{where}[{i}] has role {role!r}; use one of {', '.join(ROLES)}")
  if not isinstance(content, str):
    raise BadRecord(f"{where}[{i}] ({role}) has no text 'content' (got {type(content).__name__})")
  return {"role": role, "content": content}


def _messages(value: Any, where: str, default_role: str) -> list[dict]:
  if isinstance(value, str):
    return [{"role": default_role, "content": value}]
  if isinstance(value, list) and value:
    return [_message(m, i, where) for i, m in enumerate(value)]
  raise BadRecord(f"'{where}' must be a string or a non-empty list of messages")


def conversation(obj: Any) -> list[dict]:
  """The messages of one parsed JSON record ({role, content} dicts), checked; raises BadRecord."""
  if not isinstance(obj, dict):
    raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
  if "messages" in obj:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
      raise BadRecord("'messages' must be a non-empty list")
    return [_message(m, i, "messages") for i, m in enumerate(msgs)]
  if "prompt" in obj and "completion" in obj:
    return _messages(obj["prompt"], "prompt", "user") + _messages(obj["completion"], "completion", "assistant")
  keys = ", ".join(sorted(map(str, obj))[:6]) or "none"
  raise BadRecord(f"no 'messages' and no 'prompt' + 'completion' (keys: {keys})")


def parse_line(line: bytes | str) -> list[dict] | None:
  """The conversation of one JSONL line (None for a blank line); raises BadRecord."""
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord(f"not UTF-8 text (byte {e.start}: {e.reason})") from None
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise BadRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
  return conversation(obj)


def _render(settings: dict, messages: Sequence[dict], add_generation_prompt: bool) -> str:
  try:
    return chat_template.render(settings, messages, add_generation_prompt, what="the chat template")
  except ChatTemplateError as e:
    raise BadRecord(str(e)) from None


def pieces(settings: dict, messages: Sequence[dict], loss_on: str) -> list[tuple[str, bool]]:
  """The rendered conversation as (text, trained) pieces whose concatenation is the whole rendered text.

  `loss_on='assistant'`: each assistant turn is the text that rendering it adds after the generation prompt of the
  conversation before it; the template must render every conversation as a prefix of its continuations (chat
  templates do; one that rewrites earlier turns is reported as such).
  """
  full = _render(settings, messages, False)
  if loss_on == "all":
    return [(full, True)]
  out, done = [], ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt = _render(settings, messages[:i], True)
    upto = _render(settings, messages[:i + 1], False)
    if not prompt.startswith(done) or not upto.startswith(prompt):
      raise BadRecord(f"the chat template does not render assistant turn {i} as a continuation of the prompt --chat "
                      "would give for it (does the template rewrite earlier turns?); set data.loss_on=all")
    out += [(prompt[len(done):], False), (upto[len(prompt):], True)]
    done = upto
  if not full.startswith(done):
    raise BadRecord("the chat template renders the whole conversation differently from its turns; set "
                    "data.loss_on=all")
  if not out:
    raise BadRecord("no assistant message: nothing to learn with data.loss_on=assistant")
  out.append((full[len(done):], False))
  return [(text, trained) for text, trained in out if text]


def encode(tokenizer, settings: dict, messages: Sequence[dict], loss_on: str, bos_id: int | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """(token ids int32 [n], loss mask uint8 [n]) of a conversation: mask[j] = 1 when token j is a trained target.

  Each piece is tokenized on its own (the prompt exactly as generation tokenizes it); `bos_id` is prepended when
  given (data.add_bos, as generation does). The first token is never a target.
  """
  ids, mask = ([bos_id], [0]) if bos_id is not None else ([], [])
  for text, trained in pieces(settings, messages, loss_on):
    t = tokenizer.encode(text)
    ids += t
    mask += [int(trained)] * len(t)
  if mask:
    mask[0] = 0
  return np.asarray(ids, np.int32), np.asarray(mask, np.uint8)


def template_settings(tokenizer_path: str, name: str, eos_token: str, bos_token: str | None) -> dict:
  """{chat_template, eos_token, bos_token, ...} for rendering: the named template, or the tokenizer's own (its
  tokenizer_config.json); raises ValueError naming data.chat_template when there is none."""
  if name:
    if name not in NAMED_TEMPLATES:
      raise ValueError(f"config.data.chat_template={name!r} is unknown; use '' (the tokenizer's own template) or one "
                       f"of {sorted(NAMED_TEMPLATES)}.")
    return {"chat_template": NAMED_TEMPLATES[name], "eos_token": eos_token, "bos_token": bos_token or ""}
  try:
    settings = chat_template.settings(tokenizer_path, what="the chat data")
  except ChatTemplateError:
    raise ValueError(f"the tokenizer at {tokenizer_path} has no chat template (no 'chat_template' in its "
                     "tokenizer_config.json). Fix: set config.data.chat_template=chatml (the fine-tuned workdir "
                     "keeps it for --chat and serving), or use a tokenizer folder that has one.") from None
  return {**settings, "eos_token": settings.get("eos_token") or eos_token,
          "bos_token": settings.get("bos_token") or bos_token or ""}
