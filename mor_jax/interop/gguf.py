"""GGUF (llama.cpp) files -> a mor-jax workdir: `--mode=import --import_from=MODEL.gguf --workdir=OUT`.

A GGUF file carries a model's config, weights and tokenizer in one file: the
config as `llama.*` metadata, the weights quantised (Q4_1, Q8_0, ...) under
llama.cpp's tensor names, the tokenizer as `tokenizer.ggml.*` metadata (and
`tokenizer.chat_template`). The import

- turns the metadata into a Hugging Face Llama `config.json` dict and checks
  it with `hf.llama_dims` (what the model cannot express is rejected there);
- dequantises every tensor to float32 (`gguf.quants.dequantize`), renames it
  to its Hugging Face name and undoes llama.cpp's row permutation of the
  query/key projections (llama.cpp's RoPE rotates interleaved pairs, HF's
  rotates halves), then maps the HF state dict with `weights.params_from_weights`;
  a file without `output.weight` has tied embeddings;
- builds a `tokenizers` tokenizer.json (byte-level BPE) from the metadata and
  writes it with a `tokenizer_config.json` (BOS/EOS, chat template) into
  `OUT/tokenizer/`, which the stored config's data.tokenizer_path points to
  (generate and eval load it from there);
- writes step 0 in the trainer's format and prints the next-token prediction
  of a probe sentence.

Only the `gguf` package is needed (no torch, no llama.cpp).
"""

from __future__ import annotations

import os

import numpy as np

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as config_lib
from mor_jax.checkpoint import params as ckpt_params
from mor_jax import chat_template
from mor_jax.errors import ChatTemplateError, InteropError
from mor_jax.interop import hf
from mor_jax.interop import importer
from mor_jax.interop import weights

PROBE_TEXT = "The capital of France is"
GGUF_PIN = "gguf==0.19.0"
# llama.cpp names -> Hugging Face Llama names ("blk.{i}.<part>.weight" -> "model.layers.{i}.<name>.weight")
LAYER_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL, USER_DEFINED = 3, 4          # tokenizer.ggml.token_type values (gguf.TokenType)
# tokenizer.ggml.pre -> how text is split before BPE (llama.cpp's llama-vocab.cpp); None = GPT-2's regex
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": None, "gpt2": None, "gpt-2": None, "smollm": "digits", "starcoder": "digits",
                  "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
                  "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


# ------------------------------------------------------------------ reading
def open_gguf(path: str):
  """(gguf.GGUFReader, metadata dict) of a GGUF file, with clear errors."""
  if not os.path.isfile(path):
    raise InteropError(f"--import_from {path} does not exist (expected a .gguf file).")
  try:
    import gguf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InteropError(f"reading {os.path.basename(path)} needs the gguf package: pip install {GGUF_PIN}") from None
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError, KeyError) as e:
    raise InteropError(f"{path} is not a readable GGUF file ({e}).") from None
  meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
  return reader, meta


