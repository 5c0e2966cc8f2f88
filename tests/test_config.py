"""mor_jax.config: the written-out ModelConfig agrees with the schema's architecture fields."""

import dataclasses
import typing

from mor_jax import config as C
from mor_jax.config import model as model_lib
from mor_jax.config import schema


def test_model_config_fields_are_the_schemas_arch_fields_in_order_and_type():
  fields = dataclasses.fields(C.ModelConfig)
  assert [f.name for f in fields] == [f.arch_name for f in schema.ARCH_FIELDS]
  hints = typing.get_type_hints(C.ModelConfig)
  for f in schema.ARCH_FIELDS:
    want = tuple if isinstance(f.default, tuple) else type(f.default)
    assert typing.get_origin(hints[f.arch_name]) is tuple if want is tuple else hints[f.arch_name] is want, f.key
  assert all(f.default is dataclasses.MISSING for f in fields)          # defaults live in the schema only
  assert C.ModelConfig.__dataclass_params__.frozen


def test_model_config_of_the_defaults_carries_every_default(tiny):
  c = tiny("cycle", 2, "expert")
  cfg = C.model_config(C.validate(c, num_devices=1))
  for f in schema.ARCH_FIELDS:
    section, name = f.key.split(".")
    assert getattr(cfg, f.arch_name) == model_lib._cast(f, c[section][name]), f.key   # noqa: SLF001
  assert cfg.recursions == 2 and cfg.base_depth == 1 and hash(cfg) == hash(dataclasses.replace(cfg))
