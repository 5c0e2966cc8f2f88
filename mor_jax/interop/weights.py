"""Reference / Hugging Face state dict -> every variable of our model, with errors that say what does not fit.

`params_from_weights` maps the weights (`reference.py`'s layout; shared tensors that a save de-duplicated are
taken from the copy present, copies present must be equal); `variables_from_weights` adds the other variables
of the source (the token-choice loss-free router bias), so an import routes exactly as the source did.
"""

from __future__ import annotations

import functools

import numpy as np

from mor_jax import config as config_lib
from mor_jax.interop import layout
from mor_jax.interop import reference as ref
from mor_jax.errors import InteropError

UNTIED_HINT = (" mor-jax shares the block's attention across recursions (as the paper and the upstream code do), so "
               "these weights cannot be imported as they are: use a checkpoint trained with shared attention (the "
               "upstream fix), or retrain.")


def params_from_weights(cfg: config_lib.ModelConfig, state_dict: dict) -> dict:
  """Our params (stacked layout, float32 numpy) from a reference/HF state dict, with clear errors.

  Shared tensors that a save de-duplicated (safetensors keeps one name of a
  shared parameter) are taken from the copy present; copies that are present
  must be equal (untied attention is reported). Unexpected keys mean the
  config does not describe the checkpoint and are an error.
  """
  sd = dict(state_dict)
  entries = ref.reference_layout(cfg)
  known = {k for _, _, keys, _ in entries for k in keys} | {ref.router_bias_key(cfg)}
  head = sd.pop("lm_head.weight", None) if cfg.tie_embeddings else None
  extra = sorted(k for k in sd if k not in known)
  if extra:
    raise InteropError(f"the checkpoint has {len(extra)} tensors the model does not use (e.g. {extra[:3]}): the "
                       "sharing / recursion / MoR settings or num_hidden_layers do not describe these weights. Pass "
                       "the run's YAML (--import_run_config) or a --config that matches.")
  abstract = layout.stacked_shapes(cfg, abstract_params(cfg))
  vocab, hidden = abstract["embed"]["embedding"].shape
  emb = sd.get("model.embed_tokens.weight")
  if emb is not None and emb.shape != (vocab, hidden):
    what = "vocabulary mismatch" if emb.shape[0] != vocab else "dimension mismatch"
    raise InteropError(f"{what}: model.embed_tokens.weight is {list(emb.shape)} but the config says vocab_size "
                       f"{vocab} x hidden_size {hidden}. Set config.model.vocab_size / hidden_size to the "
                       "checkpoint's (its config.json may belong to another model).")
  if head is not None and emb is not None and not np.array_equal(head, emb):
    raise InteropError("tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight "
                       f"(max abs diff {np.max(np.abs(head - emb)):.3g}); set config.model.tie_embeddings=False "
                       "(tie_word_embeddings: false in config.json).")
  for _, _, keys, _ in entries:
    present = [k for k in keys if k in sd]
    for k in keys:
      if present and k not in sd:
        sd[k] = sd[present[0]]
  try:
    params = ref.params_from_state_dict(cfg, sd)
  except ref.ReferenceMappingError as e:
    msg = str(e)
    raise InteropError(msg + (UNTIED_HINT if "untied" in msg else "")) from None
  try:
    ref.check_shapes(cfg, params, abstract)
  except ref.ReferenceMappingError as e:
    raise InteropError(f"dimension mismatch: {e}. The config (config.json or --config) does not describe these "
                       "weights: check intermediate_size, num_attention_heads and num_key_value_heads.") from None
  return params


def variables_from_weights(cfg: config_lib.ModelConfig, state_dict: dict) -> dict:
  """Every variable of the source: {'params': `params_from_weights`, and with loss-free balancing 'router_bias':
  {'bias': the source's bias}} (stacked layout, float32 numpy)."""
  out = {"params": params_from_weights(cfg, state_dict)}
  try:
    bias = ref.router_bias_from_state_dict(cfg, state_dict)
  except ref.ReferenceMappingError as e:
    raise InteropError(str(e)) from None
  if bias:
    out["router_bias"] = bias
  return out


@functools.lru_cache(maxsize=16)
def abstract_params(cfg: config_lib.ModelConfig):
  """Shapes of the model's params (traced once per config)."""
  from mor_jax.model.transformer import abstract_variables  # pylint: disable=g-import-not-at-top
  return abstract_variables(cfg)["params"]
