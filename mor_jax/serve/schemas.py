"""Request bodies of the OpenAI-compatible API (pydantic, unknown fields refused) and the OpenAI error body.

Sampling fields follow OpenAI's: max_tokens, temperature (0-2), top_p, stop (up to 4 strings), seed, n (1 only),
stream, stream_options.include_usage, echo (completions: the prompt's text before the completion). Extensions:
top_k (0 = off), return_depths (each generated token's text piece and recursion depth in `choices[i].mor`),
timeout (seconds, at most the server's --request_timeout).

Every field is bounded here, before anything else looks at the request: numbers fit the engine's int32 / finite
float32 arrays (no NaN or infinity anywhere), free strings have a length limit. What depends on the model
(token ids below the vocabulary, prompt + max_tokens within the context) is checked by serve/app.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4
INT32_MAX = 2 ** 31 - 1
MAX_STOP_CHARS = 256      # one stop string
MAX_USER_CHARS = 512      # the `user` field (an end-user id)
MAX_NAME_CHARS = 64       # a message's `name`
MAX_MODEL_CHARS = 256


class ApiError(Exception):
  """An error answered with `status` and the OpenAI error body."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # pylint: disable=redefined-builtin
               param: str | None = None, code: str | None = None, headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = headers or {}

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
  include_usage: bool = False


class _Sampling(_Strict):
  model: str = Field(..., min_length=1, max_length=MAX_MODEL_CHARS)
  max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  top_k: int = Field(0, ge=0, le=INT32_MAX)          # above the vocabulary = off (serve/app.py caps it)
  stop: str | list[str] | None = None
  seed: int | None = Field(None, ge=0, le=INT32_MAX)
  n: int = Field(1, ge=1, le=1)
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = Field(None, max_length=MAX_USER_CHARS)
  return_depths: bool = False
  timeout: float | None = Field(None, gt=0)

  @field_validator("stop")
  @classmethod
  def _stop(cls, v):
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOP or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
      raise ValueError(f"give at most {MAX_STOP} non-empty stop strings of at most {MAX_STOP_CHARS} characters")
    return stops

  def stops(self) -> tuple[str, ...]:
    return tuple(self.stop or ())


class CompletionRequest(_Sampling):
  prompt: str | list[int] | list[str] = Field(...)
  max_tokens: int | None = Field(16, ge=1, le=INT32_MAX)     # OpenAI's default for completions
  echo: bool = False

  @field_validator("prompt")
  @classmethod
  def _prompt(cls, v):
    if isinstance(v, list) and v and isinstance(v[0], str):
      if len(v) != 1:
        raise ValueError("give one prompt per request (n=1, no batches)")
      v = v[0]
    if isinstance(v, list) and any(i < 0 for i in v):
      raise ValueError("token ids must be >= 0")
    if len(v) == 0:
      raise ValueError("the prompt is empty")
    return v


class Message(_Strict):
  role: Literal["system", "user", "assistant", "developer"]
  content: str
  name: str | None = Field(None, max_length=MAX_NAME_CHARS)


class ChatRequest(_Sampling):
  messages: list[Message] = Field(..., min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)

  def limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_error(errors) -> ApiError:
  """pydantic's errors -> one 400 naming the first bad field and what it accepts."""
  e = errors[0] if errors else {"loc": (), "msg": "invalid body"}
  loc = [str(x) for x in e.get("loc", ()) if x != "body"]
  param = ".".join(loc) or None
  if e.get("type") == "extra_forbidden":
    msg = f"unknown field {param!r}: remove it (this server accepts OpenAI's fields plus top_k, return_depths, timeout)"
  elif e.get("type") == "json_invalid":
    msg, param = "the body is not valid JSON", None
  else:
    msg = f"{param or 'body'}: {e.get('msg', 'invalid value')}"
  code = "unknown_field" if e.get("type") == "extra_forbidden" else "invalid_value"
  return ApiError(400, msg, param=param, code=code)
