"""Evaluation: validation NLL in both routing modes, and the lm-evaluation-harness adapter.

Public API:
  main_eval(config, workdir, *, step=None, threshold=None, batches=None) -> dict   the eval command
  evaluate_nll(cfg, variables, batches, *, modes=("topk", "causal"), ...) -> dict  NLL / perplexity / recursions
  make_row_scorer(cfg, mode, ...) -> fn(variables, tokens, targets, mask, positions, segment_ids) per-row sums
  harness.MoRJaxLM          the lm_eval.api.model.LM subclass, registered as "mor_jax" (needs `lm-eval`)

Names are imported lazily: importing this package imports neither JAX nor lm_eval.
"""

import importlib

_EXPORTS = {
    "main_eval": "nll", "evaluate_nll": "nll", "make_row_scorer": "nll",
    "format_table": "nll",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"mor_jax.evaluate.{_EXPORTS[name]}"), name)
  if name == "harness":
    return importlib.import_module("mor_jax.evaluate.harness")
  raise AttributeError(f"module 'mor_jax.evaluate' has no attribute {name!r}")
