"""The config: one schema (schema.py), validation and derived values (validate.py), renamed keys (upgrade.py)
and the frozen architecture the model is built from (model.py). Jax-free.

  from mor_jax import config as C
  c = C.validate(C.defaults())       # a ConfigDict; raises C.ConfigError naming the field and the fix
  cfg = C.model_config(c)            # the frozen C.ModelConfig (architecture only)

How a backend runs the model (the `execution` section) is resolved by mor_jax.kernels.policy.
"""

from mor_jax.config.model import ModelConfig, architecture_dict, model_config
from mor_jax.config.naming import describe_model, run_name
from mor_jax.config.schema import (ATTENTION_IMPLS, FIELDS, INIT_STRATEGIES, REMAT_POLICIES, STRATEGIES, Field,
                                   defaults, get_field)
from mor_jax.config.upgrade import upgrade, upgrade_architecture
from mor_jax.config.validate import resolve_mesh_shape, validate
from mor_jax.errors import ConfigError

get_config = defaults   # the name config files use

__all__ = ["ATTENTION_IMPLS", "FIELDS", "INIT_STRATEGIES", "REMAT_POLICIES", "STRATEGIES", "ConfigError", "Field",
           "ModelConfig", "architecture_dict", "defaults", "describe_model", "get_config", "get_field", "model_config",
           "resolve_mesh_shape", "run_name", "upgrade", "upgrade_architecture", "validate"]
