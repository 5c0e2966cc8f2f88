"""Initialise a recursive / MoR model from a pretrained vanilla Llama (spec section 7).

Configured by `config.init.from_path` (a Hugging Face Llama/SmolLM directory,
or a mor-jax workdir / checkpoint of a vanilla or recursive model) and
`config.init.strategy`; the training loop applies it to a fresh run only
(a resumed run keeps its checkpoint). For block position i of a shared block
of `base_depth` layers, with L the model's layer count:

- stepwise: vanilla layer round(linspace(0, L-1, base_depth))[i]
  (middle variants: linspace(1, L-2, base_depth));
- lower: layer i (middle: i + 1);
- upper: the last base_depth layers (middle: those before the last layer);
- average: the mean of the layers the schedule runs at position i
  (cycle i, i+base, ...; sequence i*R .. i*R+R-1; middle variants + 1);
- random: a sorted random choice of base_depth layers, seeded by
  `train.seed` (numpy RandomState, as the reference's np.random.choice).

Middle variants copy the vanilla first and last layer; embeddings, the final
norm and the head are copied (a tied source head becomes an untied head's
initial value); routers keep their fresh initialisation. A source with more
layers than the model first keeps `L` of them picked by linspace (first and
last kept), which is what the reference does when its layer count is not
divisible by the recursions.

A mor-jax source of the same architecture as the model (recursive or MoR
included: what fine-tuning starts from) is copied whole, routers and the
loss-free router bias too. `resolve_from_path(config, workdir)` fills the
fields a config leaves unset (None: configs/finetune_chat.py leaves the whole
architecture unset) from the source, or from the workdir's own checkpoint when
the run resumes, and points an empty data.tokenizer_path at the source's
tokenizer.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
import numpy as np

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as config_lib
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.errors import ConfigError
from mor_jax.interop import hf
from mor_jax.interop import importer
from mor_jax.interop import layout
from mor_jax.interop import reference as ref



def _fail(field: str, msg: str):
  raise ConfigError(f"config.{field}: {msg}")


def source_layers(cfg: config_lib.ModelConfig, strategy: str, seed: int = 0) -> list[list[int]]:
  """For each block position: the vanilla layers (of an L-layer model) it is initialised from (mean if several)."""
  L, base, R = cfg.num_layers, cfg.base_depth, cfg.recursions
  off = 1 if cfg.has_middle else 0
  if strategy == "stepwise":
    picks = [round(x) for x in np.linspace(off, L - 1 - off, base)]
  elif strategy == "lower":
    picks = list(range(off, base + off))
  elif strategy == "upper":
    picks = list(range(L - base - off, L - off))
  elif strategy == "random":
    picks = sorted(int(x) for x in np.random.RandomState(seed).choice(range(off, L - off), base, replace=False))
  elif strategy == "average":
    if cfg.strategy in ("sequence", "middle_sequence"):
      return [list(range(off + i * R, off + (i + 1) * R)) for i in range(base)]
    return [[off + i + r * base for r in range(R)] for i in range(base)]
  else:
    _fail("init.strategy", f"unknown strategy {strategy!r}; choose one of {config_lib.INIT_STRATEGIES}.")
  return [[int(p)] for p in picks]


def repick(num_source: int, cfg: config_lib.ModelConfig) -> list[int]:
  """Which source layers stand for the model's L layers (identity when the counts agree)."""
  L = cfg.num_layers
  if num_source == L:
    return list(range(L))
  if num_source < L:
    _fail("model.num_layers", f"is {L} but the pretrained model in init.from_path has only {num_source} layers; "
          f"set model.num_layers <= {num_source}.")
  if cfg.has_middle:
    return [0] + [round(x) for x in np.linspace(1, num_source - 2, L - 2)] + [num_source - 1]
  return [round(x) for x in np.linspace(0, num_source - 1, L)]


# ------------------------------------------------------------------ sources
def _is_orbax(path: str) -> bool:
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  try:
    infer_ckpt.find_checkpoints(path)
    return True
  except Exception:  # pylint: disable=broad-except (InferenceError: not a mor-jax checkpoint)
    return False


