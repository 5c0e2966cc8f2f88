"""Maps PyTorch-reference state dicts (exact key names, [out, in] matrices) onto our params.

The reference stores a shared tensor once per use (e.g. `model.layers.1.*` and
`model.layers.4.*` for a middle_cycle R=2 block). `reference_layout` lists, for
every leaf of our param tree, all reference keys that must hold that tensor;
`params_from_state_dict` takes the first and checks that the others are equal,
so a checkpoint whose attention was untied across recursions (a bug of one
reference fork) is rejected with the keys that differ.
"""

from __future__ import annotations

import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.errors import InteropError

# our sub-path inside a decoder layer -> (reference suffix, transpose?)
LAYER_KEYS = {
    ("attn", "q_proj", "kernel"): ("self_attn.q_proj.weight", True),
    ("attn", "k_proj", "kernel"): ("self_attn.k_proj.weight", True),
    ("attn", "v_proj", "kernel"): ("self_attn.v_proj.weight", True),
    ("attn", "o_proj", "kernel"): ("self_attn.o_proj.weight", True),
    ("mlp", "gate_proj", "kernel"): ("mlp.gate_proj.weight", True),
    ("mlp", "up_proj", "kernel"): ("mlp.up_proj.weight", True),
    ("mlp", "down_proj", "kernel"): ("mlp.down_proj.weight", True),
    ("input_norm", "scale"): ("input_layernorm.weight", False),
    ("post_attn_norm", "scale"): ("post_attention_layernorm.weight", False),
}


class ReferenceMappingError(InteropError):
  """The state dict does not fit the config (missing keys, untied shared tensors, shapes)."""


def _block_prefixes(cfg: ModelConfig):
  """For each block position j: the reference layer prefixes that use it (all recursions)."""
  L, R, D = cfg.num_layers, cfg.recursions, cfg.base_depth
  uses = {j: [] for j in range(D)}
  first = last = None
  if cfg.mor_enable and cfg.mor_type == "expert":
    off = 1 if cfg.has_middle else 0
    for r in range(R):
      for j in range(D):
        uses[j].append(f"model.layers.{off + r}.block.{j}.")
    if cfg.has_middle:
      first, last = "model.layers.0.", f"model.layers.{R + 1}."
  elif cfg.mor_enable:
    off = 1 if cfg.has_middle else 0
    for r in range(R):
      for j in range(D):
        uses[j].append(f"model.layers.{off}.block_list.{r}.{j}.")
    if cfg.has_middle:
      first, last = "model.layers.0.", "model.layers.2."
  else:
    middle = cfg.has_middle
    body = range(1, L - 1) if middle else range(L)
    for n, i in enumerate(body):
      if cfg.strategy in ("sequence", "middle_sequence"):
        j = n // R
      else:
        j = n % D
      uses[j].append(f"model.layers.{i}.")
    if middle:
      first, last = "model.layers.0.", f"model.layers.{L - 1}."
  return uses, first, last


def reference_layout(cfg: ModelConfig):
  """List of (our_path, layer_index_or_None, [reference keys], transpose)."""
  out = [(("embed", "embedding"), None, ["model.embed_tokens.weight"], False),
         (("final_norm", "scale"), None, ["model.norm.weight"], False)]
  if not cfg.tie_embeddings:
    out.append((("lm_head", "kernel"), None, ["lm_head.weight"], True))
  uses, first, last = _block_prefixes(cfg)
  for name, prefix in (("first", first), ("last", last)):
    if prefix:
      for sub, (suffix, tr) in LAYER_KEYS.items():
        out.append(((name,) + sub, None, [prefix + suffix], tr))
  for j, prefixes in uses.items():
    for sub, (suffix, tr) in LAYER_KEYS.items():
      out.append((("block", "layers") + sub, j, [p + suffix for p in prefixes], tr))
  if cfg.mor_enable and cfg.mor_type == "expert":
    off = 1 if cfg.has_middle else 0
    for r in range(cfg.recursions):
      base = f"model.layers.{off + r}.mor_router.router."
      if cfg.router_type == "linear":
        out.append(((f"router_{r}", "dense", "kernel"), None, [base + "weight"], True))
      else:
        out.append(((f"router_{r}", "fc1", "kernel"), None, [base + "0.weight"], True))
        out.append(((f"router_{r}", "fc2", "kernel"), None, [base + "2.weight"], True))
  elif cfg.mor_enable:
    off = 1 if cfg.has_middle else 0
    base = f"model.layers.{off}.mor_router.router."
    if cfg.router_type == "linear":
      out.append((("router", "dense", "kernel"), None, [base + "weight"], True))
    else:
      out.append((("router", "fc1", "kernel"), None, [base + "0.weight"], True))
      out.append((("router", "fc2", "kernel"), None, [base + "2.weight"], True))
  return out


