"""The frozen `ModelConfig`: the model's architecture, the schema's `arch` fields written out.

It is what the model is built from and what a checkpoint records. How a
backend runs the model (compute dtype, kernels, batch groups, loss chunks,
scan unroll, rematerialisation) is not part of it: see kernels/policy.py.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from mor_jax.config import schema


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's architecture, frozen (hashable, so usable as a static argument).

  One field per schema field marked `arch` (schema.ARCH_FIELDS, under its architecture name; the comment names the
  config field). No defaults here: `model_config(config)` fills every field from a validated config, whose defaults
  are the schema's (tests/test_config.py checks that the two lists agree).
  """
  vocab_size: int                     # model.vocab_size
  hidden_size: int                    # model.hidden_size
  intermediate_size: int              # model.intermediate_size
  num_layers: int                     # model.num_layers
  num_heads: int                      # model.num_heads
  num_kv_heads: int                   # model.num_kv_heads
  rope_theta: float                   # model.rope_theta
  rms_eps: float                      # model.rms_eps
  max_seq_len: int                    # model.max_seq_len
  tie_embeddings: bool                # model.tie_embeddings
  init_std: float                     # model.init_std
  scan_layers: bool                   # model.scan_layers
  strategy: str                       # recursion.strategy
  num_recursions: int                 # recursion.num_recursions
  mor_enable: bool                    # mor.enable
  mor_type: str                       # mor.type
  router_type: str                    # mor.router_type
  router_func: str                    # mor.router_func
  alpha: float                        # mor.alpha
  router_temperature: float           # mor.router_temperature
  rand_router: bool                   # mor.rand_router
  z_loss: bool                        # mor.z_loss
  z_coeff: float                      # mor.z_coeff
  gating: str                         # mor.gating
  capacity_fractions: tuple[float, ...]   # mor.capacity_fractions
  expert_router_loss: str             # mor.expert_router_loss
  aux_coeff: float                    # mor.aux_coeff
  cap_warmup_steps: int               # mor.cap_warmup_steps
  balancing: str                      # mor.balancing
  bal_coeff: float                    # mor.bal_coeff
  bal_update_rate: float              # mor.bal_update_rate
  bal_warmup_steps: int               # mor.bal_warmup_steps
  token_buffer_fraction: float        # mor.token_buffer_fraction
  threshold: float                    # mor.threshold
  kv_sharing: bool                    # kv_sharing.enable

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
