"""Hugging Face directory I/O: Llama `config.json` <-> model dims, weights in and out, tokenizer files.

Reading never needs torch: `model.safetensors` (single or sharded with an
index) and the fixtures' `weights.npz` are read with safetensors/numpy;
only `pytorch_model.bin` needs torch, imported lazily with a clear error when
it is missing. Writing is safetensors only (what transformers and vLLM load
by default). Tensors come out as float32 numpy arrays under their exact
PyTorch names ([out, in] matrices).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.errors import InteropError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"
FIXTURE_NPZ = "weights.npz"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX, FIXTURE_NPZ)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "mor_tokenizer.json")
# keys some checkpoints carry that are buffers, not weights
IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ------------------------------------------------------------------ reading
def has_weights(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, f)) for f in WEIGHT_FILES)


def find_weights_dir(directory: str) -> str:
  """`directory` if it holds weights, else its newest `checkpoint-<N>/` that does (HF Trainer output)."""
  if not os.path.isdir(directory):
    raise InteropError(f"{directory} is not a directory; pass a training output directory or a Hugging Face "
                       "model directory.")
  if has_weights(directory):
    return directory
  subs = []
  for d in glob.glob(os.path.join(directory, "checkpoint-*")):
    m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(d))
    if m and os.path.isdir(d) and has_weights(d):
      subs.append((int(m.group(1)), d))
  if subs:
    return max(subs)[1]
  raise InteropError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)} (or a checkpoint-<N>/ "
                     "folder holding one).")


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise InteropError(f"{path} is missing.") from None
  except json.JSONDecodeError as e:
    raise InteropError(f"{path} is not valid JSON ({e}).") from None


def read_state_dict(directory: str) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint in `directory` as float32 numpy, keyed by their PyTorch names."""
  p = lambda f: os.path.join(directory, f)
  if os.path.isfile(p(SAFETENSORS)):
    sd = _read_safetensors([p(SAFETENSORS)])
  elif os.path.isfile(p(SAFETENSORS_INDEX)):
    files = sorted(set(read_json(p(SAFETENSORS_INDEX)).get("weight_map", {}).values()))
    sd = _read_safetensors([p(f) for f in files])
  elif os.path.isfile(p(TORCH_BIN)) or os.path.isfile(p(TORCH_BIN_INDEX)):
    if os.path.isfile(p(TORCH_BIN)):
      files = [p(TORCH_BIN)]
    else:
      files = [p(f) for f in sorted(set(read_json(p(TORCH_BIN_INDEX)).get("weight_map", {}).values()))]
    sd = _read_torch(files)
  elif os.path.isfile(p(FIXTURE_NPZ)):
    with np.load(p(FIXTURE_NPZ)) as z:
      sd = {k: z[k] for k in z.files}
  else:
    raise InteropError(f"no weights in {directory}: expected one of {', '.join(WEIGHT_FILES)}.")
  return {k: np.asarray(v, np.float32) for k, v in sd.items() if not IGNORED_KEYS.search(k)}


def _read_safetensors(files):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  out = {}
  for f in files:
    if not os.path.isfile(f):
      raise InteropError(f"{f} is missing (listed in the index of {os.path.dirname(f)}).")
    out.update(load_file(f))
  return out


def _read_torch(files):
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InteropError(f"{files[0]} is a PyTorch pickle and torch is not installed: `pip install torch` "
                       "(the CPU wheel is enough), or convert the checkpoint to model.safetensors.") from None
  out = {}
  for f in files:
    if not os.path.isfile(f):
      raise InteropError(f"{f} is missing (listed in the index of {os.path.dirname(f)}).")
    sd = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
      sd = sd["state_dict"]
    for k, v in sd.items():
      if hasattr(v, "detach"):
        out[k] = v.detach().to(torch.float32).numpy()
  return out


