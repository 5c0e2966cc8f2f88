"""--mode=import: reference training output directories (built here from the fixtures in tests/refdata in the
format the PyTorch reference writes: model.safetensors with de-duplicated shared tensors, HF config.json, run YAML)
reproduce the reference logits through the written Orbax checkpoint; clear errors; the parity tool on such a
directory; an MoR export read back. No torch needed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from mor_jax.infer import checkpoint as infer_ckpt
from mor_jax.interop import exporter, hf, importer, weights
from mor_jax.errors import CheckpointError, InteropError
from mor_jax.tools import parity

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFDATA = os.path.join(ROOT, "tests", "refdata")
RECURSIVE = "02_recursive_middle_cycle_rec2"
MOR = "06s_mor_expert_middle_cycle_rec2_linear_sharedattn"

pytestmark = pytest.mark.usefixtures("fast_compilation")


def reference_dir(name, dst, *, weights=None, hf_overrides=None, run=True, io=True):
  """A directory like the reference's training output for fixture `name`."""
  src = os.path.join(REFDATA, name)
  with open(os.path.join(src, "config.json")) as f:
    meta = json.load(f)
  os.makedirs(dst, exist_ok=True)
  m = meta["model"]
  hf_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m["vocab_size"],
            "hidden_size": m["hidden_size"], "intermediate_size": m["intermediate_size"],
            "num_hidden_layers": m["num_hidden_layers"], "num_attention_heads": m["num_attention_heads"],
            "num_key_value_heads": m["num_key_value_heads"], "head_dim": m["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": m["max_position_embeddings"], "rms_norm_eps": m["rms_norm_eps"],
            "rope_theta": m["rope_theta"], "rope_scaling": None, "tie_word_embeddings": False,
            "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
            "transformers_version": "4.52.4", **(hf_overrides or {})}
  hf.write_json(hf_cfg, os.path.join(dst, "config.json"))
  if weights is None:
    with np.load(os.path.join(src, "weights.npz")) as z:
      weights = {k: z[k] for k in z.files}
    with open(os.path.join(src, "shared_keys.json")) as f:
      for group in json.load(f)["groups"]:      # safetensors saves a shared parameter under one name only
        for k in group[1:]:
          weights.pop(k, None)
  hf.write_safetensors(weights, os.path.join(dst, "model.safetensors"))
  if run:
    with open(os.path.join(dst, f"{os.path.basename(dst)}.yaml"), "w") as f:
      yaml.safe_dump({"name": name, "precision": "bf16", "max_length": 32, **meta["reference_cfg"]}, f)
  if io:
    for n in ("inputs.npz", "outputs.npz"):
      shutil.copyfile(os.path.join(src, n), os.path.join(dst, n))
  return dst


def fixture_weights(name):
  with np.load(os.path.join(REFDATA, name, "weights.npz")) as z:
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("name,layout", [(RECURSIVE, "reference output"), (MOR, "reference output"),
                                         (RECURSIVE, "fixture as it is")])
