"""Run names that follow the model: `{model}` in `config.name` stands for `describe_model(config)`."""

from __future__ import annotations

MODEL_PLACEHOLDER = "{model}"


def describe_model(config) -> str:
  """A short name of the model a config describes: 'vanilla', '<sharing strategy>-r<R>' for a recursive model
  without routers, 'mor-<routing type>-r<R>' for a MoR model (e.g. 'middle_cycle-r2', 'mor-expert-r2')."""
  r = config.recursion
  if r.strategy == "none":
    return "vanilla"
  if config.mor.enable:
    return f"mor-{config.mor.type}-r{int(r.num_recursions)}"
  return f"{r.strategy}-r{int(r.num_recursions)}"


def run_name(config) -> str:
  """`config.name` with `{model}` replaced by the model's description ('shakespeare-{model}' ->
  'shakespeare-vanilla' for a run with recursion.strategy=none)."""
  return str(config.name).replace(MODEL_PLACEHOLDER, describe_model(config))