# ------------------------------------------------------------------ config.json
def llama_dims(hf: dict, where: str = "config.json") -> dict:
  """Model fields of configs/base.py (`config.model.*`) from a Llama-family config.json.

  Rejects what the model cannot express (biases, another activation, RoPE
  scaling, a head_dim other than hidden/heads) with the field that says so.
  """
  model_type = hf.get("model_type", "llama")
  if model_type not in ("llama", "mor_llama"):
    raise InteropError(f"{where}: model_type {model_type!r} is not a Llama model; only Llama/SmolLM-family "
                       "checkpoints can be loaded.")
  need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
  missing = [k for k in need if k not in hf]
  if missing:
    raise InteropError(f"{where} lacks {', '.join(missing)}; is it a Hugging Face Llama config?")
  heads = int(hf["num_attention_heads"])
  hidden = int(hf["hidden_size"])
  if hf.get("head_dim") not in (None, hidden // heads):
    raise InteropError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads = "
                       f"{hidden // heads}; mor-jax models use head_dim = hidden / heads.")
  if hf.get("hidden_act", "silu") != "silu":
    raise InteropError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only).")
  for k in ("attention_bias", "mlp_bias"):
    if hf.get(k):
      raise InteropError(f"{where}: {k} is true; mor-jax layers have no biases.")
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling")
  if (scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default") or \
     rope.get("rope_type", "default") != "default":
    raise InteropError(f"{where}: RoPE scaling ({scaling or rope}) is not supported; only plain RoPE.")
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  return dict(vocab_size=int(hf["vocab_size"]), hidden_size=hidden, intermediate_size=int(hf["intermediate_size"]),
              num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
              num_kv_heads=int(hf.get("num_key_value_heads") or heads), rope_theta=float(theta),
              rms_eps=float(hf.get("rms_norm_eps", 1e-6)),   # transformers' LlamaConfig default
              max_seq_len=int(hf.get("max_position_embeddings", 2048)),
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              init_std=float(hf.get("initializer_range", 0.02)))


def check_dims(model_section, dims: dict, where: str) -> None:
  """Raises InteropError naming `config.model.<field>` where a config disagrees with a checkpoint's dims."""
  keys = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
          "tie_embeddings")
  diff = [f"config.model.{k} = {model_section[k]!r} but {where} has {dims[k]!r}" for k in keys
          if k in dims and model_section[k] != dims[k]]
  if diff:
    hint = (" (vocabulary mismatch: use the tokenizer/vocabulary the checkpoint was trained with)"
            if any("vocab_size" in d for d in diff) else "")
    raise InteropError("the config does not match the checkpoint: " + "; ".join(diff) + hint +
                       ". Set those fields to the checkpoint's values or leave --config out.")


def llama_config(cfg: ModelConfig, *, num_layers: int | None = None, bos_token_id=None, eos_token_id=None) -> dict:
  """A transformers `LlamaConfig` dict (readable by transformers 4.x and 5.x) for the dims of `cfg`."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": num_layers or cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
      "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_eps,
      "rope_theta": cfg.rope_theta, "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
      "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
      "mlp_bias": False, "initializer_range": cfg.init_std, "pretraining_tp": 1, "use_cache": True,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "torch_dtype": "float32", "dtype": "float32",
  }


# ------------------------------------------------------------------ writing
def write_safetensors(state_dict: dict, path: str, metadata: dict | None = None) -> None:
  """Writes float32 tensors (each key its own contiguous copy: transformers expects no aliasing)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tensors = {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in state_dict.items()}
  save_file(tensors, path, metadata={"format": "pt", **(metadata or {})})


def write_json(obj: dict, path: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def tokenizer_dir(path: str) -> str | None:
  """The folder holding tokenizer.json for a tokenizer path (file or folder), or None."""
  if not path:
    return None
  p = os.path.abspath(os.path.expanduser(path))
  folder = p if os.path.isdir(p) else os.path.dirname(p)
  return folder if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None


def copy_tokenizer(src_dir: str, dst_dir: str) -> list[str]:
  """Copies the tokenizer files present in `src_dir`; returns their names."""
  os.makedirs(dst_dir, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    s = os.path.join(src_dir, name)
    if os.path.isfile(s):
      shutil.copyfile(s, os.path.join(dst_dir, name))
      copied.append(name)
  return copied