def test_import_reproduces_reference_logits_through_the_checkpoint(name, layout, tmp_path):
  d = reference_dir(name, str(tmp_path / "run")) if layout == "reference output" else os.path.join(REFDATA, name)
  lines = []
  r = importer.import_reference(d, str(tmp_path / "w"), log=lines.append)
  assert r.max_diff is not None and r.max_diff <= 1e-4, r.max_diff
  assert any("max |logits - outputs.npz logits_eval|" in ln for ln in lines)
  assert any("logits[0, 0, :6]" in ln for ln in lines)
  assert ("run config" if layout == "reference output" else "fixture") in lines[0]
  # generate and eval restore with mor_jax.infer.checkpoint.restore: same model, same logits
  restored = infer_ckpt.restore(str(tmp_path / "w"))
  meta = json.load(open(os.path.join(REFDATA, name, "config.json")))
  assert restored.cfg.strategy == meta["sharing"] and restored.cfg.recursions == meta["num_recursion"]
  assert restored.cfg.mor_enable == meta["kind"].startswith("mor")
  tokens = np.load(os.path.join(d, "inputs.npz"))["input_ids"]
  logits = np.asarray(importer.forward(restored.cfg)(restored.variables, tokens))
  expected = np.load(os.path.join(d, "outputs.npz"))["logits_eval"]
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
  probe = np.load(os.path.join(tmp_path / "w", importer.PROBE_FILE))
  np.testing.assert_array_equal(probe["logits"], logits)

  if name == MOR:     # MoR export: reference-layout weights + routing config; read back gives the same params
    out = exporter.export_hf(str(tmp_path / "w"), str(tmp_path / "hf"), log=lines.append)
    assert not out.llama_compatible
    cfg_json = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg_json["model_type"] == "mor_llama" and cfg_json["mor_jax"]["mor"]["enable"]
    assert any("plain Llama loaders" in ln for ln in lines)
    src = importer.load_source(str(tmp_path / "hf"))
    again = weights.params_from_weights(restored.cfg, src.state_dict)
    ours = importer.layout.to_stacked_layout(restored.cfg, restored.variables["params"])
    for a, b in zip(_leaves(again), _leaves(ours)):
      np.testing.assert_array_equal(a, b)


def _leaves(tree):
  if isinstance(tree, dict):
    return [x for k in sorted(tree) for x in _leaves(tree[k])]
  return [np.asarray(tree)]


def test_parity_tool_accepts_a_reference_output_directory(tmp_path, capsys):
  d = reference_dir(RECURSIVE, str(tmp_path / "run"))
  assert parity.main([d]) == 0
  out = capsys.readouterr().out
  assert "logits_eval" in out and "PASS" in out
  bare = reference_dir(RECURSIVE, str(tmp_path / "run2"), io=False)
  with pytest.raises(SystemExit, match="inputs.npz"):
    parity.main([bare])

def test_errors_name_the_problem(tmp_path):
  # missing weights / config.json
  os.makedirs(tmp_path / "empty")
  with pytest.raises(InteropError, match="no weights"):
    importer.load_source(str(tmp_path / "empty"))
  d = reference_dir(RECURSIVE, str(tmp_path / "noconfig"), io=False)
  os.remove(os.path.join(d, "config.json"))
  with pytest.raises(InteropError, match="no config.json"):
    importer.load_source(d)

  # untied attention (the fork's bug): recursion 1's q_proj differs from recursion 0's
  w = fixture_weights(MOR)
  w["model.layers.2.block.0.self_attn.q_proj.weight"] = w["model.layers.2.block.0.self_attn.q_proj.weight"] + 0.01
  d = reference_dir(MOR, str(tmp_path / "untied"), weights=w, io=False)
  src = importer.load_source(d)
  cfg = _model_config(src.config)
  with pytest.raises(InteropError, match="untied across recursions") as e:
    weights.params_from_weights(cfg, src.state_dict)
  assert "q_proj" in str(e.value) and "shared attention" in str(e.value)

  # vocabulary mismatch: config.json says 300 tokens, the embedding has 256
  d = reference_dir(RECURSIVE, str(tmp_path / "vocab"), hf_overrides={"vocab_size": 300}, io=False)
  src = importer.load_source(d)
  with pytest.raises(InteropError, match="vocabulary mismatch"):
    weights.params_from_weights(_model_config(src.config), src.state_dict)

  # dimension mismatch: wrong intermediate size
  d = reference_dir(RECURSIVE, str(tmp_path / "ffn"), hf_overrides={"intermediate_size": 96}, io=False)
  src = importer.load_source(d)
  with pytest.raises(InteropError, match="dimension mismatch.*intermediate_size"):
    weights.params_from_weights(_model_config(src.config), src.state_dict)

  # an explicit --config whose dims disagree with config.json names the field
  c = src.config
  c.model.hidden_size = 32
  d = reference_dir(RECURSIVE, str(tmp_path / "explicit"), io=False)
  with pytest.raises(InteropError, match="config.model.hidden_size = 32"):
    importer.load_source(d, config=c)

  # a MoR checkpoint without its run config
  d = reference_dir(MOR, str(tmp_path / "norun"), run=False, io=False)
  with pytest.raises(InteropError, match="MoR checkpoint.*--import_run_config"):
    importer.load_source(d)

  # wrong sharing settings: the state dict has tensors the model does not use
  d = reference_dir(RECURSIVE, str(tmp_path / "wrong"), run=False, io=False)
  with open(os.path.join(d, "run.yaml"), "w") as f:
    yaml.safe_dump({"recursive": {"enable": True, "num_recursion": 2, "sharing": "middle_cycle"},
                    "mor": {"enable": True, "type": "expert"}}, f)
  src = importer.load_source(d)
  with pytest.raises(InteropError, match="lacks|do not describe"):
    weights.params_from_weights(_model_config(src.config), src.state_dict)

  # the workdir must be new
  os.makedirs(tmp_path / "taken" / "checkpoints" / "0")
  with pytest.raises(CheckpointError, match="already holds checkpoints"):
    importer.write_checkpoint(src.config, {}, str(tmp_path / "taken"))


