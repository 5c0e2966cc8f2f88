"""What a checkpoint's `meta` item records, and whether a config may resume from it.

meta (JSON), version 2:
  version, name
  architecture      `dataclasses.asdict(model_config(config))` without execution settings (how this backend
                    runs the model: attention kernel, batch groups, loss chunks, scan unroll, remat)
  config            the full config of the run that wrote the step
  state_signature   {leaf path: [shape, dtype]} of the whole train state (params, optimizer state, ...)
  history, val_history, training_time_seconds, checkpoints_written, runs   (the trainer's run record)
Version 1 (older checkpoints) has `model_config` (with execution settings) instead of `architecture`, and
no signature: both still restore; keys the current config no longer has are ignored.

A mismatch is not a corruption: `check_compatible` raises CheckpointMismatchError listing the fields that
differ. Architecture fields and the fields that alter the optimisation trajectory (TRAJECTORY_KEYS: the
schedule, its length, the batch, the optimizer, the seeds) may be accepted with `train.allow_changes`; the
state-tree signature must match. `config_changes` lists every field of the config that differs (for the log).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Iterable

import jax

from mor_jax import config as config_lib
from mor_jax.checkpoint.layout import CheckpointMismatchError

META_VERSION = 2
# ModelConfig fields that say how a backend runs the model, not what the model is (never compared)
EXECUTION_FIELDS = frozenset({"remat_policy", "scan_unroll", "batch_groups", "loss_chunk_tokens", "attention_impl",
                              "fused_norm", "fused_norms", "dtype"})
# fields that only shape training (or a default an inference command overrides): not compared for inference
TRAINING_ONLY_FIELDS = frozenset({"init_std", "aux_coeff", "z_coeff", "z_loss", "bal_coeff", "bal_update_rate",
                                  "bal_warmup_steps", "cap_warmup_steps", "expert_router_loss", "max_seq_len",
                                  "threshold"})
# config keys that change the optimisation trajectory of a resumed run (refused unless in train.allow_changes)
TRAJECTORY_KEYS = ("train.num_steps", "train.total_batch_size", "train.learning_rate", "train.schedule",
                   "train.warmup_steps", "train.min_lr_ratio", "train.decay_fraction", "train.beta1", "train.beta2",
                   "train.eps", "train.weight_decay", "train.grad_clip", "train.seed", "data.seq_len",
                   "data.shuffle_seed", "data.corpus", "data.path", "data.add_bos", "data.document_mask")
# config keys never reported as changes (they say how to resume, not what the run is)
_UNREPORTED_KEYS = frozenset({"train.allow_changes"})


def _jsonable(value):
  return json.loads(json.dumps(value))


def architecture(config) -> dict:
  """The model's architecture (what a checkpoint records) of a validated config."""
  cfg = config_lib.model_config(config)
  to_dict = getattr(config_lib, "architecture_dict", dataclasses.asdict)
  return _jsonable({k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_FIELDS})


def saved_architecture(meta: dict) -> dict:
  """The architecture a step's meta records (version 2 `architecture` or version 1 `model_config`, whose old
  field names are read under the current ones and whose execution settings are dropped)."""
  arch = dict(meta.get("architecture", meta.get("model_config")) or {})
  upgrade = getattr(config_lib, "upgrade_architecture", None)
  if upgrade is not None:
    arch = upgrade(arch)
  return {k: v for k, v in arch.items() if k not in EXECUTION_FIELDS}


def config_key(field: str) -> str:
  """The config key ('section.name') of an architecture field (the field itself if unknown)."""
  fields = getattr(getattr(config_lib, "schema", None), "ARCH_FIELDS", ())
  return next((f.key for f in fields if f.arch_name == field), field)


