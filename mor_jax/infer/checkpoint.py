"""Restore a trained model for inference (a thin layer over mor_jax.checkpoint) and load its tokenizer.

`restore(path, step=None, config=None)` is `mor_jax.checkpoint.restore_params` (params only, onto the
devices present, checksums verified, the config checked against the checkpoint's meta) with its errors
raised as InferenceError, which the generate / eval / export commands report in one line.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as config_lib
from mor_jax import data as data_lib
from mor_jax.checkpoint import ParamsRestore
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.infer.errors import InferenceError


def _as_inference_error(fn):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      return fn(*args, **kwargs)
    except ckpt_lib.CheckpointError as e:
      raise InferenceError(str(e)) from None
  return wrapper


find_checkpoints = _as_inference_error(ckpt_lib.find_checkpoints)


@_as_inference_error
def restore(path: str, *, step: int | None = None, config: ml_collections.ConfigDict | None = None,
            sharding: jax.sharding.Sharding | None = None) -> ParamsRestore:
  """Parameters (and config) of the newest or the given step of a workdir / checkpoints dir / step dir."""
  return ckpt_lib.restore_params(path, step=step, config=config, sharding=sharding)


TOKENIZER_HINT = ("pass --tokenizer=PATH (the model's tokenizer.json or a Hugging Face tokenizer folder, e.g. "
                  "assets/tokenizers/smollm)")


def tokenizer_source(config: ml_collections.ConfigDict, *, directory: str | None = None,
                     override: str | None = None) -> str | None:
  """Where the model's tokenizer is: `override` (--tokenizer), else the workdir's copy (WORKDIR/tokenizer/ of the
  step `directory`), else the stored config's data path; None when none of them holds a tokenizer.json."""
  if override:
    path = os.path.abspath(os.path.expanduser(override))
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise InferenceError(f"--tokenizer={override}: no tokenizer.json there; give the model's tokenizer.json or a "
                           "Hugging Face tokenizer folder holding one (e.g. assets/tokenizers/smollm).")
    return path
  stored = ckpt_params.workdir_tokenizer(directory) if directory else None
  if stored:
    return stored
  try:
    path = data_lib.tokenizer_path_for(config)
  except Exception:  # pylint: disable=broad-except (no corpus / data dir: no stored tokenizer)
    return None
  return path if os.path.isfile(path) else None


def load_tokenizer(config: ml_collections.ConfigDict, cfg: config_lib.ModelConfig | None = None, *,
                   directory: str | None = None, override: str | None = None):
  """The model's tokenizer (see `tokenizer_source`; never trains one), vocabulary-checked against the model."""
  path = tokenizer_source(config, directory=directory, override=override)
  if path is None:
    raise InferenceError("this model has no tokenizer (none in its workdir's tokenizer/ folder, none at its "
                         f"config.data.tokenizer_path): {TOKENIZER_HINT}, or generate from token ids with "
                         "--prompt_ids=1,2,3.")
  d = config.data
  try:
    tok = data_lib.load_tokenizer(path, eos_token=d.eos_token, bos_token=d.bos_token)
  except ValueError as e:
    raise InferenceError(str(e).splitlines()[0]) from None
  vocab = cfg.vocab_size if cfg is not None else int(config.model.vocab_size)
  if tok.vocab_size != vocab:
    flag = f"--tokenizer={override}: " if override else ""
    raise InferenceError(f"{flag}tokenizer/vocabulary mismatch: {tok.source} has {tok.vocab_size} tokens but the "
                         f"model's vocabulary is {vocab}. Use the tokenizer the model was trained with.")
  return tok


def describe(r: ParamsRestore) -> str:
  c = r.cfg
  kind = "vanilla" if c.strategy == "none" else (
      f"{c.strategy} R={c.recursions}" + (f" MoR {c.mor_type}-choice" if c.mor_enable else "") +
      (" + KV sharing" if c.kv_sharing else ""))
  n = sum(int(x.size) for x in jax.tree.leaves(r.variables["params"]))
  return f"{r.config.name} ({kind}, {n:,} parameters) step {r.step} from {r.directory}"
