"""The serve command's flags (from `ServeOptions`, serve/options.py) and its entry point, `main_serve`. Nothing
heavy is imported here: main.py defines the flags at import time, and JAX, the model and the HTTP libraries
(mor_jax/serve/server.py) load only when the command runs.

--tokenizer, --step, --threshold, --kv_capacity, --dtype and --ignore_eos are the options generate shares
(`mor_jax.infer.options.DecodeOptions`: one flag each).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys

from absl import flags as absl_flags

from mor_jax.infer import options as options_lib
from mor_jax.infer.errors import InferenceError
from mor_jax.serve.options import API_KEY_ENV, ServeOptions, check_flags


def define_flags(flags=None) -> None:
  """Defines the serve-mode flags on absl's FLAGS (call once, at import time of main.py)."""
  options_lib.define_flags(ServeOptions, flags or absl_flags)


def run_from_flags(config, workdir) -> int:
  """Calls main_serve with the values of the flags define_flags() made."""
  return main_serve(config, workdir, options_lib.from_flags(ServeOptions, absl_flags.FLAGS))


def loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


def _require_http_libraries() -> None:
  """The HTTP libraries are an extra: say so in one line."""
  try:
    import fastapi  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import prometheus_client  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import sse_starlette  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import uvicorn  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise InferenceError(f"--mode=serve needs the serving extra ({e.name} is not installed): "
                         "pip install -r requirements-serve.txt") from e


def main_serve(config, workdir: str, options: ServeOptions | None = None, *, err=None, **kw) -> int:
  """The serve command; returns the exit code (0 after a SIGTERM / Ctrl-C shutdown, 1 when the engine failed).

  The options are `options` (default: ServeOptions()) with the keywords `kw` replaced (ServeOptions field names).
  """
  o = options_lib.from_keywords(ServeOptions, kw, "main_serve", base=options)
  _require_http_libraries()
  err = err or sys.stderr
  if not workdir:
    raise InferenceError("--workdir is required for --mode=serve (the training workdir or a checkpoint directory).")
  if o.api_key is None:
    o = dataclasses.replace(o, api_key=os.environ.get(API_KEY_ENV) or None)
  check_flags(o)
  if not loopback(o.host) and not o.api_key:
    print(f"[warning: --host={o.host} without an API key: anyone who reaches the port can generate; set "
          f"${API_KEY_ENV} and put a TLS reverse proxy in front (docs/serving.md)]", file=err, flush=True)
  # JAX, the model and the HTTP libraries are imported only now (see the module docstring)
  from mor_jax.serve import server  # pylint: disable=g-import-not-at-top
  return server.serve(config, workdir, o, err=err)