def _model_config(c):
  from mor_jax import config as C
  return C.model_config(C.validate(c, num_devices=1))


def test_import_command_line_reports_errors(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--mode=import",
                         f"--import_from={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'w'}"],
                        capture_output=True, text=True, timeout=120, env={**os.environ, "MOR_JAX_HUGEPAGES": "0"})
  assert proc.returncode != 0
  assert "error:" in proc.stderr and "not a directory" in proc.stderr


def test_weight_formats(tmp_path, monkeypatch):
  """Sharded safetensors with an index, the newest Trainer checkpoint-<N>/, and a clear message for a
  pytorch_model.bin when torch is missing."""
  w = fixture_weights(RECURSIVE)
  keys = sorted(w)
  d = reference_dir(RECURSIVE, str(tmp_path / "sharded"), weights={}, io=False)
  os.remove(os.path.join(d, "model.safetensors"))
  shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
            "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
  for name, ks in shards.items():
    hf.write_safetensors({k: w[k] for k in ks}, os.path.join(d, name))
  hf.write_json({"weight_map": {k: n for n, ks in shards.items() for k in ks}},
                os.path.join(d, "model.safetensors.index.json"))
  got = hf.read_state_dict(d)
  assert sorted(got) == keys and all(np.array_equal(got[k], w[k]) for k in keys)

  run = reference_dir(RECURSIVE, str(tmp_path / "trainer_out"), io=False)
  for step in (100, 200):
    os.makedirs(os.path.join(run, f"checkpoint-{step}"))
    shutil.copyfile(os.path.join(run, "model.safetensors"),
                    os.path.join(run, f"checkpoint-{step}", "model.safetensors"))
  os.remove(os.path.join(run, "model.safetensors"))
  src = importer.load_source(run)
  assert src.weights_dir.endswith("checkpoint-200") and any("checkpoint-200" in n for n in src.notes)

  d = str(tmp_path / "bin")
  os.makedirs(d)
  open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(InteropError, match="torch is not installed.*pip install torch"):
    hf.read_state_dict(d)


LOSS_FREE = "10_mor_token_middle_cycle_rec3_softmax_lossfree"   # the reference run with a non-zero router_bias
BIAS_KEY = "model.layers.1.router_bias"                           # where the reference keeps it (a MoR-layer buffer)


def _reference_depths(name):
  with np.load(os.path.join(REFDATA, name, "outputs.npz")) as z:
    return np.asarray(z["token_depth_index_eval"]), np.asarray(z["logits_eval"])


