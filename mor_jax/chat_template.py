"""Chat templates: the one renderer of conversations, shared by fine-tuning data, generation (--chat) and serving.

  settings(tokenizer_path, what) -> {'chat_template', 'bos_token', 'eos_token', ...}   a model's template, checked
  render(settings, messages, add_generation_prompt, what) -> str                       Jinja, sandboxed, HF's settings

Errors are `ChatTemplateError`s whose message starts with `what` (the flag or config field that asked for it).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Sequence

from mor_jax.errors import ChatTemplateError

CHAT_HINT = ("leave out --chat, or pass --tokenizer=FOLDER whose tokenizer_config.json has a 'chat_template' "
             "(a Hugging Face chat model's tokenizer folder)")


def settings(tokenizer_path: str | None, what: str = "--chat") -> dict:
  """The tokenizer_config.json next to the model's tokenizer (a folder or its tokenizer.json), checked for a chat
  template: {'chat_template', 'bos_token', 'eos_token', ...}."""
  folder = tokenizer_path if tokenizer_path and os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path or "")
  file = os.path.join(folder, "tokenizer_config.json")
  found = {}
  if tokenizer_path and os.path.isfile(file):
    try:
      with open(file, encoding="utf-8") as f:
        found = json.load(f)
    except (OSError, ValueError) as e:
      raise ChatTemplateError(f"{what}: {file} cannot be read as JSON ({e}); {CHAT_HINT}.") from None
  template = found.get("chat_template") if isinstance(found, dict) else None
  if isinstance(template, list):             # [{'name': 'default', 'template': ...}, ...]
    template = next((t.get("template") for t in template if t.get("name") == "default"), None)
  if not isinstance(template, str) or not template.strip():
    where = file if os.path.isfile(file) else (folder or "the model's tokenizer")
    raise ChatTemplateError(f"{what}: this model has no chat template (no 'chat_template' in {where}); {CHAT_HINT}.")
  return {**found, "chat_template": template}


def token_text(value) -> str:
  """A special token of tokenizer_config.json: a string or an AddedToken dict ({'content': ...})."""
  if isinstance(value, dict):
    return str(value.get("content", ""))
  return str(value or "")


def _refuse(message):
  raise ChatTemplateError(f"the chat template refused the conversation: {message}")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
  """The Jinja template (sandboxed, Hugging Face's whitespace settings), compiled once per template text."""
  from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=g-import-not-at-top
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = _refuse
  return env.from_string(template)


def render(chat_settings: dict, messages: Sequence[dict], add_generation_prompt: bool = True,
           what: str = "--chat") -> str:
  """The prompt text for chat `messages` ([{role, content}]) with a Hugging Face chat template."""
  import jinja2  # pylint: disable=g-import-not-at-top
  hint = f"; {CHAT_HINT}" if what == "--chat" else ""
  try:
    return _compiled(chat_settings["chat_template"]).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt,
        bos_token=token_text(chat_settings.get("bos_token")), eos_token=token_text(chat_settings.get("eos_token")))
  except ChatTemplateError as e:
    raise ChatTemplateError(f"{what}: {e}") from None
  except jinja2.TemplateError as e:
    raise ChatTemplateError(f"{what}: the model's chat template does not render ({type(e).__name__}: {e})"
                            f"{hint}.") from None
