"""Params-only restore for inference: the parameters of a step onto the devices present.

`restore_params(path, step=None, config=None)` accepts a training workdir (WORKDIR/checkpoints/<step>/...),
the checkpoints directory itself, or one step's directory. It reads the newest step (or `step`), takes the
config from the step's meta (or checks the given one against it: schema.check_compatible), verifies the
step's checksums when it has them, and restores only `params` (and the token-choice `router_bias`) from the
train state - optimizer and data-iterator state stay on disk - onto `sharding`, so a checkpoint written on
4 devices restores on 1 CPU.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import ml_collections

from mor_jax import files as files_lib
from mor_jax import config as config_lib
from mor_jax.checkpoint import integrity
from mor_jax.checkpoint import schema
from mor_jax.checkpoint.layout import (META_ITEM, STATE_ITEM, CheckpointCorruptError, CheckpointError,
                                       find_checkpoints)

PARAMS_KEY = "params"                # TrainState fields restored for inference
ROUTER_BIAS_KEY = "router_bias"


@dataclasses.dataclass
class ParamsRestore:
  """The parameters of one step, with the config that describes them."""
  config: ml_collections.ConfigDict   # the full config, validated (`carried_config`; data section: tokenizer)
  cfg: config_lib.ModelConfig
  variables: dict                     # {'params': ..., ['router_bias': ...]}
  step: int
  directory: str                      # the step's directory
  meta: dict


def read_meta(step_dir: str) -> dict:
  """The `meta` item of a step directory ({} if it has none)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  d = os.path.join(step_dir, META_ITEM)
  if not os.path.isdir(d):
    return {}
  with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ck:
    return ck.restore(d, args=ocp.args.JsonRestore()) or {}


