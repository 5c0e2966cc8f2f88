"""Renamed config keys: old names (in users' files and old checkpoints' metadata) -> the schema's names.

`upgrade(config_dict)` rewrites a nested config dict (a ConfigDict's `to_dict()`, or the config a checkpoint's
metadata recorded) to the current names, logging one line per old key it meets. `upgrade_architecture(flat)`
does the same for the flat `ModelConfig` dict that old checkpoints recorded (and drops the execution knobs
that no longer belong to the architecture).
"""

from __future__ import annotations

import copy

from absl import logging

# old key -> new key (nested config). Values that changed name too are in VALUE_RENAMES.
RENAMED = {
    "mor.capacity": "mor.capacity_fractions",
    "mor.capacity_factor": "mor.token_buffer_fraction",
    "mor.temperature": "mor.router_temperature",
    "mor.sampling": "mor.expert_router_loss",
    "model.dtype": "execution.dtype",
    "model.remat_policy": "execution.remat_policy",
    "model.scan_unroll": "execution.scan_unroll",
    "model.batch_groups": "execution.batch_groups",
    "model.loss_chunk_tokens": "execution.loss_chunk_tokens",
    "model.attention_impl": "execution.attention_impl",
    "train.eval_batches": "train.eval_sequences",   # converted by validate (batches -> sequences)
}
VALUE_RENAMES = {"mor.expert_router_loss": {"aux_loss": "bce"}}

# old flat ModelConfig field -> new flat field (None: an execution knob, no longer part of the architecture)
ARCH_RENAMED = {
    "capacity": "capacity_fractions", "capacity_factor": "token_buffer_fraction",
    "temperature": "router_temperature", "sampling": "expert_router_loss",
    "dtype": None, "remat_policy": None, "scan_unroll": None, "batch_groups": None, "loss_chunk_tokens": None,
    "attention_impl": None,
}


def _rename_value(new_key: str, value):
  return VALUE_RENAMES.get(new_key, {}).get(value, value) if isinstance(value, str) else value


def upgrade(config_dict: dict, *, quiet: bool = False) -> dict:
  """A copy of the nested `config_dict` with old keys moved to their new names (see RENAMED).

  An old key's value wins over the new key's: a file that sets an old key starts from defaults that already
  hold the new one.
  """
  out = copy.deepcopy(dict(config_dict))
  for old, new in RENAMED.items():
    old_sec, old_name = old.split(".")
    new_sec, new_name = new.split(".")
    section = out.get(old_sec)
    if not isinstance(section, dict) or old_name not in section or old == "train.eval_batches":
      continue
    value = section.pop(old_name)
    if value is None:   # an unset placeholder (schema.defaults)
      continue
    value = _rename_value(new, value)
    target = out.setdefault(new_sec, {})
    if not quiet:
      logging.warning("config.%s is deprecated: renamed to config.%s (value %r carried over).", old, new, value)
    target[new_name] = value
  return out


def upgrade_architecture(flat: dict, *, quiet: bool = True) -> dict:
  """A copy of an old checkpoint's flat ModelConfig dict under the current field names, execution knobs dropped."""
  out = {}
  for key, value in flat.items():
    new = ARCH_RENAMED.get(key, key)
    if new is None:
      continue
    if new != key and not quiet:
      logging.warning("checkpoint model_config.%s is an old name: read as %s.", key, new)
    out[new] = {"aux_loss": "bce"}.get(value, value) if new == "expert_router_loss" else value
  return out