def signature(tree) -> dict:
  """{leaf path: [shape, dtype]} of every array leaf (concrete or abstract) of `tree`."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)] for path, leaf in leaves}


def new_meta(config, abstract_state, validated=None) -> dict:
  """The meta of a fresh run (empty history); see `describe`."""
  return {"version": META_VERSION, "name": str(config.name),
          "history": {"step": [], "loss": [], "learning_rate": []}, "val_history": [],
          "training_time_seconds": 0.0, "checkpoints_written": [], "runs": [],
          **describe(config, abstract_state, validated)}


def describe(config, abstract_state, validated=None) -> dict:
  """The meta keys that say what the state is: version, architecture (of `validated`, default `config`),
  the full `config` and the state signature."""
  return {"version": META_VERSION, "architecture": architecture(validated if validated is not None else config),
          "config": json.loads(config.to_json_best_effort()), "state_signature": signature(abstract_state)}


def allowed_changes(config) -> tuple[str, ...]:
  """`train.allow_changes` as given: config keys ('mor.rand_router') or fields; a string 'a,b' is split."""
  train = config.get("train", None) if hasattr(config, "get") else None
  value = train.get("allow_changes", ()) if train is not None else ()
  if isinstance(value, str):
    value = value.split(",")
  return tuple(str(v).strip() for v in (value or ()) if str(v).strip())


def architecture_diff(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
  """{field: (checkpoint value, config value)} for the fields both record and that differ."""
  return {k: (saved[k], current[k]) for k in sorted(current) if k in saved and _norm(saved[k]) != _norm(current[k])}


def _flatten(tree, prefix: str = "") -> dict:
  out = {}
  for k, v in (tree or {}).items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_changes(meta: dict, config) -> dict[str, tuple[Any, Any]]:
  """{config key: (checkpoint value, config value)} for every field the checkpoint's config records that the
  current config sets to another value (empty for metas without a config)."""
  if not meta.get("config"):
    return {}
  saved = _flatten(meta["config"])
  current = _flatten(json.loads(config.to_json_best_effort()))
  return {k: (saved[k], current[k]) for k in sorted(current)
          if k in saved and k not in _UNREPORTED_KEYS and _norm(saved[k]) != _norm(current[k])}


def change_lines(changes: dict[str, tuple[Any, Any]]) -> list[str]:
  """One 'key: old -> new' line per changed field."""
  return [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()]


def _norm(v):
  if isinstance(v, (tuple, list)):
    return [_norm(x) for x in v]
  return v


def signature_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
  """Lines naming each leaf that is missing, new or of another shape/dtype.

  With a `prefix` ('.params'), only the saved leaves under it count, compared (prefix removed) with
  `current`, the signature of that subtree.
  """
  saved = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
  out = [f"{k}: only in the checkpoint" for k in sorted(set(saved) - set(current))]
  out += [f"{k}: only in the config's model" for k in sorted(set(current) - set(saved))]
  out += [f"{k}: checkpoint {_fmt(saved[k])} vs config {_fmt(current[k])}" for k in sorted(set(saved) & set(current))
          if _norm(saved[k]) != _norm(current[k])]
  return out


def _fmt(sig) -> str:
  return f"{sig[1]}{list(sig[0])}"


def check_compatible(meta: dict, config, abstract_tree, *, where: str, allow: Iterable[str] = (),
                     prefix: str = "", command: str = "train") -> list[str]:
  """Raises CheckpointMismatchError unless `config` (and its state tree) may restore the step `meta` describes.

  Returns the architecture fields that differ but are allowed (the caller warns about them).
  `abstract_tree` is the state the config makes (or, with `prefix` '.params', its params only).
  """
  diff = architecture_diff(saved_architecture(meta), architecture(config))
  if command != "train":
    diff = {k: v for k, v in diff.items() if k not in TRAINING_ONLY_FIELDS}
  else:
    diff.update({k: v for k, v in config_changes(meta, config).items() if k in TRAJECTORY_KEYS})
  allow = set(allow)
  refused = {k: v for k, v in diff.items() if k not in allow and config_key(k) not in allow}
  sig_lines = []
  if "state_signature" in meta:
    sig_lines = signature_diff(meta["state_signature"], signature(abstract_tree), prefix)
  if not refused and not sig_lines:
    return sorted(diff)
  parts = [f"{config_key(k)}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in refused.items()]
  trajectory = [k for k in refused if k in TRAJECTORY_KEYS]
  msg = (f"the checkpoints in {where} were written for a different model than the config describes"
         if len(trajectory) < len(refused) or sig_lines else
         f"the config changes how the run in {where} trains (its optimisation trajectory)")
  msg += (" (" + "; ".join(parts) + ")") if parts else ""
  if sig_lines:
    shown = sig_lines[:8] + ([f"... {len(sig_lines) - 8} more"] if len(sig_lines) > 8 else [])
    msg += (f"; its saved state tree differs in {len(sig_lines)} leaves (" + "; ".join(shown) + ")")
  if command == "train":
    if sig_lines:
      msg += (". The state tree cannot be changed on resume: use a new --workdir for this config, or the config "
              "that wrote these checkpoints. Nothing was changed in the workdir.")
    else:
      msg += (". Use a new --workdir for this config, or, if these changes are safe for this run, pass "
              f"--config.train.allow_changes={','.join(config_key(k) for k in refused)}")
      if trajectory:
        msg += (" (to extend a run, train with train.schedule='wsd', whose stable phase a larger train.num_steps "
                "lengthens; see 'Extending or changing a run' in docs/run-safety.md)")
      msg += ". Nothing was changed in the workdir."
  else:
    msg += ". Leave --config out to use the checkpoint's own config, or pass the config it was trained with."
  raise CheckpointMismatchError(msg)


def tokenizer_record(directory: str, relative_to: str) -> dict:
  """meta's `tokenizer` key for the tokenizer stored in `directory` (WORKDIR/tokenizer/): {'tokenizer': {path
  (relative to the workdir), vocab_size, sha256 of tokenizer.json}}; {} when it holds no tokenizer.json."""
  import hashlib  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  file = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(file):
    return {}
  with open(file, "rb") as f:
    blob = f.read()
  try:
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    vocab = int(Tokenizer.from_str(blob.decode("utf-8")).get_vocab_size(with_added_tokens=True))
  except Exception:  # pylint: disable=broad-except (an unreadable tokenizer is recorded without its size)
    vocab = None
  return {"tokenizer": {"path": os.path.relpath(directory, relative_to), "vocab_size": vocab,
                        "sha256": hashlib.sha256(blob).hexdigest()}}
