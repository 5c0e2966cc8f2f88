"""Parity with the PyTorch reference: `python -m mor_jax.tools.parity DIR [--tol 1e-4]`.

A fixture directory holds `config.json`, `weights.npz` (reference state dict),
`inputs.npz` (`input_ids`), `outputs.npz` (expected logits, losses, routing)
and optionally `grads.npz` (gradients of the total training loss). The tool
builds the model from config.json, loads the weights, runs the inputs and
prints the max abs difference per quantity; it exits 1 if any is above --tol.

DIR may also be a reference training output directory (what
`--mode=import` reads: `model.safetensors` or `pytorch_model.bin`, the HF
`config.json`, the run's YAML) that additionally holds `inputs.npz` and
`outputs.npz`; its weights and settings are read by
`mor_jax.interop.importer.load_source` (`--run_config` names the YAML).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def _ce_sum(logits, tokens):
  import jax
  import jax.numpy as jnp
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
  return jnp.sum(nll), nll.size


def _is_fixture(directory: str) -> bool:
  cfg_json = os.path.join(directory, "config.json")
  if not (os.path.isfile(cfg_json) and os.path.isfile(os.path.join(directory, "weights.npz"))):
    return False
  with open(cfg_json) as f:
    meta = json.load(f)
  return isinstance(meta.get("model"), dict) and "kind" in meta


def _load(directory: str, run_config: str | None = None):
  """(ModelConfig, every variable in the model's layout: params and, with loss-free balancing, the source's
  router_bias) of a fixture or a reference training output directory."""
  from mor_jax import config as C
  from mor_jax.interop import reference as ref
  from mor_jax.model.transformer import abstract_variables
  if _is_fixture(directory):
    with open(os.path.join(directory, "config.json")) as f:
      meta = json.load(f)
    cfg = C.model_config(C.validate(ref.config_from_reference(meta), num_devices=1))
    weights = dict(np.load(os.path.join(directory, "weights.npz")))
    variables = ref.variables_from_state_dict(cfg, weights)
    ref.check_shapes(cfg, variables["params"], abstract_variables(cfg)["params"])
    return cfg, variables
  from mor_jax.interop import importer, layout, weights
  src = importer.load_source(directory, run_config=run_config)
  cfg = C.model_config(C.validate(src.config, num_devices=1))
  variables = weights.variables_from_weights(cfg, src.state_dict)
  return cfg, {**variables, "params": layout.to_model_layout(cfg, variables["params"])}


def compute(fixture_dir: str, run_config: str | None = None):
  """Returns (ours: dict name->array, expected: dict name->array) for a fixture or reference output directory."""
  import jax
  import jax.numpy as jnp
  from mor_jax.interop import layout
  from mor_jax.interop import reference as ref
  from mor_jax.model.transformer import MoRLM

  for name in ("inputs.npz", "outputs.npz"):
    if not os.path.isfile(os.path.join(fixture_dir, name)):
      raise SystemExit(f"error: {fixture_dir} has no {name}; parity needs the fixture-format inputs.npz "
                       "(input_ids) and outputs.npz (logits_eval, ...) next to the weights.")
  cfg, variables = _load(fixture_dir, run_config)
  variables = jax.tree.map(jnp.asarray, variables)
  params = variables["params"]
  tokens = jnp.asarray(np.load(os.path.join(fixture_dir, "inputs.npz"))["input_ids"], jnp.int32)
  expected = dict(np.load(os.path.join(fixture_dir, "outputs.npz")))
  model = MoRLM(cfg)
  B, T = tokens.shape

  def total_loss(p):
    logits, aux = model.apply({**variables, "params": p}, tokens)
    ce_sum, _ = _ce_sum(logits, tokens)
    return ce_sum / (B * T) + aux["aux_loss"], (logits, aux)

  grads_path = os.path.join(fixture_dir, "grads.npz")
  if os.path.exists(grads_path):
    (total, (logits, aux)), grads = jax.jit(jax.value_and_grad(total_loss, has_aux=True))(params)
  else:                          # nothing to compare gradients with: the forward pass alone compiles faster
    logits, aux = jax.jit(model.apply)(variables, tokens)
    total = _ce_sum(logits, tokens)[0] / (B * T) + aux["aux_loss"]
  ce_sum, n = _ce_sum(logits, tokens)
  ours = {"logits_train": logits, "logits_eval": logits, "loss_eval": ce_sum / n, "loss_train": ce_sum / (B * T),
          "total_loss_train": total}
  if cfg.mor_enable and cfg.mor_type == "expert":
    ours["sampling_loss"] = aux["sampling_loss"]
    ours["sampling_acc"] = aux["sampling_acc"]
    if cfg.z_loss:
      ours["router_z_loss"] = aux["z_loss"]
    for split in ("train", "eval"):
      for r in range(cfg.recursions):
        ours[f"selected_tokens_{split}_r{r}"] = aux["selected"][r]
        ours[f"router_logits_{split}_r{r}"] = aux["router_logits"][r]
  elif cfg.mor_enable:
    if cfg.balancing == "loss":   # the reference computes the balancing loss only then (it reports 0 otherwise)
      ours["balancing_loss"] = aux["balancing_loss"]
    ours["balancing_ratio"] = aux["balancing_ratio"]
    ours["router_z_loss"] = aux["z_loss"]
    for split in ("train", "eval"):
      ours[f"router_logits_{split}_r0"] = aux["router_logits"][0]
      ours[f"token_depth_index_{split}"] = aux["depth"]
  if os.path.exists(grads_path):
    ref_grads = dict(np.load(grads_path))
    ours_sd = ref.state_dict_from_params(cfg, layout.to_stacked_layout(cfg, jax.device_get(grads)))
    for _, _, keys, _ in ref.reference_layout(cfg):
      present = [k for k in keys if k in ref_grads]
      if present:
        ours["grad:" + present[0]] = ours_sd[present[0]]
        expected["grad:" + present[0]] = ref_grads[present[0]]
  ours = {k: np.asarray(v) for k, v in ours.items()}
  return ours, expected


def compare(ours: dict, expected: dict):
  """Max abs difference for every quantity present in both (shape mismatch -> inf)."""
  rows = []
  for k in expected:
    if k not in ours:
      continue
    a, b = np.asarray(ours[k], np.float64), np.asarray(expected[k], np.float64)
    diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
    rows.append((k, diff))
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("fixture_dir", help="a fixture directory or a reference training output directory")
  parser.add_argument("--tol", type=float, default=1e-4)
  parser.add_argument("--run_config", default=None, help="the run's YAML when DIR holds several or none")
  args = parser.parse_args(argv)
  try:
    ours, expected = compute(args.fixture_dir, args.run_config)
  except ValueError as e:          # InteropError, ReferenceMappingError, ConfigError: say what is wrong
    print(f"error: {e}", file=sys.stderr)
    return 2
  rows = compare(ours, expected)
  skipped = sorted(set(expected) - set(ours))
  worst = 0.0
  grads = [d for k, d in rows if k.startswith("grad:")]
  for k, d in rows:
    if not k.startswith("grad:"):
      print(f"{k:40s} max|diff| = {d:.3e}  {'OK' if d <= args.tol else 'FAIL'}")
    worst = max(worst, d)
  if grads:
    g = max(grads)
    what = f"gradients ({len(grads)} tensors)"
    print(f"{what:40s} max|diff| = {g:.3e}  {'OK' if g <= args.tol else 'FAIL'}")
  if skipped:
    print("not compared:", ", ".join(skipped))
  ok = worst <= args.tol
  name = os.path.basename(os.path.normpath(args.fixture_dir))
  print(f"{name}: {'PASS' if ok else 'FAIL'} (tol {args.tol:g}, worst {worst:.3e})")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
