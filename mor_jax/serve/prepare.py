"""A request body -> the checked request and its prompt's token ids. Runs in a worker thread (serve/app.py), not
on the event loop: JSON parsing, chat-template rendering and tokenizing take time on large inputs.

Cheap checks come first: a text longer than the longest prompt the context can hold (`max_prompt_chars`: the
context x (the longest token's characters + 1)) is refused before it is tokenized, chat messages before they
are rendered; token ids must lie in the vocabulary.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from mor_jax.infer.errors import InferenceError
from mor_jax.serve.schemas import ApiError, ChatRequest, CompletionRequest, validation_error

MAX_WARNED_MODELS = 16     # model names warned about (each once)


def max_prompt_chars(tokenizer, context: int) -> int:
  """Characters of text that can fit `context` tokens at most: a token covers at most the characters of the
  longest vocabulary entry (special tokens included), +1 for a separator a pre-tokenizer drops."""
  hf = getattr(tokenizer, "hf_tokenizer", None)
  if hf is not None:
    longest = max((len(t) for t in hf.get_vocab(with_added_tokens=True)), default=1)
  else:
    longest = max((len(tokenizer.decode([i])) for i in range(tokenizer.vocab_size)), default=1)
  return context * (max(1, longest) + 1)


def completion(svc, raw: bytes):
  """-> (CompletionRequest, prompt ids, the prompt's text for echo)."""
  body = _parse(CompletionRequest, raw)
  _check_model(svc, body.model)
  if isinstance(body.prompt, list):
    return body, _check_ids(svc, body.prompt), (svc.tokenizer.decode(body.prompt) if body.echo else "")
  return body, _text_ids(svc, body.prompt, "prompt"), body.prompt


def chat(svc, raw: bytes):
  """-> (ChatRequest, prompt ids of the rendered conversation)."""
  body = _parse(ChatRequest, raw)
  _check_model(svc, body.model)
  if svc.chat_template is None:
    raise ApiError(400, "this model's tokenizer has no chat template (tokenizer_config.json chat_template): use "
                   "/v1/completions with a plain prompt", param="messages", code="no_chat_template")
  ctx = svc.engine.context
  chars = sum(len(m.content) for m in body.messages)
  if len(body.messages) > ctx or chars > svc.max_prompt_chars:
    raise ApiError(400, f"the conversation ({len(body.messages)} messages, {chars} characters) cannot fit the "
                   f"model's context of {ctx} tokens: shorten it", param="messages", code="context_length_exceeded")
  try:
    text = svc.chat_template([m.model_dump(exclude_none=True) for m in body.messages])
  except ValueError as e:        # the template refused the conversation (raise_exception) or does not render
    raise ApiError(400, str(e).splitlines()[0], param="messages", code="chat_template_error") from None
  return body, _text_ids(svc, text, "messages")


def _parse(model, raw: bytes):
  try:
    return model.model_validate_json(raw or b"")
  except ValidationError as e:
    raise validation_error(e.errors()) from None


def _check_model(svc, name: str) -> None:
  """The server serves one model: a request naming another gets it, with a warning in the log (once per name)."""
  if name == svc.model_name or name in svc.warned_models:
    return
  if len(svc.warned_models) < MAX_WARNED_MODELS:
    svc.warned_models.add(name)
    logging.warning("requests name the model %r: this server serves one model, %r, and answers them with it",
                    name, svc.model_name)


def _check_ids(svc, ids: list[int]) -> list[int]:
  vocab = svc.engine.cfg.vocab_size
  if max(ids) >= vocab:
    raise ApiError(400, f"prompt: token ids must be below the vocabulary size {vocab}", param="prompt",
                   code="invalid_value")
  _check_length(svc, len(ids), "prompt")
  return list(ids)


def _check_length(svc, n: int, param: str) -> None:
  ctx = svc.engine.context
  if n >= ctx:
    raise ApiError(400, f"the prompt has {n} tokens but the model's context is {ctx} tokens, leaving no room to "
                   f"generate: shorten it to at most {ctx - 1}", param=param, code="context_length_exceeded")


def _text_ids(svc, text: str, param: str) -> list[int]:
  """Token ids of a text prompt (with BOS when the model was trained with one), refused before tokenizing when
  it is too long to fit."""
  ctx = svc.engine.context
  if len(text) > svc.max_prompt_chars:
    raise ApiError(400, f"the prompt has {len(text)} characters, more than the {svc.max_prompt_chars} that the "
                   f"model's context of {ctx} tokens can hold: shorten it", param=param,
                   code="context_length_exceeded")
  try:
    ids = svc.engine.encode(text)
  except InferenceError as e:
    raise ApiError(400, str(e), param=param, code="invalid_prompt") from None
  if not ids:
    raise ApiError(400, "the prompt encodes to no tokens", param=param, code="invalid_prompt")
  ids = ([svc.bos_id] if svc.bos_id is not None else []) + ids
  _check_length(svc, len(ids), param)
  return ids