def hf_config(meta: dict, tensor_names, where: str) -> dict:
  """A Hugging Face Llama `config.json` dict from the file's `llama.*` metadata (checked by `hf.llama_dims`)."""
  arch = meta.get("general.architecture")
  if arch != "llama":
    raise InteropError(f"{where}: general.architecture is {arch!r}; only Llama-architecture GGUF files (Llama, "
                       "SmolLM, Mistral-style dense models) can be imported.")
  a = lambda key, default=None: meta.get(f"llama.{key}", default)
  missing = [f"llama.{k}" for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
             if a(k) is None]
  if missing:
    raise InteropError(f"{where} lacks the metadata {', '.join(missing)}; was it written by llama.cpp's converter?")
  if int(a("expert_count", 0) or 0) > 0:
    raise InteropError(f"{where}: a mixture-of-experts Llama (llama.expert_count = {a('expert_count')}) cannot be "
                       "imported; only dense models.")
  scaling = a("rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
    raise InteropError(f"{where}: RoPE scaling ({scaling if scaling not in ('none', None) else 'rope_freqs'}) is "
                       "not supported; only plain RoPE.")
  heads, hidden = int(a("attention.head_count")), int(a("embedding_length"))
  kv = a("attention.head_count_kv", heads)
  if isinstance(kv, list):                                  # per-layer head counts
    if len(set(kv)) != 1:
      raise InteropError(f"{where}: llama.attention.head_count_kv differs between layers ({sorted(set(kv))}).")
    kv = kv[0]
  rot = a("rope.dimension_count", hidden // heads)
  if int(rot) != hidden // heads:
    raise InteropError(f"{where}: llama.rope.dimension_count {rot} != head_dim {hidden // heads}; partial rotary "
                       "embeddings are not supported.")
  vocab = a("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ())
  eps = float(a("attention.layer_norm_rms_epsilon", 1e-5))
  return {"model_type": "llama", "vocab_size": int(vocab), "hidden_size": hidden,
          "intermediate_size": int(a("feed_forward_length")), "num_hidden_layers": int(a("block_count")),
          "num_attention_heads": heads, "num_key_value_heads": int(kv), "head_dim": a("attention.key_length"),
          "rope_theta": float(a("rope.freq_base", 10000.0)), "rms_norm_eps": float(f"{eps:.7g}"),  # float32 in the file
          "max_position_embeddings": int(a("context_length", 2048)),
          "tie_word_embeddings": "output.weight" not in tensor_names}


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face Llama name of a llama.cpp tensor name, or None if the model has no such tensor."""
  parts = gguf_name.split(".")
  if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" \
     and parts[2] in LAYER_TENSORS:
    return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.weight"
  if len(parts) == 2 and parts[1] == "weight" and parts[0] in GLOBAL_TENSORS:
    return f"{GLOBAL_TENSORS[parts[0]]}.weight"
  return None


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undoes llama.cpp's permutation of query/key rows (its converter's `permute`) for `n_head` heads.

  llama.cpp stores each head's rows as interleaved (first-half, second-half)
  pairs, HF Llama as the two halves one after the other.
  """
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def state_dict(reader, hfc: dict, where: str) -> dict[str, np.ndarray]:
  """All tensors as float32 numpy under their Hugging Face Llama names ([out, in] matrices, q/k un-permuted)."""
  import gguf  # pylint: disable=g-import-not-at-top
  unknown = [t.name for t in reader.tensors if hf_name(t.name) is None]
  if unknown:
    raise InteropError(f"{where} has {len(unknown)} tensors a Llama model without biases does not have (e.g. "
                       f"{unknown[:3]}); it cannot be imported.")
  heads, kv = hfc["num_attention_heads"], hfc["num_key_value_heads"]
  sd = {}
  for t in reader.tensors:
    name = hf_name(t.name)
    try:
      w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError:
      raise InteropError(f"{where}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf package "
                         "cannot dequantise; convert the file to another quantisation (e.g. Q8_0 or F16).") from None
    w = w.reshape(tuple(int(n) for n in reversed(t.shape)))       # GGUF lists dims innermost first
    if ".q_proj." in name:
      w = unpermute(w, heads)
    elif ".k_proj." in name:
      w = unpermute(w, kv)
    sd[name] = w
  return sd


# ------------------------------------------------------------------ tokenizer
def _pre_tokenizer(kind):
  from tokenizers import Regex, pre_tokenizers  # pylint: disable=g-import-not-at-top
  if kind is None:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind == "digits":                      # each digit alone, then GPT-2's regex (SmolLM, StarCoder)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(kind), behavior="isolated"),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def build_tokenizer(meta: dict, where: str):
  """(tokenizers.Tokenizer or None, notes): the byte-level BPE the metadata describes (tokenizer.ggml.model gpt2)."""
  from tokenizers import AddedToken, Tokenizer, decoders, models  # pylint: disable=g-import-not-at-top
  kind = meta.get("tokenizer.ggml.model")
  tokens = meta.get("tokenizer.ggml.tokens")
  if kind != "gpt2" or not tokens:
    return None, [f"{where} describes a {kind!r} tokenizer; only byte-level BPE (gpt2) is rebuilt: set "
                  "--tokenizer=PATH (the model's tokenizer.json) for generate and eval"]
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    return None, [f"{where}: tokenizer.ggml.tokens repeats tokens; generate and eval need --tokenizer=PATH"]
  merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or ()]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
  notes = []
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    notes.append(f"unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre): text is split with GPT-2's regex, which may "
                 "tokenize differently from llama.cpp")
  tok.pre_tokenizer = _pre_tokenizer(PRE_TOKENIZERS.get(pre))
  tok.decoder = decoders.ByteLevel()
  types = list(meta.get("tokenizer.ggml.token_type") or ())
  special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
  tok.add_special_tokens(special)
  tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
  if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
    return None, [f"{where}: the rebuilt tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens, not "
                  f"{len(tokens)}; generate and eval need --tokenizer=PATH"]
  return tok, notes


def tokenizer_config(meta: dict) -> dict:
  """The transformers `tokenizer_config.json` (special tokens, chat template) from the metadata."""
  tokens = meta["tokenizer.ggml.tokens"]
  out = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
         "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
         "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
         "model_max_length": int(meta.get("llama.context_length", 2048))}
  for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                    ("pad_token", "padding_token_id")):
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is not None and 0 <= int(i) < len(tokens):
      out[name] = tokens[int(i)]
  if meta.get("tokenizer.chat_template"):
    out["chat_template"] = meta["tokenizer.chat_template"]
  return out


