"""The HTTP layer: FastAPI routes of the OpenAI-compatible API, the web page and /metrics.

  POST /v1/completions, /v1/chat/completions   (stream: server-sent events in OpenAI's chunk format, then [DONE])
  GET  /v1/models, /health, /metrics, /        (/ : the page that colours each token by its recursion depth)

With --api_key, /v1/* and /metrics need `Authorization: Bearer KEY`; /health, / and /static are open. A POST
passes serve/guard.py (key, JSON content type, body size), is parsed and tokenized in a worker thread
(serve/prepare.py), and is queued to the engine loop. A task per request watches its connection: a client that
goes away cancels its job at once (streamed or not) and is counted (mor_client_disconnects_total).
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
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mor_jax.infer.errors import InferenceError
from mor_jax.infer.sampling import SamplingParams
from mor_jax.serve import prepare
from mor_jax.serve.guard import authorize, read_body
from mor_jax.serve.loop import Job, LoopClosed, QueueFull
from mor_jax.serve.schemas import ApiError
from mor_jax.serve.text import TokenText

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
LOOP_ERRORS = {  # a loop's ("error", kind, message) -> (status, type, code)
    "invalid_request": (400, "invalid_request_error", "invalid_value"),
    "engine_failed": (500, "server_error", "engine_error"),
    "shutting_down": (503, "server_error", "shutting_down")}


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

  @app.get("/favicon.ico")
  async def _icon():
    return FileResponse(os.path.join(STATIC, "favicon.svg"), media_type="image/svg+xml")

  app.mount("/static", StaticFiles(directory=STATIC), name="static")

  @app.get("/health")
  async def _health():
    ok = not svc.draining and svc.loop.error is None
    status = "error" if svc.loop.error is not None else ("draining" if svc.draining else "ok")
    body = {"status": status, "slots": svc.engine.slots, "busy": svc.engine.busy, "waiting": svc.loop.waiting}
    if svc.loop.error is not None:
      body["error"] = svc.loop.error_message
    return JSONResponse(body, status_code=200 if ok else 503)

  @app.get("/metrics")
  async def _metrics(request: Request):
    authorize(svc, request)
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

  @app.get("/v1/models")
  async def _models(request: Request):
    authorize(svc, request)
    return {"object": "list", "data": [svc.model_card()]}

  @app.post("/v1/completions")
  async def _completions(request: Request):
    authorize(svc, request)
    body, ids, echo = await run_in_threadpool(prepare.completion, svc, await read_body(svc, request))
    return await _serve(svc, request, body, ids, body.max_tokens, chat=False, echo=echo if body.echo else "")

  @app.post("/v1/chat/completions")
  async def _chat(request: Request):
    authorize(svc, request)
    body, ids = await run_in_threadpool(prepare.chat, svc, await read_body(svc, request))
    return await _serve(svc, request, body, ids, body.limit(), chat=True)

  return app


def _submit(svc, body, ids: list[int], max_tokens: int | None) -> Job:
  """Checks the request against the model and the server, and queues it."""
  if svc.loop.error is not None:
    raise ApiError(503, svc.loop.error_message + " (the server is going down)",
                   type="server_error", code="engine_error", headers={"Retry-After": "5"})
  if svc.draining:
    raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down",
                   headers={"Retry-After": "5"})
  ctx = svc.engine.context
  n = max_tokens if max_tokens is not None else svc.engine.default_new_tokens(len(ids))
  try:
    svc.engine.check_request(len(ids), n, "this request")
  except InferenceError as e:
    param = "max_tokens" if len(ids) < ctx else "prompt"
    raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
  timeout = min(body.timeout or svc.request_timeout, svc.request_timeout)
  sampling = SamplingParams(body.temperature, min(body.top_k, svc.engine.cfg.vocab_size), body.top_p)
  job = Job(ids, n, sampling, body.seed if body.seed is not None else secrets.randbelow(2 ** 31),
            time.monotonic() + timeout, asyncio.get_running_loop())
  try:
    svc.loop.submit(job)
  except QueueFull:
    raise ApiError(429, f"the server is busy ({svc.loop.max_queue} requests wait for a slot); retry later",
                   type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
  except LoopClosed as e:          # (the engine failed, or the drain timeout ended every request, just now)
    code = "engine_error" if svc.loop.error is not None else "shutting_down"
    raise ApiError(503, str(e), type="server_error", code=code, headers={"Retry-After": "5"}) from None
  return job


async def _watch(svc, request: Request, job: Job) -> None:
  """Waits for the client to go away (the body is read: the next ASGI message is the disconnect); then cancels
  the job, counts it and wakes the handler. Cancelled by the handler once the answer is complete."""
  while (await request.receive())["type"] != "http.disconnect":
    pass
  if not job.answered:
    job.answered = True
    svc.metrics.disconnects.inc()
    svc.loop.cancel(job)
    job.events.put_nowait(("gone",))


async def _events(svc, job: Job, tt: TokenText):
  """Yields lists of (piece, depth), then the finish reason (nothing when the client went away). Raises
  ApiError on timeout or engine error; the job is cancelled when this generator ends early (client gone, stop
  string)."""
  try:
    while True:
      ev = await job.events.get()
      if ev[0] == "gone":
        return
      if ev[0] == "tokens":
        pieces = tt.add(ev[1], ev[2])
        if pieces:
          yield pieces
        if tt.stopped:
          job.answered = True
          yield "stop"
          return
      elif ev[0] == "done":
        job.answered = True
        rest = tt.finish()
        if rest:
          yield rest
        yield FINISH.get(ev[1].finish_reason, ev[1].finish_reason)
        return
      elif ev[0] == "timeout":
        job.answered = True
        raise ApiError(504, "the request ran past its timeout (the server's --request_timeout or the request's "
                       "timeout)", type="timeout_error", code="request_timeout")
      else:
        job.answered = True
        status, kind, code = LOOP_ERRORS[ev[1]]
        raise ApiError(status, ev[2], type=kind, code=code, headers={"Retry-After": "5"} if status > 500 else None)
  finally:
    if not job.ended:
      svc.loop.cancel(job)


def _usage(ids, tt: TokenText) -> dict:
  return {"prompt_tokens": len(ids), "completion_tokens": len(tt.ids), "total_tokens": len(ids) + len(tt.ids)}


def _mor(pieces, return_depths: bool) -> dict:
  if not return_depths:
    return {}
  return {"mor": {"tokens": [p for p, _ in pieces], "depths": [d for _, d in pieces]}}


async def _serve(svc, request: Request, body, ids: list[int], max_tokens, *, chat: bool, echo: str = ""):
  job = _submit(svc, body, ids, max_tokens)
  watcher = asyncio.create_task(_watch(svc, request, job))
  tt = TokenText(svc.tokenizer, body.stops(), eos_id=getattr(svc.tokenizer, "eos_id", None))
  rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
  head = {"id": rid, "created": int(time.time()), "model": svc.model_name}
  path = request.url.path
  if body.stream:
    return EventSourceResponse(_stream(svc, job, watcher, tt, ids, body, head, chat, path, echo), ping=15,
                               headers={"Cache-Control": "no-cache"})
  pieces, finish = [], None
  try:
    async for item in _events(svc, job, tt):
      if isinstance(item, str):
        finish = item
      else:
        pieces += item
  finally:
    watcher.cancel()
  if finish is None:                # the client went away
    svc.metrics.requests.labels(path, "499").inc()
    return Response(status_code=499)
  text = echo + "".join(p for p, _ in pieces)
  choice = {"index": 0, "finish_reason": finish, **_mor(pieces, body.return_depths)}
  if chat:
    choice["message"] = {"role": "assistant", "content": text}
  else:
    choice.update(text=text, logprobs=None)
  svc.metrics.requests.labels(path, "200").inc()
  return {**head, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
          "usage": _usage(ids, tt)}


async def _stream(svc, job, watcher, tt, ids, body, head, chat: bool, path: str, echo: str):
  """The SSE events of a streamed request (OpenAI chunks, then [DONE]); errors as an {"error": ...} event, then
  [DONE] (a timeout, the engine failing, the drain timeout at shutdown)."""
  obj = "chat.completion.chunk" if chat else "text_completion"

  def chunk(pieces, finish=None, first=False, text=None):
    text = "".join(p for p, _ in pieces) if text is None else text
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
    if echo:
      yield chunk([], text=echo)
    async for item in _events(svc, job, tt):
      yield chunk([], finish=item) if isinstance(item, str) else chunk(item)
    if body.stream_options is not None and body.stream_options.include_usage:
      yield {"data": json.dumps({**head, "object": obj, "choices": [], "usage": _usage(ids, tt)})}
  except ApiError as e:
    status = str(e.status)
    yield {"data": json.dumps(e.body())}
  except (asyncio.CancelledError, GeneratorExit):   # the client went away (or uvicorn's last-resort cancel)
    status = "499"
    raise
  finally:
    watcher.cancel()
    svc.metrics.requests.labels(path, status).inc()
  yield {"data": "[DONE]"}
