"""The HTTP layer: FastAPI routes of the OpenAI-compatible API, the web page and /metrics.

  POST /v1/completions, /v1/chat/completions   (stream: server-sent events in OpenAI's chunk format, then [DONE])
  GET  /v1/models, /health, /metrics, /        (/ : the page that colours each token by its recursion depth)
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mor_jax.infer.errors import InferenceError
from mor_jax.infer.sampling import SamplingParams
from mor_jax.serve.loop import Job, QueueFull
from mor_jax.serve.schemas import ApiError, ChatRequest, CompletionRequest, validation_error
from mor_jax.serve.text import TokenText

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
DISCONNECT_POLL_S = 0.5


def create_app(svc) -> FastAPI:
  """The app over a serve.server.Service (engine loop, tokenizer, model name, limits, metrics)."""
  app = FastAPI(title="mor-jax", docs_url=None, redoc_url=None, openapi_url=None)

  @app.exception_handler(ApiError)
  async def _api_error(request: Request, e: ApiError):
    svc.metrics.requests.labels(request.url.path, str(e.status)).inc()
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(_, e: StarletteHTTPException):
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return JSONResponse(ApiError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code)

  @app.get("/")
  async def _page():
    return FileResponse(os.path.join(STATIC, "index.html"))

  app.mount("/static", StaticFiles(directory=STATIC), name="static")

  @app.get("/health")
  async def _health():
    ok = not svc.draining and svc.loop.error is None
    body = {"status": "ok" if ok else ("draining" if svc.draining else "error"), "slots": svc.engine.slots,
            "busy": svc.engine.busy, "waiting": svc.loop.waiting}
    return JSONResponse(body, status_code=200 if ok else 503)

  @app.get("/metrics")
  async def _metrics():
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def _models():
    return {"object": "list", "data": [svc.model_card()]}

  @app.post("/v1/completions")
  async def _completions(request: Request):
    body = _parse(CompletionRequest, await request.body())
    prompt = body.prompt
    ids = _encode(svc, prompt, "prompt")
    return await _serve(svc, request, body, ids, body.max_tokens, chat=False)

  @app.post("/v1/chat/completions")
  async def _chat(request: Request):
    body = _parse(ChatRequest, await request.body())
    if svc.chat_template is None:
      raise ApiError(400, "this model's tokenizer has no chat template (tokenizer_config.json chat_template): use "
                     "/v1/completions with a plain prompt", param="messages", code="no_chat_template")
    try:
      text = svc.chat_template([m.model_dump(exclude_none=True) for m in body.messages])
    except ValueError as e:        # the template refused the conversation (raise_exception) or does not render
      raise ApiError(400, str(e).splitlines()[0], param="messages", code="chat_template_error") from None
    ids = _encode(svc, text, "messages")
    return await _serve(svc, request, body, ids, body.limit(), chat=True)

  return app


def _parse(model, raw: bytes):
  try:
    return model.model_validate_json(raw or b"")
  except ValidationError as e:
    raise validation_error(e.errors()) from None


def _encode(svc, prompt, param: str) -> list[int]:
  if isinstance(prompt, list):
    if max(prompt) >= svc.engine.cfg.vocab_size:
      raise ApiError(400, f"token ids must be below the vocabulary size {svc.engine.cfg.vocab_size}", param=param)
    return list(prompt)
  try:
    ids = svc.engine.encode(prompt)
  except InferenceError as e:
    raise ApiError(400, str(e), param=param, code="invalid_prompt") from None
  if not ids:
    raise ApiError(400, "the prompt encodes to no tokens", param=param, code="invalid_prompt")
  return ids


def _submit(svc, body, ids: list[int], max_tokens: int | None) -> Job:
  """Checks the request against the model and the server, and queues it."""
  if svc.draining:
    raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                   headers={"Retry-After": "5"})
  if body.model != svc.model_name:
    raise ApiError(404, f"model {body.model!r} does not exist: this server serves {svc.model_name!r} (GET /v1/models)",
                   type="not_found_error", param="model", code="model_not_found")
  ctx = svc.engine.cfg.max_seq_len
  n = max_tokens if max_tokens is not None else max(1, min(svc.engine.layout.max_new, ctx - len(ids)))
  try:
    svc.engine.check_request(len(ids), n, "this request")
  except InferenceError as e:
    param = "max_tokens" if len(ids) < ctx else "prompt"
    raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
  timeout = min(body.timeout or svc.request_timeout, svc.request_timeout)
  job = Job(ids, n, SamplingParams(body.temperature, body.top_k, body.top_p),
            body.seed if body.seed is not None else secrets.randbelow(2 ** 31), time.monotonic() + timeout,
            asyncio.get_running_loop())
  try:
    svc.loop.submit(job)
  except QueueFull:
    raise ApiError(429, f"the server is busy ({svc.loop.max_queue} requests wait for a slot); retry later",
                   type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
  return job


async def _events(svc, job: Job, tt: TokenText, request: Request | None):
  """Yields lists of (piece, depth), then the finish reason. Raises ApiError on timeout or engine error; the
  job is cancelled when this generator ends early (client gone, stop string)."""
  try:
    while True:
      try:
        ev = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S) if request else await job.events.get()
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          svc.metrics.disconnects.inc()
          return
        continue
      if ev[0] == "tokens":
        pieces = tt.add(ev[1], ev[2])
        if pieces:
          yield pieces
        if tt.stopped:
          yield "stop"
          return
      elif ev[0] == "done":
        rest = tt.finish()
        if rest:
          yield rest
        yield FINISH.get(ev[1].finish_reason, ev[1].finish_reason)
        return
      elif ev[0] == "timeout":
        raise ApiError(504, "the request ran past its timeout (the server's --request_timeout or the request's "
                       "timeout)", type="timeout_error", code="request_timeout")
      else:
        raise ApiError(503, str(ev[1]), type="server_error", code="engine_unavailable")
  finally:
    if not job.ended:
      svc.loop.cancel(job)


def _usage(ids, tt: TokenText) -> dict:
  return {"prompt_tokens": len(ids), "completion_tokens": len(tt.ids), "total_tokens": len(ids) + len(tt.ids)}


def _mor(pieces, return_depths: bool) -> dict:
  if not return_depths:
    return {}
  return {"mor": {"tokens": [p for p, _ in pieces], "depths": [d for _, d in pieces]}}


async def _serve(svc, request: Request, body, ids: list[int], max_tokens, *, chat: bool):
  job = _submit(svc, body, ids, max_tokens)
  tt = TokenText(svc.tokenizer, body.stops(), eos_id=getattr(svc.tokenizer, "eos_id", None))
  rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
  created = int(time.time())
  head = {"id": rid, "created": created, "model": svc.model_name}
  path = request.url.path
  if body.stream:
    return EventSourceResponse(_stream(svc, job, tt, ids, body, head, chat, path), ping=15,
                               headers={"Cache-Control": "no-cache"})
  pieces, finish = [], None
  async for item in _events(svc, job, tt, request):
    if isinstance(item, str):
      finish = item
    else:
      pieces += item
  if finish is None:                # the client went away
    return Response(status_code=499)
  text = "".join(p for p, _ in pieces)
  choice = {"index": 0, "finish_reason": finish, **_mor(pieces, body.return_depths)}
  if chat:
    choice["message"] = {"role": "assistant", "content": text}
  else:
    choice.update(text=text, logprobs=None)
  svc.metrics.requests.labels(path, "200").inc()
  return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
          "usage": _usage(ids, tt)}


async def _stream(svc, job, tt, ids, body, head, chat: bool, path: str):
  """The SSE events of a streamed request (OpenAI chunks, then [DONE]); errors as an {"error": ...} event."""
  obj = "chat.completion.chunk" if chat else "text_completion"

  def chunk(pieces, finish=None, first=False):
    text = "".join(p for p, _ in pieces)
    c = {"index": 0, "finish_reason": finish, **_mor(pieces, body.return_depths and pieces)}
    if chat:
      c["delta"] = ({"role": "assistant"} if first else {}) | ({"content": text} if pieces or first else {})
    else:
      c.update(text=text, logprobs=None)
    return {"data": json.dumps({**head, "object": obj, "choices": [c]})}

  status = "200"
  try:
    if chat:
      yield chunk([], first=True)
    async for item in _events(svc, job, tt, None):
      yield chunk([], finish=item) if isinstance(item, str) else chunk(item)
    if body.stream_options is not None and body.stream_options.include_usage:
      yield {"data": json.dumps({**head, "object": obj, "choices": [], "usage": _usage(ids, tt)})}
  except ApiError as e:
    status = str(e.status)
    yield {"data": json.dumps(e.body())}
  finally:
    svc.metrics.requests.labels(path, status).inc()
  yield {"data": "[DONE]"}
