"""`--mode=serve`: restore a workdir's model and serve it over HTTP (OpenAI-compatible API, web page, metrics).

  python main.py --mode=serve --workdir=W [--host=127.0.0.1] [--port=8000] [--slots=16]

The model runs on the depth-wise batching engine (mor_jax.infer.engine) driven by one loop thread
(serve/loop.py); uvicorn serves the FastAPI app (serve/app.py). SIGTERM (or Ctrl-C): the server stops accepting,
finishes the requests in flight within --drain_timeout seconds (those still running then get an error: a
streamed one an error event and [DONE]), and exits 0. If the engine loop fails, every request queued or in flight
is answered with the cause, the server shuts down and exits 1 (for a supervisor to restart it). The flags here
are defined by `define_flags()`; --tokenizer, --step, --threshold and --kv_capacity are the generate mode's.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import sys
import threading
import time
from typing import Callable

FLAG_DEFAULTS = dict(host="127.0.0.1", port=8000, slots=16, max_queue=256, request_timeout=600.0, drain_timeout=30.0,
                     step_tokens=4, served_model_name=None, serve_max_tokens=None,
                     prefill_rows=0, max_request_bytes=4 * 2 ** 20, api_key=None, idle_timeout=5.0,
                     max_model_len=None)
API_KEY_ENV = "MOR_API_KEY"
WARM_PROMPT_LENGTHS = (16, 32, 64, 128)   # prompt buckets compiled in the background after start-up
DRAIN_GRACE_S = 5.0      # after --drain_timeout: for the error events to reach the clients, then uvicorn cancels


def define_flags(flags=None) -> None:
  """Defines the serve-mode flags on absl's FLAGS (call once, at import time of main.py)."""
  if flags is None:
    from absl import flags  # pylint: disable=g-import-not-at-top,redefined-outer-name
  d = FLAG_DEFAULTS
  flags.DEFINE_string("host", d["host"], "serve: address to listen on (0.0.0.0: every interface).")
  flags.DEFINE_integer("port", d["port"], "serve: TCP port (0: a free one, printed at start).")
  flags.DEFINE_integer("slots", d["slots"], "serve: sequences decoded at once (engine slots).")
  flags.DEFINE_integer("max_queue", d["max_queue"], "serve: requests that may wait for a slot; more get 429.")
  flags.DEFINE_float("request_timeout", d["request_timeout"], "serve: seconds a request may take at most.")
  flags.DEFINE_float("drain_timeout", d["drain_timeout"], "serve: seconds SIGTERM waits for requests in flight.")
  flags.DEFINE_integer("step_tokens", d["step_tokens"], "serve: tokens per slot the engine makes between two "
                       "host steps (streaming granularity vs host overhead; a MoR token takes several ticks).")
  flags.DEFINE_integer("max_model_len", d["max_model_len"], "serve: most tokens (prompt + generated) of one request "
                       "(default: the model's context); the KV caches grow with the live requests up to it.")
  flags.DEFINE_string("served_model_name", d["served_model_name"], "serve: the model's name in the API (default: the "
                      "workdir's folder name).")
  flags.DEFINE_integer("serve_max_tokens", d["serve_max_tokens"], "serve: most tokens one request may generate "
                       "(default: --max_model_len).")
  flags.DEFINE_integer("prefill_rows", d["prefill_rows"], "serve: prompts prefilled per admission call, a fixed "
                       "batch (at most --slots; 0: the requests that arrived, padded to a power of two).")
  flags.DEFINE_integer("max_request_bytes", d["max_request_bytes"], "serve: largest request body; a larger one gets "
                       "413 before it is read.")
  flags.DEFINE_string("api_key", d["api_key"], f"serve: require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                      f"(default: ${API_KEY_ENV}, else no key; prefer the variable: a flag shows in ps).")
  flags.DEFINE_float("idle_timeout", d["idle_timeout"], "serve: seconds a connection may stay without sending a "
                     "complete request head (new or kept-alive), and a request body may stall.")


def run_from_flags(config, workdir) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  F = flags.FLAGS
  return main_serve(config, workdir, tokenizer=F.tokenizer, step=F.step, threshold=F.threshold,
                    kv_capacity=F.kv_capacity, dtype=F.dtype, ignore_eos=F.ignore_eos,
                    **{k: F[k].value for k in FLAG_DEFAULTS})


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
  max_request_bytes: int = FLAG_DEFAULTS["max_request_bytes"]
  api_key: str | None = None
  idle_timeout: float = FLAG_DEFAULTS["idle_timeout"]
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


def check_flags(*, port, slots, max_queue, request_timeout, drain_timeout, step_tokens, serve_max_tokens,
                prefill_rows=0, max_model_len=None, max_request_bytes=FLAG_DEFAULTS["max_request_bytes"], api_key=None,
                idle_timeout=FLAG_DEFAULTS["idle_timeout"], **unused) -> None:
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  key_ok = api_key is None or (bool(api_key) and api_key.isprintable() and not any(c.isspace() for c in api_key))
  checks = [("port", port, 0 <= port <= 65535, "a TCP port in [0, 65535]"),
            ("slots", slots, slots >= 1, "an integer >= 1"),
            ("max_queue", max_queue, max_queue >= 0, "an integer >= 0"),
            ("request_timeout", request_timeout, request_timeout > 0, "seconds > 0"),
            ("drain_timeout", drain_timeout, drain_timeout >= 0, "seconds >= 0"),
            ("step_tokens", step_tokens, step_tokens >= 1, "an integer >= 1"),
            ("max_model_len", max_model_len, max_model_len is None or max_model_len >= 2,
             "an integer >= 2, at most the model's context (or leave it out)"),
            ("prefill_rows", prefill_rows, prefill_rows >= 0, "an integer >= 0"),
            ("serve_max_tokens", serve_max_tokens, serve_max_tokens is None or serve_max_tokens >= 1,
             "an integer >= 1 (or leave it out)"),
            ("max_request_bytes", max_request_bytes, max_request_bytes >= 1024, "bytes >= 1024"),
            ("idle_timeout", idle_timeout, idle_timeout > 0, "seconds > 0"),
            ("api_key", "...", key_ok, f"a non-empty key without spaces (or leave it out; also ${API_KEY_ENV})")]
  for flag, value, ok, want in checks:
    if not ok:
      raise InferenceError(f"--{flag}={value} is not valid: give {want}.")


def _chat_template(tokenizer_dir: str | None):
  """apply(messages) -> prompt text when the tokenizer folder has a chat template, else None."""
  from mor_jax.interop import gguf  # pylint: disable=g-import-not-at-top
  from mor_jax.interop import hf  # pylint: disable=g-import-not-at-top
  if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
    return None
  file = os.path.join(tokenizer_dir, "tokenizer_config.json")
  if not os.path.isfile(file) or not hf.read_json(file).get("chat_template"):
    return None
  return lambda messages: gguf.apply_chat_template(tokenizer_dir, messages)


def build_service(config, workdir: str, *, tokenizer=None, step=None, threshold=None, kv_capacity="full", slots=16,
                  max_queue=256, request_timeout=600.0, step_tokens=4, served_model_name=None,
                  serve_max_tokens=None, ignore_eos=False, prefill_rows=0, max_model_len=None, dtype="float32",
                  max_request_bytes=FLAG_DEFAULTS[
                      "max_request_bytes"], api_key=None, idle_timeout=FLAG_DEFAULTS["idle_timeout"],
                  **unused) -> Service:
  """Restores the model and its tokenizer, builds the engine, its loop (not started) and the metrics."""
  from mor_jax.infer import cli as infer_cli  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.checkpoint import (describe, load_tokenizer, restore,  # pylint: disable=g-import-not-at-top
                                        tokenizer_source)
  from mor_jax.infer.engine import Engine  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.loop import EngineLoop  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.metrics import Metrics  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.prepare import max_prompt_chars  # pylint: disable=g-import-not-at-top
  infer_cli.check_threshold(threshold)
  kv = infer_cli.parse_kv_capacity(kv_capacity)
  infer_cli._enable_compilation_cache()  # pylint: disable=protected-access
  restored = restore(workdir, step=step, config=config)
  tok = load_tokenizer(restored.config, restored.cfg, directory=restored.directory, override=tokenizer)
  cfg = restored.cfg
  add_bos = bool(restored.config.data.get("add_bos", False))
  if add_bos and tok.bos_id is None:
    raise InferenceError("the model was trained with data.add_bos but its tokenizer has no BOS token: give one "
                         "with --tokenizer.")
  # BOS goes before text prompts only (as --mode=generate): the serve layer adds it, the engine takes ids as given
  if max_model_len is not None and max_model_len > cfg.max_seq_len:
    raise InferenceError(f"--max_model_len={max_model_len} is more than the model's context of {cfg.max_seq_len} "
                         "tokens: give at most that (or leave it out).")
  max_len = (max_model_len or cfg.max_seq_len) - 1    # cache positions: the last token generated is not fed back
  eng = Engine(cfg, restored.variables, tok, slots=slots, max_len=max_len, max_new_tokens=serve_max_tokens,
               threshold=threshold, kv_capacity=kv, add_bos=False, dtype=dtype,
               prefill_rows=min(slots, prefill_rows) if prefill_rows else None, entry_rows="auto",
               exit_rows="auto", window=max(16, 2 * step_tokens), step_tokens=slots * step_tokens, compile_ahead=True)
  source = tokenizer_source(restored.config, directory=restored.directory, override=tokenizer)
  folder = source if source and os.path.isdir(source) else (os.path.dirname(source) if source else None)
  metrics = Metrics(eng.slots, cfg.recursions)
  name = served_model_name or os.path.basename(os.path.normpath(os.path.abspath(workdir)))
  return Service(engine=eng, loop=EngineLoop(eng, metrics, max_queue=max_queue, stop_at_eos=not ignore_eos),
                 metrics=metrics, tokenizer=tok, model_name=name, chat_template=_chat_template(folder),
                 request_timeout=float(request_timeout), description=describe(restored),
                 max_request_bytes=int(max_request_bytes), api_key=api_key, idle_timeout=float(idle_timeout),
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


def _loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def _server(svc: Service, app, *, host: str, port: int, drain_timeout: float, err, t0: float):
  """The uvicorn server: drains on SIGTERM / Ctrl-C (the requests still running after --drain_timeout get an
  error), shuts down when the engine loop fails, closes idle connections after --idle_timeout."""
  import uvicorn  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.guard import IdleTimeoutH11Protocol  # pylint: disable=g-import-not-at-top

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


def main_serve(config, workdir: str, *, host="127.0.0.1", port=8000, drain_timeout=30.0, err=None, **kw) -> int:
  """The serve command; returns the exit code (0 after a SIGTERM / Ctrl-C shutdown, 1 when the engine failed)."""
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  try:                                            # the HTTP libraries are an extra: say so in one line
    import uvicorn  # pylint: disable=g-import-not-at-top,unused-import
    from sse_starlette.sse import AppStatus  # pylint: disable=g-import-not-at-top
    from mor_jax.serve.app import create_app  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise InferenceError(f"--mode=serve needs the serving extra ({e.name} is not installed): "
                         "pip install -r requirements-serve.txt") from e
  err = err or sys.stderr
  if not workdir:
    raise InferenceError("--workdir is required for --mode=serve (the training workdir or a checkpoint directory).")
  if kw.get("api_key") is None:
    kw["api_key"] = os.environ.get(API_KEY_ENV) or None
  check_flags(port=port, drain_timeout=drain_timeout, **{k: kw.get(k, FLAG_DEFAULTS[k]) for k in (
      "slots", "max_queue", "request_timeout", "step_tokens", "serve_max_tokens", "prefill_rows", "max_model_len",
      "max_request_bytes", "api_key", "idle_timeout")})
  if not _loopback(host) and not kw["api_key"]:
    print(f"[warning: --host={host} without an API key: anyone who reaches the port can generate; set "
          f"${API_KEY_ENV} and put a TLS reverse proxy in front (docs/serving.md)]", file=err, flush=True)
  t0 = time.time()
  svc = build_service(config, workdir, **kw)
  _warm_up(svc, err)
  server = _server(svc, create_app(svc), host=host, port=port, drain_timeout=drain_timeout, err=err, t0=t0)
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
