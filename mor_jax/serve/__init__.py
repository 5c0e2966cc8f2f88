"""Serving: an OpenAI-compatible HTTP server on the depth-wise batching engine (`python main.py --mode=serve`).

  options.py  the command's options (each flag's default and help declared once) and their checks
  command.py  its flags and entry point, main_serve (nothing heavy imported before it runs)
  server.py   what runs then: model + tokenizer, engine, uvicorn, SIGTERM drain
  loop.py     the engine loop thread (one owner of the devices), jobs, bounded queue, cancellation, deadlines
  app.py      FastAPI routes: /v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /health,
              /metrics, / (the web page in static/)
  guard.py    API key, JSON content type, body size and pace, idle-connection deadline
  prepare.py  a body -> the checked request and its prompt's token ids (in a worker thread)
  schemas.py  request bodies (unknown fields refused, every field bounded) and OpenAI-style errors
  text.py     incremental detokenisation, stop strings
  metrics.py  Prometheus metrics

The HTTP libraries are an extra: `pip install -r requirements-serve.txt`.
"""

from mor_jax.serve.command import define_flags, main_serve, run_from_flags
from mor_jax.serve.options import FLAG_DEFAULTS

__all__ = ["FLAG_DEFAULTS", "define_flags", "main_serve", "run_from_flags"]
