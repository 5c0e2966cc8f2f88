"""Export a mor-jax checkpoint as a Hugging Face directory: `python main.py --mode=export_hf --workdir=W
--export_to=DIR`.

Vanilla and recursive (non-routed) models become a standard
`LlamaForCausalLM` (`config.json`, `model.safetensors`, tokenizer files) that
transformers, vLLM and friends load: a recursive model of L layers unrolls
into L Llama layers in the order its sharing strategy runs them (cycle:
(0 1)(0 1), sequence: 0 0 1 1, middle variants with the unique first and
last layer around them), each repeated layer carrying the same weights.
The unrolling is `reference.state_dict_from_params`, the same mapping the
import and the parity checks use.

MoR (routed) models have no Llama equivalent: the directory then holds the
weights in the PyTorch reference's MoR layout and a config.json with
`model_type: mor_llama` plus a `mor_jax` section describing the routing
(`--mode=import` reads it back); plain Llama loaders refuse it, by design.
"""

from __future__ import annotations

import dataclasses
import os

from mor_jax.interop import hf
from mor_jax.interop import layout
from mor_jax.interop import reference as ref
from mor_jax.errors import InteropError

MOR_NOTE = ("This is a Mixture-of-Recursions model exported by mor-jax: its token routing has no Llama equivalent, "
            "so plain Llama loaders (transformers' LlamaForCausalLM, vLLM) cannot run it. The weights use the "
            "PyTorch MoR reference's key layout; config.json's `mor_jax` section holds the routing settings. Load "
            "it with mor-jax: python main.py --mode=import --import_from=THIS_DIR --workdir=W.\n")
CONFIG_SECTIONS = ("model", "recursion", "mor", "kv_sharing")


@dataclasses.dataclass
class ExportResult:
  directory: str
  llama_compatible: bool
  files: list
  num_layers: int


def export_hf(path: str, out_dir: str, *, step: int | None = None, config=None, log=print) -> ExportResult:
  """Writes the checkpoint at `path` (workdir, checkpoints dir or step dir) to `out_dir`."""
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.exists(os.path.join(out_dir, "config.json")) or os.path.exists(os.path.join(out_dir, hf.SAFETENSORS)):
    raise InteropError(f"{out_dir} already holds an exported model; choose a new --export_to or remove it.")
  restored = infer_ckpt.restore(path, step=step, config=config)
  cfg = restored.cfg
  variables = jax.device_get(restored.variables)
  params = layout.to_stacked_layout(cfg, variables["params"])
  state_dict = ref.state_dict_from_variables(cfg, {**variables, "params": params})   # the loss-free bias too
  os.makedirs(out_dir, exist_ok=True)
  files = []

  bos_id = eos_id = None
  tok_dir = _tokenizer_dir(restored)
  if tok_dir:
    files += hf.copy_tokenizer(tok_dir, out_dir)
    bos_id, eos_id, extra = _tokenizer_meta(restored.config, tok_dir, cfg)
    if "tokenizer_config.json" not in files and extra:
      hf.write_json(extra, os.path.join(out_dir, "tokenizer_config.json"))
      files.append("tokenizer_config.json")
  else:
    log("note: this checkpoint has no tokenizer (none in its workdir's tokenizer/ folder or at its "
        "config.data.tokenizer_path); the export has no tokenizer files")

  hf_config = hf.llama_config(cfg, bos_token_id=bos_id, eos_token_id=eos_id)
  llama = not cfg.mor_enable
  if not llama:
    hf_config.update(architectures=["MoRLlamaForCausalLM"], model_type="mor_llama",
                     mor_jax={**{s: restored.config[s].to_dict() for s in CONFIG_SECTIONS if s in restored.config},
                              "data": _data_settings(restored.config, cfg),
                              "name": str(restored.config.name)},
                     mor_note=MOR_NOTE.strip())
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
      f.write(MOR_NOTE)
    files.append("README.md")
  hf.write_json(hf_config, os.path.join(out_dir, "config.json"))
  gen = {"_from_model_config": True, "bos_token_id": bos_id, "eos_token_id": eos_id}
  hf.write_json(gen, os.path.join(out_dir, "generation_config.json"))
  hf.write_safetensors(state_dict, os.path.join(out_dir, hf.SAFETENSORS),
                       metadata={"mor_jax_source": os.path.abspath(restored.directory)})
  files += ["config.json", "generation_config.json", hf.SAFETENSORS]

  log(f"exported {infer_ckpt.describe(restored)} -> {out_dir}")
  if llama:
    kind = "vanilla" if cfg.strategy == "none" else f"{cfg.strategy} R={cfg.recursions}, unrolled"
    log(f"LlamaForCausalLM with {cfg.num_layers} layers ({kind}); load it with "
        f"transformers.AutoModelForCausalLM.from_pretrained({out_dir!r}) or vLLM")
  else:
    log("warning: " + MOR_NOTE.strip())
  return ExportResult(directory=out_dir, llama_compatible=llama, files=sorted(files), num_layers=cfg.num_layers)


def _tokenizer_dir(restored) -> str | None:
  """The model's tokenizer folder: the workdir's tokenizer/, else the stored config's (None: no tokenizer)."""
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  if "data" not in restored.config:
    return None
  path = infer_ckpt.tokenizer_source(restored.config, directory=restored.directory)
  return hf.tokenizer_dir(path) if path else None


def _data_settings(config, cfg) -> dict:
  """The data fields an import needs to run the model as trained: BOS/EOS handling and a context it fits."""
  d = config.data
  out = {"seq_len": min(int(d.seq_len), int(cfg.max_seq_len)), "add_bos": bool(d.add_bos)}
  out.update({k: d[k] for k in ("eos_token", "bos_token") if d[k]})
  return out


def _tokenizer_meta(config, tok_dir, cfg):
  """(bos_id, eos_id, tokenizer_config dict for transformers' PreTrainedTokenizerFast)."""
  from mor_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  d = config.data
  try:
    tok = tokenizer_lib.load_tokenizer(tok_dir, eos_token=d.eos_token, bos_token=d.bos_token)
  except ValueError:
    return None, None, {}
  extra = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token,
           "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}
  if tok.bos_token:
    extra["bos_token"] = tok.bos_token
  return tok.bos_id, tok.eos_id, extra


def main_export(path: str, out_dir: str, *, step: int | None = None, config=None) -> ExportResult:
  """The export_hf command (errors become InteropError/InferenceError with a message)."""
  if not out_dir:
    raise InteropError("--export_to is required for --mode=export_hf (the directory to write).")
  if not path:
    raise InteropError("--workdir is required for --mode=export_hf (the checkpoint to export).")
  return export_hf(path, out_dir, step=step, config=config)