def params_from_state_dict(cfg: ModelConfig, state_dict, *, atol: float = 0.0) -> dict:
  """Builds our param tree (numpy float32) from a reference state dict.

  Raises ReferenceMappingError for a missing key, a shape mismatch, or
  tensors that the model shares but the state dict holds with different
  values (e.g. attention untied across recursions).
  """
  params: dict = {}
  stacks: dict = {}
  for path, j, keys, tr in reference_layout(cfg):
    missing = [k for k in keys if k not in state_dict]
    if missing:
      raise ReferenceMappingError(f"state dict lacks {missing[0]!r} (needed for {'/'.join(path)}); "
                                  f"is the config (sharing, recursions, MoR type) the one it was trained with?")
    first = np.asarray(state_dict[keys[0]], np.float32)
    for k in keys[1:]:
      other = np.asarray(state_dict[k], np.float32)
      if other.shape != first.shape or not np.allclose(other, first, atol=atol, rtol=0):
        diff = np.max(np.abs(other - first)) if other.shape == first.shape else float("nan")
        raise ReferenceMappingError(
            f"{keys[0]!r} and {k!r} should be one shared tensor but differ (max abs diff {diff:.3g}). "
            "This checkpoint has parameters untied across recursions (the reference fork's MoR transform "
            "re-creates attention per recursion); it cannot be represented with a shared block.")
    val = first.T if tr else first
    if j is None:
      _set(params, path, val)
    else:
      stacks.setdefault(path, {})[j] = val
  for path, per_layer in stacks.items():
    _set(params, path, np.stack([per_layer[j] for j in range(len(per_layer))]))
  return params


def state_dict_from_params(cfg: ModelConfig, params) -> dict:
  """Inverse mapping: every reference key (shared tensors repeated under each key)."""
  out = {}
  for path, j, keys, tr in reference_layout(cfg):
    val = np.asarray(_get(params, path), np.float32)
    if j is not None:
      val = val[j]
    for k in keys:
      out[k] = val.T if tr else val
  return out


def router_bias_key(cfg: ModelConfig) -> str | None:
  """The reference's key of the token-choice loss-free balancing bias ([R], a buffer of the MoR layer), or None
  when the model has none."""
  if not (cfg.mor_enable and cfg.mor_type == "token" and cfg.balancing == "loss_free"):
    return None
  return f"model.layers.{1 if cfg.has_middle else 0}.router_bias"


def router_bias_from_state_dict(cfg: ModelConfig, state_dict) -> dict:
  """The `router_bias` collection ({'bias': [R]} numpy float32) of a reference state dict; {} when the model has
  no bias. The bias routes tokens, so it is carried, never zeroed."""
  key = router_bias_key(cfg)
  if key is None:
    return {}
  if key not in state_dict:
    raise ReferenceMappingError(f"state dict lacks {key!r}, the loss-free balancing bias (needed for router_bias/"
                                "bias); is mor balancing 'loss_free' the setting it was trained with?")
  bias = np.asarray(state_dict[key], np.float32)
  if bias.shape != (cfg.recursions,):
    raise ReferenceMappingError(f"{key!r} has shape {list(bias.shape)}, expected [{cfg.recursions}] (one per "
                                "recursion).")
  return {"bias": bias}


