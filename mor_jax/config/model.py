"""The frozen `ModelConfig`: the model's architecture, generated from the schema's `arch` fields.

It is what the model is built from and what a checkpoint records. How a
backend runs the model (compute dtype, kernels, batch groups, loss chunks,
scan unroll, rematerialisation) is not part of it: see kernels/policy.py.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from mor_jax.config import schema


class _Architecture:
  """Derived values of the architecture (the fields come from schema.ARCH_FIELDS)."""

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def has_middle(self) -> bool:
    """True when the first and last layers are unique (middle_* strategies)."""
    return self.strategy.startswith("middle_")

  @property
  def base_depth(self) -> int:
    """Layers in the shared block (all L layers for vanilla)."""
    if self.strategy == "none":
      return self.num_layers
    body = self.num_layers - (2 if self.has_middle else 0)
    return body // self.num_recursions

  @property
  def recursions(self) -> int:
    return 1 if self.strategy == "none" else self.num_recursions

  @property
  def selected_fractions(self) -> tuple[float, ...]:
    """Expert-choice: fraction of the tokens selected at each recursion (mor.capacity_fractions or (R - r) / R)."""
    if self.capacity_fractions:
      return tuple(self.capacity_fractions)
    r = self.recursions
    return tuple((r - i) / r for i in range(r))

  def selected_tokens(self, seq_len: int) -> tuple[int, ...]:
    """Expert-choice: tokens selected at each recursion, k_r = max(1, floor(fraction_r * T))."""
    return tuple(max(1, int(math.floor(c * seq_len + 1e-9))) for c in self.selected_fractions)


def _field(f: schema.Field):
  kind = type(f.default)
  return f.arch_name, kind, dataclasses.field(default=f.default)


ModelConfig = dataclasses.make_dataclass(
    "ModelConfig", [_field(f) for f in schema.ARCH_FIELDS], bases=(_Architecture,), frozen=True,
    namespace={"__doc__": "The model's architecture, frozen (hashable, so usable as a static arg); fields: "
               + ", ".join(f.arch_name for f in schema.ARCH_FIELDS) + "."})
ModelConfig.__module__ = "mor_jax.config"


def _cast(f: schema.Field, value):
  if isinstance(f.default, tuple):
    return tuple(float(x) for x in value)
  return type(f.default)(value)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  """The frozen ModelConfig of a validated config."""
  values = {}
  for f in schema.ARCH_FIELDS:
    section, name = f.key.split(".")
    values[f.arch_name] = _cast(f, config[section][name])
  return ModelConfig(**values)


def architecture_dict(cfg: ModelConfig) -> dict:
  """JSON-friendly {field: value} of a ModelConfig (what a checkpoint's metadata records)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