@pytest.mark.parametrize("layout", ["reference output", "fixture as it is"])
def test_loss_free_reference_checkpoint_imports_with_its_bias(layout, tmp_path):
  """Fixture 10 (the PyTorch reference with balancing loss_free and router_bias [0, -5e-4, 1e-3], which moves 19 of
  the 64 tokens to another depth): the import carries the bias and reproduces the reference's depths exactly and its
  logits within 1e-4, through the written checkpoint."""
  bias = fixture_weights(LOSS_FREE)[BIAS_KEY]
  assert bias.shape == (3,) and np.abs(bias).max() > 0
  d = reference_dir(LOSS_FREE, str(tmp_path / "run")) if layout == "reference output" else os.path.join(REFDATA,
                                                                                                         LOSS_FREE)
  lines = []
  r = importer.import_reference(d, str(tmp_path / "w"), log=lines.append)
  assert r.max_diff is not None and r.max_diff <= 1e-4, r.max_diff
  assert r.depth_mismatches == 0
  assert any("token depths vs outputs.npz token_depth_index_eval: 64/64 equal (OK)" in ln for ln in lines), lines
  restored = infer_ckpt.restore(str(tmp_path / "w"))
  assert restored.cfg.balancing == "loss_free" and restored.cfg.bal_update_rate == pytest.approx(1e-3)
  np.testing.assert_array_equal(np.asarray(restored.variables["router_bias"]["bias"]), bias)
  want_depth, want_logits = _reference_depths(LOSS_FREE)
  tokens = np.load(os.path.join(REFDATA, LOSS_FREE, "inputs.npz"))["input_ids"]
  logits, aux = importer.forward_with_aux(restored.cfg)(restored.variables, tokens)
  np.testing.assert_array_equal(np.asarray(aux["depth"]), want_depth)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=0)
  # the bias is what makes these depths: without it (the old import's zeros) the routing is the unbiased one
  unbiased = {**restored.variables, "router_bias": {"bias": np.zeros(3, np.float32)}}
  _, aux0 = importer.forward_with_aux(restored.cfg)(unbiased, tokens)
  changed = int(np.sum(np.asarray(aux0["depth"]) != want_depth))
  assert changed == 19, changed
  assert len(set(want_depth.ravel().tolist())) == 3


def test_parity_on_the_loss_free_fixture():
  """The parity tool loads the bias, matches the reference's depths exactly and logits, losses and gradients within
  1e-4, and does not compare the balancing loss, which the reference reports as 0 when balancing is loss_free."""
  d = os.path.join(REFDATA, LOSS_FREE)
  ours, expected = parity.compute(d)
  rows = dict(parity.compare(ours, expected))
  assert float(expected["balancing_loss"]) == 0.0 and "balancing_loss" not in rows
  assert rows["token_depth_index_eval"] == 0 and rows["token_depth_index_train"] == 0
  assert sum(k.startswith("grad:") for k in rows) == 40
  bad = {k: v for k, v in rows.items() if v > 1e-4}
  assert not bad, bad


def test_loss_free_checkpoint_without_its_bias_is_refused(tmp_path):
  weights = fixture_weights(LOSS_FREE)
  del weights[BIAS_KEY]
  d = reference_dir(LOSS_FREE, str(tmp_path / "run"), weights=weights, io=False)
  with pytest.raises(InteropError, match=BIAS_KEY.replace(".", r"\.")):
    importer.import_reference(d, str(tmp_path / "w"), log=lambda _: None)


def test_a_refused_import_leaves_no_tokenizer_behind(tmp_path):
  """Refusals come before anything is written: the workdir gets no tokenizer/ (nor anything else)."""
  from tokenizers import Tokenizer, models  # noqa: PLC0415
  weights_ = fixture_weights(LOSS_FREE)
  del weights_[BIAS_KEY]
  d = reference_dir(LOSS_FREE, str(tmp_path / "run"), weights=weights_, io=False)
  Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(os.path.join(d, "tokenizer.json"))
  w = tmp_path / "w"
  with pytest.raises(InteropError, match=BIAS_KEY.replace(".", r"\.")):
    importer.import_reference(d, str(w), log=lambda _: None)
  assert not os.path.exists(w / "tokenizer") and (not w.exists() or not os.listdir(w))
  good = reference_dir(RECURSIVE, str(tmp_path / "good"), io=False)
  Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(os.path.join(good, "tokenizer.json"))
  os.makedirs(tmp_path / "taken" / "checkpoints" / "0")
  with pytest.raises(CheckpointError, match="already holds checkpoints"):
    importer.import_reference(good, str(tmp_path / "taken"), log=lambda _: None)
  assert os.listdir(tmp_path / "taken") == ["checkpoints"]
