"""Param-tree layouts: the stacked layout the interop mappings use vs the model's own.

`reference.py` maps state dicts onto params whose shared block is stacked
(`block/layers/<sub>` with a leading layer axis), which is what the model
holds with `scan_layers=True`. With `scan_layers=False` the model names the
block's layers `block/layer_<i>` instead; these two helpers convert, so every
interop path works with either setting.
"""

from __future__ import annotations

import numpy as np

from mor_jax.config import ModelConfig


def to_model_layout(cfg: ModelConfig, params: dict) -> dict:
  """Stacked layout -> the layout `MoRLM(cfg)` expects (unstacks the block when scan_layers is off)."""
  if cfg.scan_layers or "layers" not in params.get("block", {}):
    return params
  stacked = params["block"]["layers"]
  out = dict(params)
  out["block"] = {f"layer_{i}": _map(lambda a, i=i: a[i], stacked) for i in range(cfg.base_depth)}
  return out


def to_stacked_layout(cfg: ModelConfig, params: dict) -> dict:
  """The model's layout -> stacked layout (inverse of `to_model_layout`); arrays become numpy."""
  return _stacked(cfg, _map(np.asarray, params), lambda *a: np.stack(a))


def stacked_shapes(cfg: ModelConfig, abstract_params: dict) -> dict:
  """`jax.ShapeDtypeStruct`s of the model's params, in stacked layout (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  return _stacked(cfg, abstract_params,
                  lambda *a: jax.ShapeDtypeStruct((len(a),) + tuple(a[0].shape), a[0].dtype))


def _stacked(cfg, params, stack):
  block = params.get("block", {})
  if "layers" in block or not any(k.startswith("layer_") for k in block):
    return params
  layers = [block[f"layer_{i}"] for i in range(cfg.base_depth)]
  out = dict(params)
  out["block"] = {"layers": _map(stack, *layers)}
  return out


def _map(fn, *trees):
  """jax.tree.map for nested dicts of arrays, without importing jax."""
  if isinstance(trees[0], dict):
    return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)
