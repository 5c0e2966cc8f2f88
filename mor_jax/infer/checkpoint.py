"""Restore a trained model for inference: parameters only, onto the devices present.

`restore(path, step=None, config=None)` accepts a training workdir
(WORKDIR/checkpoints/<step>/...), the checkpoints directory itself, or one
step's directory. It reads the newest step (or `step`), takes the config
from the checkpoint's metadata (or checks the given one against it), and
restores only `params` (and the token-choice `router_bias`) from the train
state - optimizer state and data-iterator state stay on disk - with target
shardings for this process's devices, so a checkpoint written on 4 devices
restores on 1 CPU.

The layout constants below mirror mor_jax/train/checkpoint.py (one Orbax
CheckpointManager, items 'state' (TrainState), 'data', 'meta' (JSON with
'config' and 'model_config')).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from mor_jax import config as config_lib
from mor_jax.infer.decode import InferenceError

CHECKPOINTS_SUBDIR = "checkpoints"   # WORKDIR/checkpoints/<step>/
STATE_ITEM = "state"                 # the TrainState pytree
META_ITEM = "meta"                   # JSON: config, model_config, history
PARAMS_KEY = "params"                # TrainState fields restored for inference
ROUTER_BIAS_KEY = "router_bias"


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict   # the full config (data section: tokenizer)
  cfg: config_lib.ModelConfig
  variables: dict                     # {'params': ..., ['router_bias': ...]}
  step: int
  directory: str                      # the step's directory
  meta: dict


def _is_step_dir(p: str) -> bool:
  return os.path.basename(os.path.normpath(p)).isdigit() and os.path.isdir(os.path.join(p, STATE_ITEM))


def _steps_in(d: str) -> list[int]:
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit() and _is_step_dir(os.path.join(d, n)))


def find_checkpoints(path: str) -> tuple[str, list[int]]:
  """(directory holding <step>/ folders, available steps) for a workdir, checkpoints dir or step dir."""
  p = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(p):
    raise InferenceError(f"{path} does not exist; pass a training workdir (--workdir) or a checkpoint directory.")
  if _is_step_dir(p):
    return os.path.dirname(p), [int(os.path.basename(p))]
  for d in (os.path.join(p, CHECKPOINTS_SUBDIR), p):
    steps = _steps_in(d)
    if steps:
      return d, steps
  raise InferenceError(f"no checkpoint found under {path}: expected {CHECKPOINTS_SUBDIR}/<step>/{STATE_ITEM} "
                       "(train first: python main.py --mode=train --workdir=...).")


def read_meta(step_dir: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  d = os.path.join(step_dir, META_ITEM)
  if not os.path.isdir(d):
    return {}
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
    return ck.restore(d, args=ocp.args.JsonRestore()) or {}


def _inference_model_config(config: ml_collections.ConfigDict) -> config_lib.ModelConfig:
  """ModelConfig of a config, validated without its train section (batch sizes depend on the devices)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for section in ("train", "parallel"):
    if section in c:
      del c[section]
  return config_lib.model_config(config_lib.validate(c))


# ModelConfig fields that fix the parameter tree or the function the parameters compute
_MODEL_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "tie_embeddings", "scan_layers", "strategy", "num_recursions", "mor_enable", "mor_type",
                 "router_type", "router_func", "balancing", "kv_sharing", "rope_theta", "rms_eps", "alpha",
                 "temperature", "gating")


def _check_same_model(cfg: config_lib.ModelConfig, saved: dict, where: str) -> None:
  norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
  diff = [f"{k}: checkpoint {saved[k]!r} vs config {getattr(cfg, k)!r}" for k in _MODEL_FIELDS
          if k in saved and norm(saved[k]) != norm(getattr(cfg, k))]
  if diff:
    raise InferenceError(f"the config does not describe the model in {where} (" + "; ".join(diff) +
                         "). Leave --config out to use the checkpoint's own config, or pass the config it was trained with.")


def default_sharding():
  """Everything on this process's first device (inference of one batch runs on one chip)."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def restore(path: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None,
            sharding: jax.sharding.Sharding | None = None) -> Restored:
  """Parameters (and config) of the newest or the given step; see the module docstring."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import abstract_variables  # pylint: disable=g-import-not-at-top
  ckpt_dir, steps = find_checkpoints(path)
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise InferenceError(f"no checkpoint of step {step} in {ckpt_dir}; available steps: {steps}.")
  step_dir = os.path.join(ckpt_dir, str(step))
  meta = read_meta(step_dir)
  if config is None:
    if "config" not in meta:
      raise InferenceError(f"the checkpoint {step_dir} stores no config; pass the training config (--config).")
    config = ml_collections.ConfigDict(meta["config"])
  cfg = _inference_model_config(config)
  if "model_config" in meta:
    _check_same_model(cfg, meta["model_config"], step_dir)

  sharding = sharding or default_sharding()
  abstract = abstract_variables(cfg)
  target = {PARAMS_KEY: abstract["params"]}
  if "router_bias" in abstract:
    target[ROUTER_BIAS_KEY] = abstract["router_bias"]
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with ocp.PyTreeCheckpointer() as ck:
      got = ck.restore(os.path.join(step_dir, STATE_ITEM),
                       args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError) as e:
    raise InferenceError(f"cannot restore the parameters of {step_dir} for this model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300] if str(e) else ''}). Was it written with this config?") from e
  variables = {"params": got[PARAMS_KEY]}
  if ROUTER_BIAS_KEY in target:
    variables["router_bias"] = got[ROUTER_BIAS_KEY]
  _check_shapes(abstract, variables, step_dir)
  return Restored(config=config, cfg=cfg, variables=variables, step=int(step), directory=step_dir, meta=meta)


def _check_shapes(abstract, variables, where):
  exp = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), {k: abstract[k] for k in variables})
  got = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables)
  if exp != got:
    raise InferenceError(f"the parameters in {where} do not have the shapes this config implies.")


def load_tokenizer(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig | None = None):
  """The tokenizer stored with the data of `config` (never trains one), vocabulary-checked against the model."""
  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  path = data_lib.tokenizer_path_for(config)
  if not os.path.isfile(path):
    raise InferenceError(f"the tokenizer of this model is not at {path}. Prepare the data first "
                         "(python main.py --mode=prepare --config=...) or set config.data.tokenizer_path.")
  d = config.data
  tok = tokenizer_lib.load_tokenizer(path, eos_token=d.get("eos_token", ""), bos_token=d.get("bos_token", ""))
  vocab = cfg.vocab_size if cfg is not None else int(config.model.vocab_size)
  if tok.vocab_size != vocab:
    raise InferenceError(f"tokenizer/vocabulary mismatch: {path} has {tok.vocab_size} tokens but the model's "
                         f"vocabulary is {vocab}. Use the tokenizer the model was trained with.")
  return tok


def describe(r: Restored) -> str:
  c = r.cfg
  kind = "vanilla" if c.strategy == "none" else (
      f"{c.strategy} R={c.recursions}" + (f" MoR {c.mor_type}-choice" if c.mor_enable else "") +
      (" + KV sharing" if c.kv_sharing else ""))
  n = sum(int(x.size) for x in jax.tree.leaves(r.variables["params"]))
  return f"{r.config.get('name', '')} ({kind}, {n:,} parameters) step {r.step} from {r.directory}"