def inference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` validated without its train and parallel sections (batch sizes depend on the devices)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for section in ("train", "parallel"):
    if section in c:
      del c[section]
  return config_lib.validate(c)


def carried_config(config: ml_collections.ConfigDict, checked=None) -> ml_collections.ConfigDict:
  """The config inference carries: `inference_config(config)` with the train and parallel sections back as stored
  over the schema's defaults (every field present; they describe the run that wrote the checkpoint, so they are
  not checked against this machine's devices)."""
  carried = (checked if checked is not None else inference_config(config)).to_dict()
  defaults = config_lib.defaults().to_dict()
  for section in ("train", "parallel"):
    stored = config.get(section) or {}
    carried[section] = {**defaults[section], **{k: v for k, v in dict(stored).items() if k in defaults[section]}}
  return ml_collections.ConfigDict(carried)


def default_sharding():
  """Everything on this process's first device (inference of one batch runs on one chip)."""
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _pick_step(path: str, step: int | None) -> str:
  ckpt_dir, steps = find_checkpoints(path)
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"no checkpoint of step {step} in {ckpt_dir}; available steps: {steps}.")
  return os.path.join(ckpt_dir, str(step))


def restore_params(path: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None,
                   sharding: jax.sharding.Sharding | None = None) -> ParamsRestore:
  """Parameters (and config) of the newest or the given step; see the module docstring."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import abstract_variables  # pylint: disable=g-import-not-at-top
  step_dir = _pick_step(path, step)
  if integrity.has_manifest(step_dir):
    integrity.verify_manifest(step_dir)
  meta = read_meta(step_dir)
  if config is None:
    if "config" not in meta:
      raise CheckpointError(f"the checkpoint {step_dir} stores no config; pass the training config (--config).")
    config = ml_collections.ConfigDict(meta["config"])
  checked = inference_config(config)
  validated = carried_config(config, checked)
  cfg = config_lib.model_config(checked)
  abstract = abstract_variables(cfg)
  schema.check_compatible(meta, checked, abstract["params"], where=step_dir, prefix=".params", command="infer")
  target = {k: abstract[k] for k in (PARAMS_KEY, ROUTER_BIAS_KEY) if k in abstract}
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or default_sharding()),
                        target)
  try:
    with ocp.PyTreeCheckpointer() as ck:
      got = ck.restore(os.path.join(step_dir, STATE_ITEM),
                       args=ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                                   restore_args=ocp.checkpoint_utils.construct_restore_args(target)))
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"cannot restore the parameters of {step_dir} for this model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300] if str(e) else ''}). Was it written with this config?") from e
  variables = {k: got[k] for k in target}
  exp = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), {k: abstract[k] for k in variables})
  if exp != jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables):
    raise CheckpointError(f"the parameters in {step_dir} do not have the shapes this config implies.")
  bad = integrity.nonfinite_leaves(variables)
  if bad:
    raise CheckpointCorruptError(f"{os.path.join(step_dir, STATE_ITEM)} holds non-finite values in "
                                 f"{', '.join(bad[:4])}", os.path.join(step_dir, STATE_ITEM))
  return ParamsRestore(config=validated, cfg=cfg, variables=variables, step=int(os.path.basename(step_dir)),
                       directory=step_dir, meta=meta)


# ------------------------------------------------------------------ the stored config
def workdir_config(workdir: str, step: int | None = None, *, with_run: bool = True):
  """The config stored with W's newest (or `step`'s) checkpoint, as (step directory, ConfigDict); without
  `with_run`, only the model (the run's train / parallel sections dropped), else the run's batch settings with
  accumulation derived again for this machine's devices. Raises CheckpointError naming what is missing."""
  ckpt_dir, steps = find_checkpoints(workdir)
  if step is not None and step not in steps:
    raise CheckpointError(f"--step={step}: no checkpoint of that step in {ckpt_dir}; available steps: {steps}.")
  step_dir = os.path.join(ckpt_dir, str(steps[-1] if step is None else step))
  meta = read_meta(step_dir)
  if "config" not in meta:
    raise CheckpointError(f"the checkpoint {step_dir} stores no config; pass the model's config with --config.")
  config = ml_collections.ConfigDict(meta["config"])
  for section in ("train", "parallel"):    # batch sizes of the run that wrote it: not part of the model
    if section in config and not with_run:
      del config[section]
  if with_run and "train" in config:
    config.train.grad_accum_steps = -1
  return step_dir, config


def workdir_summary(workdir: str, step: int | None = None) -> str:
  """`--mode=info --workdir=W` without --config: the summary of the config stored with W's newest (or `step`'s)
  checkpoint, e.g. an imported model's. Raises CheckpointError (a ValueError) naming what is missing."""
  from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top (jax, flax)
  step_dir, config = workdir_config(workdir, step, with_run=False)
  return f"checkpoint: step {os.path.basename(step_dir)} of {os.path.dirname(step_dir)}\n" + accounting.summary(config)


# ------------------------------------------------------------------ the workdir's tokenizer
TOKENIZER_SUBDIR = "tokenizer"       # WORKDIR/tokenizer/: the model's tokenizer (the GGUF import's layout too)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "mor_tokenizer.json")


def store_tokenizer(workdir: str, source: str | None = None, *, config: ml_collections.ConfigDict | None = None,
                    write: bool = True) -> dict:
  """Copies the tokenizer at `source` (a tokenizer.json or a folder with one; default: the one `config`'s data
  uses) into WORKDIR/tokenizer/ and returns meta's tokenizer record (`schema.tokenizer_record`).

  Nothing is copied when the source has no tokenizer.json or is that folder already; the record then describes
  what WORKDIR/tokenizer/ holds ({} if nothing). `write=False` (other processes) only reads. Chat data with a
  named template (data.chat_template=chatml) also writes that template into WORKDIR/tokenizer/'s
  tokenizer_config.json, where --chat and serving read it.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  dst = os.path.join(workdir, TOKENIZER_SUBDIR)
  if source is None and config is not None and "data" in config:
    from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
    try:
      source = data_lib.tokenizer_path_for(config)
    except Exception:  # pylint: disable=broad-except (no corpus / data dir: nothing to copy)
      source = None
  if source:
    source = os.path.abspath(os.path.expanduser(source))
    folder = source if os.path.isdir(source) else os.path.dirname(source)
    file = os.path.join(source, "tokenizer.json") if os.path.isdir(source) else source
    if write and os.path.isfile(file) and folder != dst and _may_write(file, dst):
      os.makedirs(dst, exist_ok=True)
      for name in TOKENIZER_FILES:
        src = file if name == "tokenizer.json" else os.path.join(folder, name)
        if os.path.isfile(src):          # atomically: a reader never sees half a file
          files_lib.copy_file(src, os.path.join(dst, name))
    if write and config is not None and os.path.isfile(file) and _same_file(file, os.path.join(dst, "tokenizer.json")):
      _store_chat_template(dst, config)
  return schema.tokenizer_record(dst, workdir)


def _same_file(a: str, b: str) -> bool:
  if not os.path.isfile(b):
    return False
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def _store_chat_template(dst: str, config) -> None:
  """The named chat template of chat data (with the EOS/BOS it renders) into dst/tokenizer_config.json."""
  import json  # pylint: disable=g-import-not-at-top
  d = config.data
  if d.corpus != "chat" or not d.chat_template:
    return
  from mor_jax.data import chat_records  # pylint: disable=g-import-not-at-top
  from mor_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  template = chat_records.NAMED_TEMPLATES.get(d.chat_template)
  if template is None:
    return
  tok = tokenizer_lib.load_tokenizer(dst, eos_token=d.eos_token, bos_token=d.bos_token)
  file = os.path.join(dst, "tokenizer_config.json")
  settings = {}
  if os.path.isfile(file):
    with open(file, encoding="utf-8") as f:
      settings = json.load(f)
  new = {**settings, "chat_template": template, "eos_token": tok.eos_token}
  if tok.bos_token:
    new["bos_token"] = tok.bos_token
  if new != settings:                    # atomically: a reader never sees half a file
    files_lib.write_json(file, new)


def _may_write(file: str, dst: str) -> bool:
  """False when WORKDIR/tokenizer/ already holds a different tokenizer: the workdir's model keeps its own."""
  old = os.path.join(dst, "tokenizer.json")
  if not os.path.isfile(old):
    return True
  with open(file, "rb") as a, open(old, "rb") as b:
    if a.read() == b.read():
      return False                       # the same tokenizer: nothing to copy
  _check_readable(old, file)
  logging.warning("%s already holds a different tokenizer than %s; keeping the workdir's (pass --tokenizer=PATH "
                  "to generate or eval to use another one).", dst, file)
  return False


def _check_readable(old: str, source: str) -> None:
  """Refuses (one line, nothing changed) a workdir tokenizer that does not load: generate and serve would fail on
  it later. The user's files are kept; the line says how to take the config's tokenizer instead."""
  try:
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    Tokenizer.from_file(old)
  except Exception as e:  # pylint: disable=broad-except (any reason it does not load)
    reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    raise CheckpointError(f"{old} is not a readable tokenizer ({reason}); nothing was changed. Fix: restore it, or "
                          f"move {os.path.dirname(old)} away to copy the config's tokenizer ({source}) "
                          "into the workdir again.") from None


def tokenizer_folder(workdir: str) -> str | None:
  """WORKDIR/tokenizer/, if it holds a tokenizer.json."""
  folder = os.path.join(os.path.abspath(os.path.expanduser(workdir)), TOKENIZER_SUBDIR)
  return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def workdir_tokenizer(step_dir: str) -> str | None:
  """WORKDIR/tokenizer/ of the workdir that holds `step_dir` (WORKDIR/checkpoints/<step>), if it has one."""
  return tokenizer_folder(os.path.dirname(os.path.dirname(os.path.abspath(step_dir))))
