"""Import a PyTorch-reference (or Hugging Face Llama) checkpoint into a mor-jax workdir.

`python main.py --mode=import --import_from=DIR --workdir=OUT` reads DIR:

- weights: `model.safetensors` (single or sharded), `pytorch_model.bin`
  (needs torch) or a fixture's `weights.npz`; an HF Trainer output without
  top-level weights uses its newest `checkpoint-<N>/`;
- dimensions: the Hugging Face `config.json` (a fixture's `config.json`, or
  one written by `--mode=export_hf`, also carries the routing settings);
- sharing / recursion / MoR settings: the run's YAML (the reference's
  `conf/pretrain/*.yaml` format: `recursive`, `mor`, `kv_sharing`), found in
  DIR or given with `--import_run_config`, or an explicit `--config` (whose
  dims are checked against config.json). Without either, the checkpoint is a
  vanilla Llama.

It maps the weights with `reference.py` (a shared tensor stored once per use must be equal everywhere: attention
untied across recursions by the fork's bug is rejected), writes `OUT/checkpoints/0/` in the trainer's Orbax format (so
generate, eval and training-to-continue all accept OUT), restores that checkpoint and prints the logits of a probe
sequence (also saved to `OUT/import_probe.npz`). When DIR holds `inputs.npz` / `outputs.npz` (the fixture format) the
probe is those inputs and the max difference to `logits_eval` is reported. A `.gguf` file is `gguf.py`'s (which
uses this module's writing and probing); main.py picks by the file's suffix.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import os

import ml_collections
import numpy as np

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as config_lib
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.errors import InteropError
from mor_jax.interop import hf
from mor_jax.interop import layout
from mor_jax.interop import reference as ref
from mor_jax.interop.weights import variables_from_weights

PROBE_FILE = "import_probe.npz"


@dataclasses.dataclass
class ImportResult:
  config: ml_collections.ConfigDict
  cfg: config_lib.ModelConfig
  workdir: str
  step_dir: str
  tokens: np.ndarray
  logits: np.ndarray
  max_diff: float | None            # vs the directory's outputs.npz logits_eval, when present
  notes: list
  depth_mismatches: int | None = None   # token-choice: tokens whose depth differs from outputs.npz's, when present


# ------------------------------------------------------------------ settings
def find_run_config(directories, explicit: str | None = None) -> str | None:
  """The run YAML: `explicit`, else the only *.yaml/*.yml in the directories (preferring one named like DIR)."""
  if explicit:
    if not os.path.isfile(explicit):
      raise InteropError(f"--import_run_config {explicit} does not exist.")
    return explicit
  for d in directories:
    found = sorted(glob.glob(os.path.join(d, "*.yaml")) + glob.glob(os.path.join(d, "*.yml")))
    if not found:
      continue
    named = [f for f in found if os.path.splitext(os.path.basename(f))[0] == os.path.basename(os.path.normpath(d))]
    if len(found) == 1 or len(named) == 1:
      return (named or found)[0]
    raise InteropError(f"{d} holds several YAML files ({', '.join(os.path.basename(f) for f in found)}); pass the "
                       "run's config with --import_run_config=PATH.")
  return None


def read_run_config(path: str) -> dict:
  import yaml  # pylint: disable=g-import-not-at-top (a dependency of flax and orbax)
  try:
    with open(path, encoding="utf-8") as f:
      run = yaml.safe_load(f) or {}
  except yaml.YAMLError as e:
    raise InteropError(f"{path} is not valid YAML ({e}).") from None
  if not isinstance(run, dict):
    raise InteropError(f"{path} is not a run config (expected a mapping with recursive/mor/kv_sharing sections).")
  return run


def _capacities(value, R):
  if value in (None, "", []):
    return [(R - i) / R for i in range(R)]       # the reference's preprocess_config default
  if isinstance(value, str):
    value = [x for x in value.split(",") if x.strip()]
  return [float(x) for x in value]


def reference_meta(dims: dict, run: dict | None, where: str = "the run config") -> dict:
  """A fixture-style meta dict (what `reference.config_from_reference` reads) from dims + a reference run config."""
  model = {"vocab_size": dims["vocab_size"], "hidden_size": dims["hidden_size"],
           "intermediate_size": dims["intermediate_size"], "num_hidden_layers": dims["num_layers"],
           "num_attention_heads": dims["num_heads"], "num_key_value_heads": dims["num_kv_heads"],
           "rope_theta": dims["rope_theta"], "rms_norm_eps": dims["rms_eps"],
           "max_position_embeddings": dims["max_seq_len"], "tie_word_embeddings": dims["tie_embeddings"],
           "initializer_range": dims["init_std"]}
  meta = {"model": model, "kind": "vanilla", "kv_sharing": False}
  run = run or {}
  rec, mor, kv = run.get("recursive") or {}, run.get("mor") or {}, run.get("kv_sharing") or {}
  if (run.get("relaxation") or {}).get("enable"):
    raise InteropError(f"{where}: relaxation (LoRA / prompt adapters per recursion) is enabled; mor-jax has no "
                       "relaxation, so this checkpoint cannot be imported.")
  if rec.get("enable"):
    R = int(rec.get("num_recursion") or 0)
    if R < 2:
      raise InteropError(f"{where}: recursive.num_recursion = {rec.get('num_recursion')} (the base_depth form) is "
                         "not supported; give num_recursion >= 2 and a sharing strategy.")
    if rec.get("ln_share") is False:
      raise InteropError(f"{where}: recursive.ln_share is false (norms not shared); mor-jax shares the norms of the "
                         "block, so this checkpoint cannot be imported.")
    meta.update(kind="recursive", sharing=rec.get("sharing", "cycle"), num_recursion=R)
  if mor.get("enable"):
    if not rec.get("enable"):
      raise InteropError(f"{where}: mor.enable needs recursive.enable.")
    t = mor.get("type", "expert")
    sub = mor.get(t) or {}
    router = {"router_type": mor.get("router_type", "linear"), "temp": mor.get("temp", 1.0),
              "router_func": sub.get("router_func", "sigmoid"), "alpha": sub.get("alpha", 0.1),
              "gating": sub.get("gating", "weighted"), "z_loss": bool(mor.get("z_loss", False)),
              "z_coeff": mor.get("z_coeff", 1e-3)}
    if t == "expert":
      router.update(sampling=sub.get("sampling", "aux_loss"), aux_coeff=sub.get("coeff", 1e-3))
    else:
      router.update(balancing=sub.get("balancing", "loss"), bal_coeff=sub.get("coeff", 0.1))
    meta.update(kind=f"mor_{t}", mor_type=t, router=router, capacity=_capacities(mor.get("capacity"), R),
                extra_mor={"rand_router": bool(mor.get("rand_router", False)),
                           "cap_warmup_steps": int(sub.get("cap_warmup_step", 0) or 0),
                           "bal_warmup_steps": int(sub.get("bal_warmup_step", 0) or 0),
                           "bal_update_rate": float(sub.get("u", 1e-3))})
  meta["kv_sharing"] = bool(kv.get("enable", False))
  return meta


def config_from_meta(meta: dict) -> ml_collections.ConfigDict:
  c = ref.config_from_reference(meta)
  for k, v in (meta.get("extra_mor") or {}).items():
    c.mor[k] = v
  return c


@dataclasses.dataclass
class Source:
  """What `load_source` found in a directory."""
  weights_dir: str
  config: ml_collections.ConfigDict
  state_dict: dict
  notes: list
  settings_from: str            # 'config', 'run config <path>', 'fixture config.json', ...


def load_source(directory: str, *, config: ml_collections.ConfigDict | None = None,
                run_config: str | None = None) -> Source:
  """Reads weights and builds the mor-jax config of a reference / HF directory (no JAX needed)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  wdir = hf.find_weights_dir(directory)
  notes = []
  if wdir != directory:
    notes.append(f"using the newest Trainer checkpoint {os.path.relpath(wdir, directory)}/")
  cfg_json = next((os.path.join(d, "config.json") for d in (wdir, directory)
                   if os.path.isfile(os.path.join(d, "config.json"))), None)
  if cfg_json is None and config is None:
    raise InteropError(f"{directory} has no config.json (the Hugging Face config with the model's dimensions); "
                       "copy it next to the weights, or pass --config with the model's dimensions.")
  hfc = hf.read_json(cfg_json) if cfg_json else {}
  fixture = isinstance(hfc.get("model"), dict) and "kind" in hfc
  dims = None if fixture or not hfc else hf.llama_dims(hfc, cfg_json)
  if config is not None:
    c = ml_collections.ConfigDict(config.to_dict())
    if dims is not None:
      hf.check_dims(c.model, dims, cfg_json)
    settings = "--config"
  elif fixture:
    c = ref.config_from_reference(hfc)
    settings = f"fixture {cfg_json}"
  elif "mor_jax" in hfc:                                   # written by --mode=export_hf
    from mor_jax.config import defaults  # pylint: disable=g-import-not-at-top
    c = defaults()
    for section, values in hfc["mor_jax"].items():
      if section == "name":        # the exported run's name (re-imports keep it)
        c.name = str(values) or c.name
      else:
        c[section].update(values)
    hf.check_dims(c.model, dims, cfg_json)
    if "seq_len" not in hfc["mor_jax"].get("data", {}):    # older exports: the default exceeds small models
      c.data.seq_len = min(int(c.data.seq_len), int(c.model.max_seq_len))
    settings = f"the mor_jax section of {cfg_json}"
  else:
    yaml_path = find_run_config([directory, wdir], run_config)
    run = read_run_config(yaml_path) if yaml_path else None
    c = config_from_meta(reference_meta(dims, run, yaml_path or "config.json"))
    if run:
      if run.get("name"):
        c.name = str(run["name"])
      if run.get("max_length"):
        c.data.seq_len = min(int(run["max_length"]), int(c.model.max_seq_len))
      if run.get("precision") not in (None, "fp32"):
        notes.append(f"the run trained in {run['precision']}; the import computes in float32 "
                     "(set --config.model.dtype=bfloat16 when training on)")
    settings = f"run config {yaml_path}" if yaml_path else "config.json alone (vanilla Llama)"
  if c.name == config_lib.defaults().name:          # unnamed: the directory's name
    c.name = os.path.basename(os.path.normpath(directory))
  sd = hf.read_state_dict(wdir)
  if "model.embed_tokens.weight" not in sd:
    raise InteropError(f"the weights in {wdir} have no model.embed_tokens.weight; is this a Llama-family "
                       "checkpoint?")
  if settings == "config.json alone (vanilla Llama)":
    routed = sorted(k for k in sd if ".mor_router." in k or ".block." in k or ".block_list." in k)
    if routed:
      raise InteropError(f"{directory} holds a MoR checkpoint (e.g. {routed[0]!r}) but no run config says how it "
                         "routes: put the run's YAML next to the weights, pass --import_run_config=PATH, or pass "
                         "--config with recursion/mor settings.")
    twins = _identical_layers(sd, c.model.num_layers)
    if twins:
      notes.append(f"layers {twins} hold identical weights: this looks like a recursive model; pass its run YAML "
                   "(--import_run_config) to import it with sharing (as vanilla it gives the same logits)")
  return Source(weights_dir=wdir, config=c, state_dict=sd, notes=notes, settings_from=settings)


def _identical_layers(sd, num_layers):
  digest = {}
  for i in range(num_layers):
    w = sd.get(f"model.layers.{i}.self_attn.q_proj.weight")
    if w is not None:
      digest.setdefault(hashlib.sha1(np.ascontiguousarray(w).tobytes()).hexdigest(), []).append(i)
  return [v for v in digest.values() if len(v) > 1]


# ------------------------------------------------------------------ writing
def write_checkpoint(config: ml_collections.ConfigDict, params: dict, workdir: str, *, router_bias=None,
                     extra_meta=None) -> str:
  """Writes `params` (stacked layout) as step 0 of a trainer-format workdir; returns the step directory.

  router_bias: the source's loss-free balancing bias ({'bias': [R]}); None: zeros, as a fresh model has.

  The state is a full TrainState (fresh optimizer moments), so `--mode=train`
  with this workdir continues training from the imported weights.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mor_jax.train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from mor_jax.train.state import TrainState  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(os.path.expanduser(workdir))
  ckpt_lib.require_new_workdir(workdir)
  config = ml_collections.ConfigDict(config.to_dict())
  if "train" in config:
    config.train.grad_accum_steps = -1          # derived again for the devices of whatever run reads it
  validated = config_lib.validate(config, num_devices=1)
  cfg = config_lib.model_config(validated)
  tx, _ = make_optimizer(validated)
  p = jax.tree.map(jnp.asarray, layout.to_model_layout(cfg, params))
  loss_free = cfg.mor_enable and cfg.mor_type == "token" and cfg.balancing == "loss_free"
  if not loss_free:
    router_bias = {}
  elif router_bias is None:
    router_bias = {"bias": jnp.zeros((cfg.recursions,), jnp.float32)}   # as MoRLM creates it
  else:
    router_bias = {"bias": jnp.asarray(router_bias["bias"], jnp.float32)}
  _, rng = jax.random.split(jax.random.PRNGKey(int(validated.train.seed)))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), router_bias=router_bias, rng=rng)
  return ckpt_lib.write_imported_step(workdir, config, state, validated=validated, extra_meta=extra_meta)


@functools.lru_cache(maxsize=None)
def forward_with_aux(cfg: config_lib.ModelConfig):
  """A jitted `(variables, tokens) -> (float32 logits, aux)` for `cfg` (cached: one compile per model config)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import MoRLM  # pylint: disable=g-import-not-at-top
  return jax.jit(MoRLM(cfg).apply)


def forward(cfg: config_lib.ModelConfig):
  """`(variables, tokens) -> float32 logits` for `cfg` (the compiled `forward_with_aux`)."""
  return lambda variables, tokens: forward_with_aux(cfg)(variables, tokens)[0]


def depth_mismatches(cfg: config_lib.ModelConfig, aux, directory: str) -> int | None:
  """Token-choice: how many tokens' depths (aux['depth']) differ from the directory's outputs.npz
  token_depth_index_eval; None when the model is not token-choice or no reference depths are stored."""
  out = os.path.join(directory, "outputs.npz")
  if not (cfg.mor_enable and cfg.mor_type == "token" and os.path.isfile(out)):
    return None
  with np.load(out) as z:
    if "token_depth_index_eval" not in z.files:
      return None
    expected = np.asarray(z["token_depth_index_eval"])
  ours = np.asarray(aux["depth"])
  return int(np.sum(ours != expected)) if ours.shape == expected.shape else int(expected.size)


def _tokenizer_size(directory):
  try:
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
    return Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).get_vocab_size(with_added_tokens=True)
  except Exception:  # pylint: disable=broad-except (an unreadable tokenizer only loses this note)
    return None


def probe_tokens(directory: str, vocab: int, length: int = 16) -> tuple[np.ndarray, np.ndarray | None]:
  """(tokens [B, T], expected logits or None): the directory's fixture inputs/outputs, else a fixed sequence."""
  inp, out = os.path.join(directory, "inputs.npz"), os.path.join(directory, "outputs.npz")
  if os.path.isfile(inp):
    with np.load(inp) as z:
      tokens = np.asarray(z["input_ids"], np.int32)
    expected = None
    if os.path.isfile(out):
      with np.load(out) as z:
        expected = np.asarray(z["logits_eval"], np.float32) if "logits_eval" in z.files else None
    return tokens, expected
  return (np.random.RandomState(0).randint(0, vocab, size=(1, length)).astype(np.int32)), None


def import_reference(directory: str, workdir: str, *, config: ml_collections.ConfigDict | None = None,
                     run_config: str | None = None, log=print) -> ImportResult:
  """The whole import (see the module docstring); `log` gets the human-readable lines. Nothing is written when the
  import is refused (the workdir holds checkpoints, the settings make no valid model)."""
  if str(directory).lower().endswith(".gguf"):
    raise InteropError(f"{directory} is a GGUF file: import it with interop.gguf.import_gguf (--mode=import does).")
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.expanduser(directory))
  ckpt_lib.require_new_workdir(workdir)
  src = load_source(directory, config=config, run_config=run_config)
  c = src.config
  try:
    cfg = config_lib.model_config(config_lib.validate(c, num_devices=1))
  except config_lib.ConfigError as e:
    raise InteropError(f"the settings from {src.settings_from} do not make a valid mor-jax model: {e}") from None
  variables = variables_from_weights(cfg, src.state_dict)
  notes = list(src.notes)
  tok_src = next((d for d in (src.weights_dir, directory) if hf.tokenizer_dir(d)), None)
  tok_meta = {}
  if tok_src and not c.data.tokenizer_path:
    dst = os.path.join(os.path.abspath(workdir), ckpt_params.TOKENIZER_SUBDIR)
    tok_meta = ckpt_params.store_tokenizer(workdir, tok_src)
    c.data.tokenizer_path = dst
    notes.append(f"tokenizer copied to {dst}")
    size = _tokenizer_size(dst)
    if size is not None and size != cfg.vocab_size:
      notes.append(f"the tokenizer has {size} tokens but the model's vocabulary is {cfg.vocab_size}: generate and "
                   "eval need the tokenizer the model was trained with (pass --tokenizer=PATH)")
  elif not c.data.tokenizer_path:
    notes.append("no tokenizer.json found: generate and eval need --tokenizer=PATH (the model's tokenizer.json or "
                 "tokenizer folder), or generate from token ids with --prompt_ids=1,2,3")
  step_dir = write_checkpoint(c, variables["params"], workdir, router_bias=variables.get("router_bias"),
                              extra_meta={"imported_from": directory, "import_settings": src.settings_from,
                                          **tok_meta})
  restored = infer_ckpt.restore(workdir)          # what generate and eval will read
  tokens, expected = probe_tokens(directory, cfg.vocab_size)
  logits, aux = jax.device_get(forward_with_aux(restored.cfg)(restored.variables, tokens))
  logits, depth_diff = np.asarray(logits), depth_mismatches(restored.cfg, aux, directory)
  np.savez(os.path.join(workdir, PROBE_FILE), tokens=tokens, logits=logits)
  max_diff = None
  if expected is not None and expected.shape == logits.shape:
    max_diff = float(np.max(np.abs(logits.astype(np.float64) - expected)))
  n = sum(int(np.size(x)) for x in jax.tree.leaves(restored.variables["params"]))
  log(f"imported {directory} ({src.settings_from}) -> {step_dir}")
  log(f"model: {infer_ckpt.describe(restored)}")
  for note in notes:
    log(f"note: {note}")
  more = " ..." if tokens.shape[1] > 12 else ""
  log(f"probe tokens {tokens.shape[0]}x{tokens.shape[1]}: {tokens[0, :12].tolist()}{more}")
  with np.printoptions(precision=5, suppress=True, linewidth=120):
    for t in sorted({0, tokens.shape[1] // 2, tokens.shape[1] - 1}):
      log(f"  logits[0, {t}, :6] = {logits[0, t, :6]}  argmax {int(np.argmax(logits[0, t]))}")
  log(f"  mean |logits| = {float(np.mean(np.abs(logits))):.6f}; all probe logits in "
      f"{os.path.join(workdir, PROBE_FILE)}")
  if max_diff is not None:
    log(f"max |logits - outputs.npz logits_eval| = {max_diff:.3e} ({'OK' if max_diff <= 1e-4 else 'ABOVE 1e-4'})")
  if depth_diff is not None:
    log(f"token depths vs outputs.npz token_depth_index_eval: {tokens.size - depth_diff}/{tokens.size} equal "
        f"({'OK' if depth_diff == 0 else 'MISMATCH'})")
  use = "--prompt=..." if c.data.tokenizer_path else "--prompt_ids=1,2,3 (or --tokenizer=PATH --prompt=...)"
  log(f"{n:,} parameters. Use it: python main.py --mode=generate --workdir={workdir} {use}")
  return ImportResult(config=c, cfg=restored.cfg, workdir=workdir, step_dir=step_dir, tokens=tokens, logits=logits,
                      max_diff=max_diff, notes=notes, depth_mismatches=depth_diff)