def variables_from_state_dict(cfg: ModelConfig, state_dict, *, atol: float = 0.0) -> dict:
  """Every variable of the model from a reference state dict: {'params': ..., and with loss-free balancing
  'router_bias': {'bias': [R]}} (numpy float32)."""
  out = {"params": params_from_state_dict(cfg, state_dict, atol=atol)}
  bias = router_bias_from_state_dict(cfg, state_dict)
  if bias:
    out["router_bias"] = bias
  return out


def state_dict_from_variables(cfg: ModelConfig, variables) -> dict:
  """Inverse of `variables_from_state_dict`: every reference key, the loss-free bias included."""
  out = state_dict_from_params(cfg, variables["params"])
  key = router_bias_key(cfg)
  if key is not None:
    out[key] = np.asarray(variables["router_bias"]["bias"], np.float32)
  return out


def check_shapes(cfg: ModelConfig, params, abstract_params):
  import jax
  flat_a = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  flat_p = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  if set(flat_a) != set(flat_p):
    raise ReferenceMappingError(f"param trees differ: only in model {sorted(set(flat_a) - set(flat_p))[:5]}, "
                                f"only in state dict {sorted(set(flat_p) - set(flat_a))[:5]}")
  for k, s in flat_a.items():
    if tuple(s) != tuple(flat_p[k]):
      raise ReferenceMappingError(f"{k}: state dict shape {flat_p[k]} != model shape {s}")


def _set(tree, path, val):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = val


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def config_from_reference(meta: dict):
  """A mor-jax ConfigDict from a fixture-style `config.json` (neutral dims + routing settings)."""
  from mor_jax.config import defaults  # noqa: PLC0415
  m = meta["model"]
  c = defaults()
  c.model.update(vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                 num_layers=m["num_hidden_layers"], num_heads=m["num_attention_heads"],
                 num_kv_heads=m["num_key_value_heads"], rope_theta=float(m.get("rope_theta", 10000.0)),
                 rms_eps=float(m.get("rms_norm_eps", 1e-5)), max_seq_len=m.get("max_position_embeddings", 2048),
                 tie_embeddings=bool(m.get("tie_word_embeddings", False)),
                 init_std=float(m.get("initializer_range", 0.02)))
  c.data.seq_len = min(c.data.seq_len, c.model.max_seq_len)
  kind = meta.get("kind", "vanilla")
  if kind != "vanilla":
    c.recursion.strategy = meta["sharing"]
    c.recursion.num_recursions = int(meta["num_recursion"])
  if kind.startswith("mor"):
    rt = meta["router"]
    c.mor.enable = True
    c.mor.type = meta.get("mor_type", kind.split("_")[1])
    c.mor.router_type = rt.get("router_type", "linear")
    c.mor.router_func = rt.get("router_func", "sigmoid")
    c.mor.alpha = float(rt.get("alpha", 0.1))
    c.mor.router_temperature = float(rt.get("temp", 1.0))
    c.mor.gating = rt.get("gating", "weighted")
    c.mor.z_loss = bool(rt.get("z_loss", False))
    c.mor.z_coeff = float(rt.get("z_coeff", 1e-3))
    if c.mor.type == "expert":
      c.mor.capacity_fractions = tuple(float(x) for x in meta.get("capacity", ()))
      c.mor.expert_router_loss = {"aux_loss": "bce"}.get(rt.get("sampling", "aux_loss"), rt.get("sampling"))
      c.mor.aux_coeff = float(rt.get("aux_coeff", 1e-3))
    else:
      c.mor.balancing = rt.get("balancing", "loss")
      c.mor.bal_coeff = float(rt.get("bal_coeff", 0.1))
      c.mor.bal_update_rate = float(rt.get("u", 1e-3))   # the reference's mor.token.u (loss-free bias step)
  c.kv_sharing.enable = bool(meta.get("kv_sharing", False))
  if meta.get("attention_shared_across_recursions_fix") is False and kind == "mor_expert":
    pass  # untied attention: params_from_state_dict reports it
  return c
