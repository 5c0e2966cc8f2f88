"""`--mode=serve`: restore a workdir's model and serve it over HTTP (OpenAI-compatible API, web page, metrics).

  python main.py --mode=serve --workdir=W [--host=127.0.0.1] [--port=8000] [--slots=16]

The model runs on the depth-wise batching engine (mor_jax.infer.engine) driven by one loop thread
(serve/loop.py); uvicorn serves the FastAPI app (serve/app.py). SIGTERM (or Ctrl-C): the server stops accepting,
finishes the requests in flight within --drain_timeout seconds (those still running then get an error: a
streamed one an error event and [DONE]), and exits 0. If the engine loop fails, every request queued or in flight
is answered with the cause, the server shuts down and exits 1 (for a supervisor to restart it). The options,
flags and checks are in serve/options.py, the entry point `main_serve` in serve/command.py; this module is what
runs then.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Callable

import uvicorn
from sse_starlette.sse import AppStatus

from mor_jax.infer import compilation
from mor_jax.infer import options as options_lib
from mor_jax.infer.checkpoint import describe, load_tokenizer, restore, tokenizer_source
from mor_jax.infer.engine import Engine
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.prompts import chat_settings, render_chat
from mor_jax.serve.app import create_app
from mor_jax.serve.options import FLAG_DEFAULTS, ServeOptions  # noqa: F401 (FLAG_DEFAULTS: benchmarks/serve_load.py)
from mor_jax.serve.guard import IdleTimeoutH11Protocol
from mor_jax.serve.loop import EngineLoop
from mor_jax.serve.metrics import Metrics
from mor_jax.serve.prepare import max_prompt_chars

WARM_PROMPT_LENGTHS = (16, 24, 32, 48, 64, 96, 128)   # prompt buckets compiled in the background after start-up
DRAIN_GRACE_S = 5.0      # after --drain_timeout: for the error events to reach the clients, then uvicorn cancels
_DEFAULT = ServeOptions()


@dataclasses.dataclass
class Service:
  """What the HTTP layer needs: the engine (read-only from handlers), its loop, tokenizer, names and limits."""
  engine: object
  loop: object
  metrics: object
  tokenizer: object
  model_name: str
  chat_template: Callable | None
  request_timeout: float
  description: str = ""
  max_request_bytes: int = _DEFAULT.max_request_bytes
  api_key: str | None = None
  idle_timeout: float = _DEFAULT.idle_timeout
  bos_id: int | None = None          # prepended to text prompts (the model was trained with data.add_bos)
  max_prompt_chars: int = 1 << 62    # a longer text cannot fit the context (serve/prepare.py)
  draining: bool = False
  warned_models: set = dataclasses.field(default_factory=set)
  created: int = dataclasses.field(default_factory=lambda: int(time.time()))

  def model_card(self) -> dict:
    c = self.engine.cfg
    kind = "vanilla" if c.strategy == "none" else c.strategy
    return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "mor-jax",
            "mor": {"strategy": kind, "recursions": c.recursions, "routing": c.mor_type if c.mor_enable else None,
                    "context": self.engine.context, "slots": self.engine.slots,
                    "max_tokens": self.engine.max_new_tokens, "chat": self.chat_template is not None}}


def _chat_template(tokenizer_dir: str | None) -> Callable | None:
  """apply(messages) -> prompt text when the tokenizer folder has a chat template, else None."""
  file = os.path.join(tokenizer_dir or "", "tokenizer_config.json")
  if not tokenizer_dir or not os.path.isfile(file):
    return None
  try:
    with open(file, encoding="utf-8") as f:
      has_template = bool(json.load(f).get("chat_template"))
  except (OSError, ValueError, AttributeError) as e:
    raise InferenceError(f"{file} cannot be read as a JSON object ({e}): repair or remove it.") from None
  if not has_template:
    return None
  try:
    return functools.partial(render_chat, chat_settings(tokenizer_dir))
  except InferenceError:       # a list of templates without a 'default' one: no chat (the API says so)
    return None


def build_service(config, workdir: str, options: ServeOptions | None = None, **kw) -> Service:
  """Restores the model and its tokenizer, builds the engine, its loop (not started) and the metrics.

  The options are `options` (default: ServeOptions()) with the keywords `kw` replaced."""
  o = options_lib.from_keywords(ServeOptions, kw, "build_service", base=options)
  kv = options_lib.check_decode(o)
  compilation.enable_compilation_cache()
  restored = restore(workdir, step=o.step, config=config)
  tok = load_tokenizer(restored.config, restored.cfg, directory=restored.directory, override=o.tokenizer)
  cfg = restored.cfg
  add_bos = bool(restored.config.data.add_bos)
  if add_bos and tok.bos_id is None:
    raise InferenceError("the model was trained with data.add_bos but its tokenizer has no BOS token: give one "
                         "with --tokenizer.")
  # BOS goes before text prompts only (as --mode=generate): the serve layer adds it, the engine takes ids as given
  if o.max_model_len is not None and o.max_model_len > cfg.max_seq_len:
    raise InferenceError(f"--max_model_len={o.max_model_len} is more than the model's context of {cfg.max_seq_len} "
                         "tokens: give at most that (or leave it out).")
  max_len = (o.max_model_len or cfg.max_seq_len) - 1    # cache positions: the last token generated is not fed back
  eng = Engine(cfg, restored.variables, tok, slots=o.slots, max_len=max_len, max_new_tokens=o.serve_max_tokens,
               threshold=o.threshold, kv_capacity=kv, add_bos=False, dtype=o.dtype,
               prefill_rows=min(o.slots, o.prefill_rows) if o.prefill_rows else None, entry_rows="auto",
               exit_rows="auto", window=max(16, 2 * o.step_tokens), step_tokens=o.slots * o.step_tokens,
               compile_ahead=True)
  source = tokenizer_source(restored.config, directory=restored.directory, override=o.tokenizer)
  folder = source if source and os.path.isdir(source) else (os.path.dirname(source) if source else None)
  metrics = Metrics(eng.slots, cfg.recursions)
  name = o.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  return Service(engine=eng, loop=EngineLoop(eng, metrics, max_queue=o.max_queue, stop_at_eos=not o.ignore_eos),
                 metrics=metrics, tokenizer=tok, model_name=name, chat_template=_chat_template(folder),
                 request_timeout=float(o.request_timeout), description=describe(restored),
                 max_request_bytes=int(o.max_request_bytes), api_key=o.api_key, idle_timeout=float(o.idle_timeout),
                 bos_id=tok.bos_id if add_bos else None, max_prompt_chars=max_prompt_chars(tok, eng.context))


def _warm_up(svc: Service, err) -> None:
  """Compiles the engine's programs for short requests (admission of one prompt of up to 16 tokens, the decode
  step at the smallest cache capacity) before the port opens; longer prompts and sequences compile on first use
  (each once; the compilation cache keeps them for the next start)."""
  eng = svc.engine
  t = time.time()
  print(f"[compiling: admission of short prompts, the decode step for sequences of up to {eng.capacity} tokens]",
        file=err, flush=True)
  eng.generate([[0]], max_new_tokens=min(2, eng.max_new_tokens), stop_at_eos=False)
  eng.compile_ahead(prompt_lengths=WARM_PROMPT_LENGTHS)
  print(f"[compiled in {time.time() - t:.1f}s; prompts of up to {max(WARM_PROMPT_LENGTHS)} tokens and the next "
        "cache size compile in the background, anything longer on first use]", file=err, flush=True)


def _server(svc: Service, app, *, host: str, port: int, drain_timeout: float, err, t0: float):
  """The uvicorn server: drains on SIGTERM / Ctrl-C (the requests still running after --drain_timeout get an
  error), shuts down when the engine loop fails, closes idle connections after --idle_timeout."""
  class _Server(uvicorn.Server):
    def handle_exit(self, sig, frame):
      if not svc.draining:
        print("[draining: no new requests; waiting for those in flight]", file=err, flush=True)
        timer = threading.Timer(drain_timeout, svc.loop.abort, ["the server shut down before this request finished "
                                                                "(--drain_timeout)"])
        timer.daemon = True
        timer.start()
      svc.draining = True
      super().handle_exit(sig, frame)

    async def startup(self, sockets=None):
      await super().startup(sockets)
      bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
      where = ", ".join(f"http://{a[0]}:{a[1]}" for a in bound)
      print(f"[{svc.description}; {svc.engine.slots} slots; ready in {time.time() - t0:.1f}s] serving "
            f"{svc.model_name!r} at {where}" + (" (API key required)" if svc.api_key else ""), file=err, flush=True)

  server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                  http=IdleTimeoutH11Protocol, timeout_keep_alive=svc.idle_timeout,
                                  timeout_graceful_shutdown=drain_timeout + DRAIN_GRACE_S))

  def failed(e: BaseException) -> None:             # (the loop thread) every job is answered: shut down, exit 1
    print(f"[{svc.loop.error_message}; shutting down, exit code 1]", file=err, flush=True)
    server.should_exit = True
  svc.loop.on_failure = failed
  return server


def serve(config, workdir: str, options: ServeOptions, *, err) -> int:
  """Builds the service, compiles the short requests' programs, serves until SIGTERM / Ctrl-C or an engine failure
  (the options are checked: serve/command.py's main_serve); returns the exit code (0, or 1 when the engine failed)."""
  t0 = time.time()
  svc = build_service(config, workdir, options)
  _warm_up(svc, err)
  server = _server(svc, create_app(svc), host=options.host, port=options.port, drain_timeout=options.drain_timeout,
                   err=err, t0=t0)
  svc.loop.start()
  AppStatus.disable_automatic_graceful_drain()      # SIGTERM lets streams finish (bounded by drain_timeout)
  for sig in (signal.SIGTERM, signal.SIGINT):       # uvicorn re-raises the signal it drained on: make that a no-op
    signal.signal(sig, lambda *_: None)
  try:
    server.run()
  finally:
    AppStatus.should_exit = True
    svc.loop.stop(timeout=10)
  print("[stopped]", file=err, flush=True)
  return 0 if svc.loop.error is None else 1
