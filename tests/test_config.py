"""mor_jax.config: the written-out ModelConfig agrees with the schema's architecture fields; every bad value is a
one-line error naming the field; renamed keys keep working."""

import dataclasses
import importlib
import logging
import typing

import pytest

from mor_jax import config as C
from mor_jax.config import model as model_lib
from mor_jax.config import defaults as get_config
from mor_jax.config import schema
from test_model import tiny as arch
from tiny import tiny_config


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


# ----------------------------------------------------------- config errors
@pytest.mark.parametrize("edit,field", [
    (lambda c: c.recursion.update(strategy="middle_cycle", num_recursions=4), "model.num_layers"),
    (lambda c: c.recursion.update(strategy="zigzag"), "recursion.strategy"),
    (lambda c: c.model.update(num_kv_heads=3), "model.num_kv_heads"),
    (lambda c: c.model.update(hidden_size=64, num_heads=3), "model.num_heads"),
    (lambda c: (c.recursion.update(strategy="middle_cycle", num_recursions=2),
                c.mor.update(enable=True, capacity_fractions=(0.5, 1.0))), "mor.capacity_fractions"),
    (lambda c: (c.recursion.update(strategy="middle_cycle", num_recursions=2),
                c.mor.update(enable=True, type="sideways")), "mor.type"),
    (lambda c: (c.recursion.update(strategy="sequence", num_recursions=2), c.mor.update(enable=True)),
     "recursion.strategy"),
    (lambda c: c.kv_sharing.update(enable=True), "kv_sharing.enable"),
    (lambda c: c.execution.update(dtype="float16"), "execution.dtype"),
    (lambda c: c.mor.update(router_temperature=0.0), "mor.router_temperature"),
    (lambda c: c.model.update(rope_theta=float("nan")), "model.rope_theta"),
    (lambda c: c.mor.update(alpha=float("inf")), "mor.alpha"),
    (lambda c: c.data.update(val_fraction=1.0), "data.val_fraction"),
    (lambda c: c.train.update(allow_changes=("learning_rate",)), "train.allow_changes"),
    (lambda c: c.train.update(total_batch_size=30, per_device_batch_size=4), "train.total_batch_size"),
    (lambda c: c.train.update(schedule="linear-ish"), "train.schedule"),
    (lambda c: c.train.update(per_device_batch_size=-1), "train.per_device_batch_size"),
    (lambda c: c.execution.update(memory_budget_gib=-1.0), "execution.memory_budget_gib"),
    (lambda c: c.execution.update(remat_policy="some"), "execution.remat_policy"),
    (lambda c: c.parallel.update(mode="ddp"), "parallel.mode"),
])
def test_bad_config_errors_name_the_field(edit, field):
  c = get_config()
  c.model.update(vocab_size=128, hidden_size=64, intermediate_size=64, num_layers=8, num_heads=4, num_kv_heads=2)
  c.data.seq_len = 16
  edit(c)
  with pytest.raises(C.ConfigError, match=f"^config.{field}: ") as err:
    C.validate(c, num_devices=1)
  assert "\n" not in str(err.value)


def test_layers_not_divisible_suggests_fix():
  c = get_config()
  c.recursion.update(strategy="middle_cycle", num_recursions=4)
  with pytest.raises(C.ConfigError, match=r"num_layers = 30 or 34"):
    C.validate(c, num_devices=1)


def test_gradient_accumulation_is_derived_like_the_reference():
  c = importlib.import_module("configs.smollm360_rec2").get_config(None)
  assert C.validate(c, num_devices=4).train.grad_accum_steps == 128


# ------------------------------------------------------------ config schema
def test_model_config_is_the_architecture_generated_from_the_schema():
  names = {f.name for f in dataclasses.fields(C.ModelConfig)}
  assert names == {f.arch_name for f in C.FIELDS if f.arch}
  assert not names & {"dtype", "remat_policy", "attention_impl", "batch_groups", "loss_chunk_tokens", "scan_unroll"}
  cfg = arch("middle_cycle", 3, "expert", mor__router_temperature=2.0, mor__capacity_fractions=(1.0, 0.5, 0.25))
  assert (cfg.router_temperature, cfg.capacity_fractions, cfg.mor_enable, cfg.strategy) == \
      (2.0, (1.0, 0.5, 0.25), True, "middle_cycle")
  assert cfg.selected_tokens(16) == (16, 8, 4) and arch("middle_cycle", 3, "expert").selected_fractions[1] == 2 / 3
  assert hash(cfg) == hash(dataclasses.replace(cfg))   # frozen, usable as a static argument
  assert set(C.architecture_dict(cfg)) == names


def test_renamed_keys_keep_working_with_a_warning(caplog):
  old = {"mor__capacity": (1.0, 0.5), "mor__capacity_factor": 0.5, "mor__temperature": 2.0,
         "mor__sampling": "none"}
  with caplog.at_level(logging.WARNING):
    cfg = arch("middle_cycle", 2, "expert", **old)
  assert (cfg.capacity_fractions, cfg.token_buffer_fraction, cfg.router_temperature, cfg.expert_router_loss) == \
      ((1.0, 0.5), 0.5, 2.0, "none")
  for o, n in (("capacity", "capacity_fractions"), ("capacity_factor", "token_buffer_fraction"),
               ("temperature", "router_temperature"), ("sampling", "expert_router_loss")):
    assert f"config.mor.{o} is deprecated: renamed to config.mor.{n}" in caplog.text
  # old checkpoint metadata: the nested config and the flat model config
  up = C.upgrade({"model": {"dtype": "bfloat16", "hidden_size": 8}, "mor": {"sampling": "aux_loss"}}, quiet=True)
  assert up == {"model": {"hidden_size": 8}, "execution": {"dtype": "bfloat16"}, "mor": {"expert_router_loss": "bce"}}
  flat = C.upgrade_architecture({"capacity": [1.0], "temperature": 1.0, "sampling": "aux_loss", "dtype": "float32",
                                 "remat_policy": "none", "hidden_size": 8})
  assert flat == {"capacity_fractions": [1.0], "router_temperature": 1.0, "expert_router_loss": "bce", "hidden_size": 8}


def test_eval_batches_becomes_eval_sequences(caplog):
  c = tiny_config(train__per_device_batch_size=2, train__total_batch_size=8)
  c.train.eval_batches = 3
  with caplog.at_level(logging.WARNING):
    v = C.validate(c, num_devices=2)
  assert v.train.eval_sequences == 12 and "eval_batches" not in v.train
  assert "use config.train.eval_sequences" in caplog.text
  assert C.validate(tiny_config(), num_devices=1).train.eval_sequences == 64
  assert C.validate(tiny_config(train__allow_changes=("train.learning_rate",)), 1).train.allow_changes == \
      ("train.learning_rate",)
