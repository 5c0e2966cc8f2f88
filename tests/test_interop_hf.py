"""Hugging Face round trip: a random tiny `LlamaForCausalLM` built with transformers -> import -> same logits as
torch (1e-4) -> export -> transformers reloads it -> same logits again; a recursive (middle_cycle) model exports as
an unrolled Llama whose logits in transformers equal ours; an MoR export is refused by transformers.

Needs torch and transformers (`.ci/run` installs them); skipped with a message otherwise."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the Hugging Face round trip needs torch and "
                            "transformers (pip install torch==2.13.0 transformers==5.18.0)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed: the Hugging Face round trip "
                                   "needs it (pip install transformers==5.18.0)")

from configs.base import get_config  # noqa: E402
from mor_jax import config as C  # noqa: E402
from mor_jax.data.tokenizer import train_bpe  # noqa: E402
from mor_jax.infer import checkpoint as infer_ckpt  # noqa: E402
from mor_jax.errors import CheckpointError  # noqa: E402
from mor_jax.interop import exporter, importer, pretrained_init, weights  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compilation")

LAYERS = 6


def torch_logits(model_dir, tokens):
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
  model.eval()
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  """A random LlamaForCausalLM saved by transformers (safetensors) with a byte-level BPE tokenizer."""
  d = str(tmp_path_factory.mktemp("hf") / "tiny-llama")
  words = " ".join(["to be or not to be that is the question whether tis nobler in the mind"] * 20)
  tok = train_bpe([words], 300)
  tok.save(d)
  cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=LAYERS,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 rms_norm_eps=1e-6, rope_theta=5000.0, tie_word_embeddings=False,
                                 bos_token_id=0, eos_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg)
  with torch.no_grad():                     # norms away from 1 so that a mix-up of norm weights would show
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(torch.rand_like(p) * 0.5)
  model.save_pretrained(d)
  return d


def vocab_of(model_dir):
  return json.load(open(os.path.join(model_dir, "config.json")))["vocab_size"]


def test_llama_round_trip(llama_dir, tmp_path):
  tokens = np.random.RandomState(0).randint(0, vocab_of(llama_dir), size=(2, 12)).astype(np.int32)
  expected = torch_logits(llama_dir, tokens)
  r = importer.import_reference(llama_dir, str(tmp_path / "w"), log=lambda s: None)
  assert r.cfg.strategy == "none" and r.cfg.num_layers == LAYERS and r.cfg.rope_theta == 5000.0
  assert r.cfg.rms_eps == 1e-6
  restored = infer_ckpt.restore(str(tmp_path / "w"))
  ours = np.asarray(importer.forward(restored.cfg)(restored.variables, tokens))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)

  out = exporter.export_hf(str(tmp_path / "w"), str(tmp_path / "export"), log=lambda s: None)
  assert out.llama_compatible
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(out.files)
  again = torch_logits(out.directory, tokens)
  np.testing.assert_allclose(again, ours, atol=1e-4, rtol=0)
  # the same weights as a pytorch_model.bin (read with torch) map to the same params
  bin_dir = tmp_path / "bin"
  os.makedirs(bin_dir)
  model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
  torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
  shutil.copyfile(os.path.join(llama_dir, "config.json"), bin_dir / "config.json")
  from_bin = importer.load_source(str(bin_dir))
  from_st = importer.load_source(llama_dir)
  assert sorted(from_bin.state_dict) == sorted(from_st.state_dict)
  assert all(np.array_equal(from_bin.state_dict[k], v) for k, v in from_st.state_dict.items())
  tok = transformers.AutoTokenizer.from_pretrained(out.directory)
  ours_tok = infer_ckpt.load_tokenizer(restored.config, restored.cfg)
  assert tok("to be or not")["input_ids"] == ours_tok.encode("to be or not")


def test_recursive_model_exports_as_an_unrolled_llama(llama_dir, tmp_path):
  """middle_cycle R=2 over 6 layers (block of 2, initialised stepwise from the vanilla model) unrolls to
  first, b0, b1, b0, b1, last; transformers computes our logits."""
  c = get_config()
  c.name = "tiny-recursive"
  c.model.update(vocab_size=vocab_of(llama_dir), hidden_size=32, intermediate_size=64, num_layers=LAYERS, num_heads=4,
                 num_kv_heads=2, max_seq_len=64, rms_eps=1e-6, rope_theta=5000.0)
  c.recursion.update(strategy="middle_cycle", num_recursions=2)
  c.init.update(from_path=llama_dir, strategy="stepwise")
  c.data.update(tokenizer_path=llama_dir, seq_len=32)
  c.train.update(total_batch_size=4, per_device_batch_size=1)
  c = C.validate(c)
  cfg = C.model_config(c)
  fresh = {k: v for k, v in weights.abstract_params(cfg).items()}
  import jax  # noqa: PLC0415
  params = pretrained_init.initial_params(c, cfg, jax.tree.map(lambda a: np.zeros(a.shape, np.float32), fresh))
  importer.write_checkpoint(c, importer.layout.to_stacked_layout(cfg, params), str(tmp_path / "w"))
  restored = infer_ckpt.restore(str(tmp_path / "w"))
  tokens = np.random.RandomState(1).randint(0, vocab_of(llama_dir), size=(2, 10)).astype(np.int32)
  ours = np.asarray(importer.forward(restored.cfg)(restored.variables, tokens))

  out = exporter.export_hf(str(tmp_path / "w"), str(tmp_path / "export"), log=lambda s: None)
  hf_cfg = json.load(open(os.path.join(out.directory, "config.json")))
  assert hf_cfg["num_hidden_layers"] == LAYERS and hf_cfg["architectures"] == ["LlamaForCausalLM"]
  from safetensors.numpy import load_file  # noqa: PLC0415
  sd = load_file(os.path.join(out.directory, "model.safetensors"))
  src = load_file(os.path.join(llama_dir, "model.safetensors"))
  q = lambda d, i: d[f"model.layers.{i}.self_attn.q_proj.weight"]
  # stepwise over the 4 middle layers: block = vanilla layers round(linspace(1, 4, 2)) = 1, 4
  for i, v in enumerate([0, 1, 4, 1, 4, 5]):
    np.testing.assert_array_equal(q(sd, i), q(src, v))
  np.testing.assert_allclose(torch_logits(out.directory, tokens), ours, atol=1e-4, rtol=0)


def test_mor_export_is_refused_by_transformers(tmp_path):
  c = get_config()
  c.model.update(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=4, num_heads=2, num_kv_heads=1,
                 max_seq_len=32)
  c.recursion.update(strategy="middle_cycle", num_recursions=2)
  c.mor.update(enable=True, type="token", router_func="softmax", alpha=1.0)
  c.data.update(seq_len=16, tokenizer_path=str(tmp_path / "none"))
  c.train.update(total_batch_size=4, per_device_batch_size=1)
  cfg = C.model_config(C.validate(c))
  rng = np.random.default_rng(0)
  import jax  # noqa: PLC0415
  params = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), weights.abstract_params(cfg))
  importer.write_checkpoint(c, importer.layout.to_stacked_layout(cfg, params), str(tmp_path / "w"))
  lines = []
  out = exporter.export_hf(str(tmp_path / "w"), str(tmp_path / "export"), log=lines.append)
  assert not out.llama_compatible and any("cannot run it" in ln for ln in lines)
  with pytest.raises((ValueError, KeyError)):
    transformers.AutoConfig.from_pretrained(out.directory)


def test_a_refused_import_writes_nothing(llama_dir, tmp_path):
  """The workdir already holds checkpoints: refused before the tokenizer (or anything else) is copied."""
  taken = tmp_path / "taken"
  (taken / "checkpoints" / "0").mkdir(parents=True)
  with pytest.raises(CheckpointError, match="already holds checkpoints"):
    importer.import_reference(llama_dir, str(taken), log=lambda s: None)
  assert sorted(os.listdir(taken)) == ["checkpoints"] and os.listdir(taken / "checkpoints") == ["0"]