def write_tokenizer(meta: dict, directory: str, where: str) -> tuple[bool, list]:
  """Writes tokenizer.json + tokenizer_config.json into `directory`; (written, notes)."""
  tok, notes = build_tokenizer(meta, where)
  if tok is None:
    return False, notes
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  hf.write_json(tokenizer_config(meta), os.path.join(directory, "tokenizer_config.json"))
  return True, notes


def apply_chat_template(tokenizer_dir: str, messages, add_generation_prompt: bool = True) -> str:
  """The prompt text for chat `messages` ([{role, content}]) with the chat template stored in tokenizer_dir."""
  try:
    return chat_template.render(chat_template.settings(tokenizer_dir), messages, add_generation_prompt)
  except ChatTemplateError as e:
    raise InteropError(str(e)) from None


# ------------------------------------------------------------------ import
def load_gguf(path: str, config=None):
  """(mor-jax config, its ModelConfig, HF state dict, metadata, notes) of a GGUF file; `config` overrides settings."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  where = os.path.basename(path)
  reader, meta = open_gguf(path)
  names = {t.name for t in reader.tensors}
  hfc = hf_config(meta, names, where)
  dims = hf.llama_dims(hfc, where)
  notes = [f"{meta.get('general.name', where)}: {len(names)} tensors dequantised to float32 "
           f"({sorted({t.tensor_type.name for t in reader.tensors})})"]
  if config is not None:
    c = ml_collections.ConfigDict(config.to_dict())
    hf.check_dims(c.model, dims, where)
    for k in ("rope_theta", "rms_eps"):            # the file's values: others would change every logit
      if float(c.model[k]) != dims[k]:
        notes.append(f"config.model.{k} = {c.model[k]} replaced by the file's {dims[k]}")
        c.model[k] = dims[k]
  else:
    c = importer.config_from_meta(importer.reference_meta(dims, None))
    c.name = os.path.splitext(where)[0]
  try:                                             # before the heavy part: dequantising
    cfg = config_lib.model_config(config_lib.validate(c, num_devices=1))
  except config_lib.ConfigError as e:
    raise InteropError(f"the settings from {where} do not make a valid mor-jax model: {e}") from None
  return c, cfg, state_dict(reader, hfc, where), meta, notes


def import_gguf(path: str, workdir: str, *, config=None, log=print):
  """The whole GGUF import (see the module docstring); returns an `importer.ImportResult`."""
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  path, workdir = (os.path.abspath(os.path.expanduser(p)) for p in (path, workdir))
  ckpt_lib.require_new_workdir(workdir)
  c, cfg, sd, meta, notes = load_gguf(path, config)
  params = weights.params_from_weights(cfg, sd)
  del sd
  tok_dir = os.path.join(workdir, ckpt_params.TOKENIZER_SUBDIR)
  written, tok_notes = write_tokenizer(meta, tok_dir, os.path.basename(path))
  notes += tok_notes
  if written and not c.data.tokenizer_path:
    c.data.tokenizer_path = tok_dir
    notes.append(f"tokenizer (and chat template) written to {tok_dir}")
  elif written:
    notes.append(f"kept config.data.tokenizer_path={c.data.tokenizer_path}; the file's tokenizer is in {tok_dir}")
  step_dir = importer.write_checkpoint(c, params, workdir, extra_meta={
      "imported_from": path, "import_settings": "GGUF metadata", **ckpt_params.store_tokenizer(workdir)})
  restored = infer_ckpt.restore(workdir)
  tok = (infer_ckpt.load_tokenizer(restored.config, restored.cfg, directory=restored.directory)
         if c.data.tokenizer_path else None)
  ids = tok.encode(PROBE_TEXT) if tok is not None else [1, 2, 3, 4]
  tokens = np.asarray([ids], np.int32)
  logits = np.asarray(jax.device_get(importer.forward(restored.cfg)(restored.variables, tokens)))
  np.savez(os.path.join(workdir, importer.PROBE_FILE), tokens=tokens, logits=logits)
  log(f"imported {path} -> {step_dir}")
  log(f"model: {infer_ckpt.describe(restored)}")
  for note in notes:
    log(f"note: {note}")
  top = int(np.argmax(logits[0, -1]))
  shown = f"{PROBE_TEXT!r} -> {tok.decode([top])!r}" if tok is not None else f"{ids} -> {top}"
  log(f"probe: next token {shown} (id {top}); logits in {os.path.join(workdir, importer.PROBE_FILE)}")
  log(f"Use it: python main.py --mode=generate --workdir={workdir} --prompt=...")
  return importer.ImportResult(config=c, cfg=restored.cfg, workdir=workdir, step_dir=step_dir, tokens=tokens,
                               logits=logits, max_diff=None, notes=notes)
