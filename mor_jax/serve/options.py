"""The serve command's options: `ServeOptions`, where each flag's default and help are declared once (the decode
options generate shares come from `mor_jax.infer.options.DecodeOptions`), and their checks. No JAX, no HTTP
libraries (main.py defines the flags from these at import time).
"""

from __future__ import annotations

import dataclasses

from mor_jax.infer import options as options_lib
from mor_jax.infer.options import DecodeOptions, option

API_KEY_ENV = "MOR_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeOptions(DecodeOptions):
  """`--mode=serve` (the decode options shared with generate, then serve's own)."""
  host: str = option("127.0.0.1", "string", "serve: address to listen on (0.0.0.0: every interface).")
  port: int = option(8000, "integer", "serve: TCP port (0: a free one, printed at start).")
  slots: int = option(16, "integer", "serve: sequences decoded at once (engine slots).")
  max_queue: int = option(256, "integer", "serve: requests that may wait for a slot; more get 429.")
  request_timeout: float = option(600.0, "float", "serve: seconds a request may take at most.")
  drain_timeout: float = option(30.0, "float", "serve: seconds SIGTERM waits for requests in flight.")
  step_tokens: int = option(4, "integer", "serve: tokens per slot the engine makes between two host steps "
                            "(streaming granularity vs host overhead; a MoR token takes several ticks).")
  served_model_name: str | None = option(None, "string", "serve: the model's name in the API (default: the "
                                         "workdir's folder name).")
  serve_max_tokens: int | None = option(None, "integer", "serve: most tokens one request may generate (default: "
                                        "--max_model_len).")
  prefill_rows: int = option(0, "integer", "serve: prompts prefilled per admission call, a fixed batch (at most "
                             "--slots; 0: the requests that arrived, padded to a power of two).")
  max_request_bytes: int = option(4 * 2 ** 20, "integer", "serve: largest request body; a larger one gets 413 "
                                  "before it is read.")
  api_key: str | None = option(None, "string", "serve: require 'Authorization: Bearer KEY' on /v1/* and /metrics "
                               f"(default: ${API_KEY_ENV}, else no key; prefer the variable: a flag shows in ps).")
  idle_timeout: float = option(5.0, "float", "serve: seconds a connection may stay without sending a complete "
                               "request head (new or kept-alive), and a request body may stall.")
  max_model_len: int | None = option(None, "integer", "serve: most tokens (prompt + generated) of one request "
                                     "(default: the model's context); the KV caches grow with the live requests "
                                     "up to it.")


FLAG_DEFAULTS = options_lib.defaults(ServeOptions)    # derived ({name: default}; benchmarks/serve_load.py reads it)


def check_flags(options: ServeOptions) -> None:
  """Checks the serve options before anything loads; raises InferenceError naming the flag and the fix."""
  o = options
  key_ok = o.api_key is None or (bool(o.api_key) and o.api_key.isprintable() and
                                 not any(c.isspace() for c in o.api_key))
  checks = [("port", o.port, 0 <= o.port <= 65535, "a TCP port in [0, 65535]"),
            ("slots", o.slots, o.slots >= 1, "an integer >= 1"),
            ("max_queue", o.max_queue, o.max_queue >= 0, "an integer >= 0"),
            ("request_timeout", o.request_timeout, o.request_timeout > 0, "seconds > 0"),
            ("drain_timeout", o.drain_timeout, o.drain_timeout >= 0, "seconds >= 0"),
            ("step_tokens", o.step_tokens, o.step_tokens >= 1, "an integer >= 1"),
            ("max_model_len", o.max_model_len, o.max_model_len is None or o.max_model_len >= 2,
             "an integer >= 2, at most the model's context (or leave it out)"),
            ("prefill_rows", o.prefill_rows, o.prefill_rows >= 0, "an integer >= 0"),
            ("serve_max_tokens", o.serve_max_tokens, o.serve_max_tokens is None or o.serve_max_tokens >= 1,
             "an integer >= 1 (or leave it out)"),
            ("max_request_bytes", o.max_request_bytes, o.max_request_bytes >= 1024, "bytes >= 1024"),
            ("idle_timeout", o.idle_timeout, o.idle_timeout > 0, "seconds > 0"),
            ("api_key", "...", key_ok, f"a non-empty key without spaces (or leave it out; also ${API_KEY_ENV})")]
  for flag, value, ok, want in checks:
    options_lib.check_number(flag, value, ok, want)
  options_lib.check_decode(o)