def check_source(config, cfg: config_lib.ModelConfig, workdir: str | None = None) -> None:
  """Cheap up-front check of `init.from_path` (exists, is a model, dims fit); skipped when `workdir` will resume."""
  path = _path(config)
  if not path:
    return
  if ckpt_lib.has_checkpoints(workdir):
    return                                          # resuming: the checkpoint wins, the source is not read
  if not os.path.exists(path):
    _fail("init.from_path", f"{path} does not exist; give a Hugging Face Llama directory (config.json + weights) or "
          "a mor-jax workdir, or '' to train from scratch.")
  if _is_orbax(path):
    return
  cfg_json = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_json) or not hf.has_weights(path):
    _fail("init.from_path", f"{path} is neither a mor-jax checkpoint nor a Hugging Face model directory "
          f"(needs config.json and one of {', '.join(hf.WEIGHT_FILES[:4])}).")
  _check_dims(cfg, hf.llama_dims(hf.read_json(cfg_json), cfg_json), path)


def _check_dims(cfg, dims, where):
  for k in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads"):
    if getattr(cfg, k) != dims[k]:
      hint = " (vocabulary mismatch: use the pretrained model's tokenizer and vocabulary)" if k == "vocab_size" else ""
      _fail(f"model.{k}", f"is {getattr(cfg, k)} but the pretrained model in {where} has {dims[k]}{hint}; "
            "set it to the pretrained model's value.")
  repick(dims["num_layers"], cfg)


def _path(config) -> str:
  p = config.init.from_path
  return os.path.abspath(os.path.expanduser(p)) if p else ""


def load_vanilla(path: str, cfg: config_lib.ModelConfig) -> tuple[dict, int]:
  """(state dict with vanilla Llama keys, number of layers) of an HF directory or a mor-jax checkpoint."""
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  if _is_orbax(path):
    r = infer_ckpt.restore(path)
    if r.cfg.mor_enable:
      _fail("init.from_path", f"{path} holds a MoR (routed) model; initialise from a vanilla or recursive model.")
    _check_dims(cfg, {k: getattr(r.cfg, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                     "num_heads", "num_kv_heads", "num_layers")}, path)
    params = layout.to_stacked_layout(r.cfg, jax.device_get(r.variables["params"]))
    return ref.state_dict_from_params(r.cfg, params), r.cfg.num_layers   # recursive sources unroll
  cfg_json = os.path.join(path, "config.json")
  hfc = hf.read_json(cfg_json)
  if hfc.get("model_type") == "mor_llama":
    _fail("init.from_path", f"{path} holds a MoR (routed) model; initialise from a vanilla or recursive model.")
  dims = hf.llama_dims(hfc, cfg_json)
  _check_dims(cfg, dims, path)
  return hf.read_state_dict(path), dims["num_layers"]


# ------------------------------------------------------------------ mapping
def pretrained_params(cfg: config_lib.ModelConfig, state_dict: dict, num_source_layers: int, strategy: str,
                      seed: int = 0) -> dict:
  """The params that come from the pretrained model (stacked layout, numpy); routers are not included."""
  keep = repick(num_source_layers, cfg)
  L = cfg.num_layers

  def layer(i, suffix):
    key = f"model.layers.{keep[i]}.{suffix}"
    if key not in state_dict:
      _fail("init.from_path", f"the pretrained weights lack {key!r}; is it a Llama checkpoint?")
    return np.asarray(state_dict[key], np.float32)

  def layer_tree(indices):
    out: dict = {}
    for sub, (suffix, tr) in ref.LAYER_KEYS.items():
      w = np.mean([layer(i, suffix) for i in indices], axis=0) if len(indices) > 1 else layer(indices[0], suffix)
      node = out
      for name in sub[:-1]:
        node = node.setdefault(name, {})
      node[sub[-1]] = w.T if tr else w
    return out

  emb = np.asarray(state_dict["model.embed_tokens.weight"], np.float32)
  if emb.shape != (cfg.vocab_size, cfg.hidden_size):
    _fail("model.vocab_size", f"the pretrained embedding is {list(emb.shape)} but the model needs "
          f"[{cfg.vocab_size}, {cfg.hidden_size}] (vocabulary mismatch: use the pretrained model's vocabulary).")
  norm = np.asarray(state_dict["model.norm.weight"], np.float32)
  params = {"embed": {"embedding": emb}, "final_norm": {"scale": norm}}
  head = state_dict.get("lm_head.weight")
  if cfg.tie_embeddings:
    if head is not None and not np.array_equal(np.asarray(head, np.float32), emb):
      _fail("model.tie_embeddings", "is true but the pretrained model has its own lm_head; set it to False.")
  else:
    params["lm_head"] = {"kernel": (emb if head is None else np.asarray(head, np.float32)).T.copy()}
  positions = source_layers(cfg, strategy, seed)
  per_pos = [layer_tree(ix) for ix in positions]
  params["block"] = {"layers": _stack(per_pos)}
  if cfg.has_middle:
    params["first"] = layer_tree([0])
    params["last"] = layer_tree([L - 1])
  return params


def _stack(trees):
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def merge(fresh: dict, pretrained: dict, put=None, path=()) -> dict:
  """`fresh` with every leaf that `pretrained` has replaced (shapes must agree); `put(new, old)` places a new
  leaf like the old one (default: a numpy array of the old dtype)."""
  put = put or (lambda new, old: np.asarray(new, np.asarray(old).dtype))
  out = {}
  for k, v in fresh.items():
    if k not in pretrained:
      out[k] = v
    elif isinstance(v, dict):
      out[k] = merge(v, pretrained[k], put, path + (k,))
    else:
      if tuple(np.shape(v)) != tuple(np.shape(pretrained[k])):
        raise ConfigError(f"config.init.from_path: {'/'.join(path + (k,))} is {np.shape(pretrained[k])} in the "
                          f"pretrained model but {np.shape(v)} in this model; the model dims do not match.")
      out[k] = put(pretrained[k], v)
  return out


def same_architecture(a: config_lib.ModelConfig, b: config_lib.ModelConfig) -> bool:
  """Whether two models have the same parameters and computation (execution, training-only and layout settings
  aside)."""
  skip = ckpt_lib.schema.EXECUTION_FIELDS | ckpt_lib.schema.TRAINING_ONLY_FIELDS | {"scan_layers"}
  da, db = dataclasses.asdict(a), dataclasses.asdict(b)
  return {k: v for k, v in da.items() if k not in skip} == {k: v for k, v in db.items() if k not in skip}


def _whole_copy(path: str, cfg: config_lib.ModelConfig):
  """(params in model layout, router_bias or None) of a mor-jax source of the same architecture, else None."""
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  if not _is_orbax(path) or not same_architecture(config_lib.model_config(_stored_config(path)), cfg):
    return None                              # (the stored config says; no parameter is read)
  r = infer_ckpt.restore(path)
  params = layout.to_model_layout(cfg, layout.to_stacked_layout(r.cfg, jax.device_get(r.variables["params"])))
  bias = r.variables.get("router_bias")
  return params, (jax.device_get(bias) if bias else None)


def load_pretrained(config, cfg: config_lib.ModelConfig) -> dict:
  """The pretrained part of the params for `config.init` (model layout, numpy; routers only from a source of the
  same architecture, which is copied whole)."""
  return _load(config, cfg)[0]


def _load(config, cfg: config_lib.ModelConfig):
  from absl import logging  # pylint: disable=g-import-not-at-top
  path = _path(config)
  check_source(config, cfg)
  whole = _whole_copy(path, cfg)
  if whole is not None:
    logging.info("initialising from %s: the same architecture, every parameter copied", path)
    return whole
  strategy, seed = str(config.init.strategy), int(config.train.seed)
  sd, n = load_vanilla(path, cfg)
  pre = pretrained_params(cfg, sd, n, strategy, seed)
  keep = repick(n, cfg)
  logging.info("initialising from %s (strategy %s): block positions <- pretrained layers %s%s", path, strategy,
               [[keep[i] for i in ix] for ix in source_layers(cfg, strategy, seed)],
               f", first/last <- 0/{n - 1}" if cfg.has_middle else "")
  return layout.to_model_layout(cfg, pre), None


def initial_params(config, cfg: config_lib.ModelConfig, fresh_params: dict) -> dict:
  """Fresh params (model layout) with the pretrained parts of `config.init` filled in (numpy)."""
  return merge(fresh_params, load_pretrained(config, cfg))


def apply_to_state(config, cfg: config_lib.ModelConfig, state, dp):
  """A fresh TrainState placed by `dp` whose params come from `config.init`. Each pretrained leaf is put with the
  sharding of the fresh leaf it replaces (nothing is gathered); the optimizer state is kept (fresh moments do
  not depend on the parameter values)."""
  import jax  # pylint: disable=g-import-not-at-top
  host = dp.unreplicate(state)
  put = lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding)
  pretrained, bias = _load(config, cfg)
  params = merge(host.params, pretrained, put)
  router_bias = merge(host.router_bias, bias, put) if bias and host.router_bias else host.router_bias
  return dp.place_state(host.replace(params=params, router_bias=router_bias))


# ------------------------------------------------------------------ fields taken from the source
def _stored_config(path: str) -> ml_collections.ConfigDict:
  """The config of a mor-jax workdir / checkpoint (its newest step's meta), or of a Hugging Face Llama directory
  (vanilla, from config.json)."""
  if _is_orbax(path):
    ckpt_dir, steps = ckpt_params.find_checkpoints(path)
    step_dir = path if os.path.basename(os.path.normpath(path)).isdigit() else os.path.join(ckpt_dir, str(steps[-1]))
    meta = ckpt_params.read_meta(step_dir)
    if "config" not in meta:
      _fail("init.from_path", f"{step_dir} stores no config, so the architecture cannot be taken from it; set the "
            "model fields in the config.")
    return ckpt_params.inference_config(ml_collections.ConfigDict(meta["config"]))   # train settings aside
  cfg_json = os.path.join(path, "config.json")
  return importer.config_from_meta(importer.reference_meta(hf.llama_dims(hf.read_json(cfg_json), cfg_json), None))


def _tokenizer_of(path: str, stored) -> str:
  """The tokenizer folder of a source: its workdir copy (WORKDIR/tokenizer), the HF directory itself, or the
  stored config's data.tokenizer_path ('' if none)."""
  for folder in (os.path.join(path, "tokenizer"), path):
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
      return folder
  return str(stored.data.tokenizer_path or "")


def resolve_from_path(config, workdir: str | None = None):
  """`config` with its unset (None) fields taken from the model it starts from, and an empty data.tokenizer_path
  (when fields were unset, or for chat data) set to that model's tokenizer; `config` itself when nothing is
  taken. The source is WORKDIR's own newest checkpoint when the run resumes (the source may be gone by then),
  else init.from_path (checked: it must exist)."""
  unset = [f.key for f in config_lib.FIELDS if config_lib.get_field(config, f.key) is None]
  wants_tokenizer = not config.data.tokenizer_path and (unset or config.data.corpus == "chat")
  resume = ckpt_lib.has_checkpoints(workdir)
  source = os.path.abspath(workdir) if resume else _path(config)
  if not (unset or wants_tokenizer) or not source:
    return config                  # nothing to take, or no source: validation names what is missing
  if not resume and not os.path.exists(source):
    _fail("init.from_path", f"{source} does not exist; give the mor-jax workdir or Hugging Face model directory "
          "to start from.")
  stored = _stored_config(source)
  c = ml_collections.ConfigDict(config.to_dict())
  for key in unset:
    section, name = key.split(".")
    c[section][name] = config_lib.get_field(stored, key)
  if wants_tokenizer:
    c.data.tokenizer_path = _tokenizer_of(source, stored)
    for k in ("eos_token", "bos_token"):
      c.data[k] = c.data.get(k) or stored.data.get(k, "")
  return c



# ------------------------------------------------------------------ for an entry point
def resolve(config, workdir: str):
  """What an entry point (main.py, a notebook, a benchmark) hands the trainer for `config.init`:
  (`config` with the fields it leaves unset taken from the model it starts from, `init_params_fn` for
  `train.train_and_evaluate` or None). `init.from_path` is checked here, before any heavy work, unless `workdir`
  will resume (its checkpoint wins then and the source is not read)."""
  c = resolve_from_path(config, workdir)
  if not _path(c):
    return c, None
  if not ckpt_lib.has_checkpoints(workdir):
    check_source(c, config_lib.model_config(ckpt_params.inference_config(c)))
  return c, apply_to_state
