"""Fine-tuning on chat data (issue 38): the loss counts assistant tokens only, packed examples do not see each other,
a run starts from a workdir (its architecture, weights, tokenizer and chat template), and the fine-tuned workdir
chats. configs/finetune_chat.py runs through main.py exactly as the README shows it.

Tiny models and a byte-level BPE of 300 tokens trained on a few sentences: seconds each.
"""

import importlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mor_jax import config as C
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.data import chat_records, make_iterator
from mor_jax.data import tokenizer as tokenizer_lib
from mor_jax.infer import checkpoint as infer_ckpt
from mor_jax import chat_template
from mor_jax.infer import main_generate
from mor_jax.interop import importer, layout, weights
from mor_jax.model.transformer import MoRLM, init_variables
from mor_jax.interop import pretrained_init
from mor_jax.train import train_and_evaluate
from mor_jax.train.optimizer import make_optimizer
from mor_jax.train.state import init_state
from mor_jax.train.step import make_train_step
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compilation")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["what is one plus two", "it is three", "hello there", "name a colour", "blue", "you are terse"]
# a template of the tokenizer's own (tokenizer_config.json), ChatML-like, ending each turn with its EOS
OWN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def finetune(c, out):
  """What main.py's train mode does with config.init: resolved by interop, handed to the trainer."""
  c, init_params_fn = pretrained_init.resolve(c, out)
  return train_and_evaluate(c, out, init_params_fn=init_params_fn)


def conv(*turns):
  return {"messages": [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]}


def tokenizer_dir(root, template=None):
  d = os.path.join(root, "tok")
  tokenizer_lib.train_bpe([" ".join(WORDS)] * 20 + ["<|im_start|>user assistant system"] * 5, 300).save(d)
  if template:
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
      json.dump({"eos_token": "<|endoftext|>", "chat_template": template}, f)
  return d


def workdir(root, *, template=None, mor=None, seed=0):
  """A tiny model W (random weights) with the BPE in W/tokenizer, as an import or a training run leaves it."""
  tok = tokenizer_dir(root, template)
  R = 2 if mor else 1
  c = tiny_config("middle_cycle" if mor else "none", R, mor, vocab=300, seq_len=64, max_seq_len=512)
  c.data.tokenizer_path = tok
  cfg = C.model_config(C.validate(c, num_devices=1))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), weights.abstract_params(cfg))
  w = os.path.join(root, "W")
  importer.write_checkpoint(c, layout.to_stacked_layout(cfg, params), w, extra_meta=ckpt_params.store_tokenizer(w, tok))
  return w


def write_data(path, n=40):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps(conv(WORDS[i % 4], WORDS[(i + 1) % 5])) + "\n")
    f.write("{broken\n")
  return str(path)


def finetune_config(w, data_path, tmp, **train):
  c = importlib.import_module("configs.finetune_chat").get_config(None)
  c.init.from_path = w
  c.data.update(path=data_path, data_dir=str(tmp / "data"), seq_len=96)
  c.train.update(progress_bar=False, total_batch_size=4, per_device_batch_size=1, routing_pictures=False, **train)
  return c


# ------------------------------------------------------------------ the loss
def row(ids, mask, length):
  """One [1, 1, length] training batch (accumulation 1) holding a single example."""
  out = {k: np.zeros((1, 1, length), np.int32) for k in ("tokens", "segment_ids", "positions", "loss_mask")}
  n = len(ids)
  out["tokens"][0, 0, :n], out["loss_mask"][0, 0, :n] = ids, mask
  out["segment_ids"][0, 0, :n], out["positions"][0, 0, :n] = 1, np.arange(n)
  return out


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_loss_and_gradients_ignore_the_user_turns(tmp_path, loss_on):
  tok_dir = tokenizer_dir(str(tmp_path))
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  settings = chat_records.template_settings(tok_dir, "chatml", tok.eos_token, tok.bos_token)
  # the same conversation with a different last user turn (after the last answer: it cannot change the answers)
  a = conv("what is one plus two", "it is three", "hello there")["messages"]
  b = conv("what is one plus two", "it is three", "name a colour blue blue")["messages"]
  c = tiny_config(vocab=300, seq_len=80, max_seq_len=128, data__document_mask=True)
  cfg = C.model_config(C.validate(c, num_devices=1))
  tx, schedule = make_optimizer(C.validate(c, num_devices=1))
  state = init_state(cfg, tx, 0)
  step = jax.jit(make_train_step(cfg, tx, schedule, document_mask=True))
  out = {}
  for name, msgs in (("a", a), ("b", b)):
    ids, mask = chat_records.encode(tok, settings, msgs, loss_on)
    new, metrics = step(state, row(ids, mask, 81))
    out[name] = (float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.leaves(new.params), ids, mask)
  same = out["a"][0] == out["b"][0] and out["a"][1] == out["b"][1] and all(
      np.array_equal(x, y) for x, y in zip(out["a"][2], out["b"][2]))
  assert same == (loss_on == "assistant")                 # with loss_on=all the user turn is trained: it changes
  if loss_on == "assistant":                              # the loss is the mean NLL of the assistant tokens
    ids, mask = out["a"][3], out["a"][4]
    logits, _ = MoRLM(cfg).apply(state.variables(), ids[None, :-1])
    logp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
    nll = -np.asarray([logp[t - 1, ids[t]] for t in range(1, len(ids)) if mask[t]])
    assert len(nll) == int(mask.sum()) < len(ids) // 2
    np.testing.assert_allclose(out["a"][0], nll.mean(), rtol=1e-5)


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("model", [("none", 1, None), ("middle_cycle", 2, None), ("middle_cycle", 2, "token")],
                         ids=["vanilla", "recursive", "mor_token"])
def test_packed_examples_do_not_attend_to_each_other(tmp_path, model):
  tok_dir = tokenizer_dir(str(tmp_path))
  path = tmp_path / "t.jsonl"
  with open(path, "w") as f:
    for i in range(6):
      f.write(json.dumps(conv(WORDS[i % 4], " ".join(WORDS[:1 + i % 3]))) + "\n")
  strategy, R, mor = model
  c = tiny_config(strategy, R, mor, vocab=300, seq_len=256, max_seq_len=512)
  c.data.update(corpus="chat", path=str(path), tokenizer_path=tok_dir, chat_template="chatml", document_mask=True,
                data_dir=str(tmp_path / "data"), val_fraction=0.0, prefetch=0)
  cfg = C.model_config(C.validate(c, num_devices=1))
  variables = init_variables(cfg, jax.random.PRNGKey(1))
  batch = next(make_iterator(c, "train", global_batch_size=1, process_index=0, process_count=1, num_epochs=1))
  tokens, seg, pos = (batch[k][:, :-1] for k in ("tokens", "segment_ids", "positions"))
  assert seg.max() >= 3                                   # several examples in the row
  forward = jax.jit(lambda t, p=None, s=None: MoRLM(cfg).apply(variables, t, p, s)[0])
  packed = forward(tokens, pos, seg)
  for s in range(1, int(seg.max()) + 1):
    where = np.flatnonzero(seg[0] == s)
    alone = forward(tokens[:, where])                     # the example on its own, positions from 0
    np.testing.assert_allclose(np.asarray(packed[0, where]), np.asarray(alone[0]), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ from a workdir to a chat model
def test_finetune_command_as_written_then_chat_and_serve(tmp_path):
  w = workdir(str(tmp_path), template=OWN_TEMPLATE)
  data = write_data(tmp_path / "train.jsonl")
  out = str(tmp_path / "OUT")
  cmd = [sys.executable, os.path.join(REPO, "main.py"), "--config=configs/finetune_chat.py",
         f"--config.init.from_path={w}", f"--config.data.path={data}", f"--workdir={out}"]
  env = {**os.environ, "HOME": str(tmp_path)}             # the prepared data goes to ~/.cache/mor_jax
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "completed: step 1/1" in run.stdout            # 2 epochs of 40 short conversations packed 8 x 512
  assert "1 malformed skipped" in run.stderr and "train.jsonl:41: not valid JSON" in run.stderr
  report = json.load(open(os.path.join(out, "report.json")))
  assert report["chat"]["splits"]["train"]["examples"] + report["chat"]["splits"]["validation"]["examples"] == 40
  assert report["chat"]["seen"]["examples"] >= 2 * report["chat"]["splits"]["train"]["examples"]
  assert "## Chat data" in open(os.path.join(out, "report.md")).read()
  rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
  assert rows[-1]["examples_seen"] == report["chat"]["seen"]["examples"] and "val_loss" in rows[-1]
  # --chat: the tokenizer and template came from W; the prompt is rendered as in training
  r = infer_ckpt.restore(out)
  assert r.cfg.vocab_size == 300 and r.config.init.from_path == w
  tok_folder = infer_ckpt.tokenizer_source(r.config, directory=r.directory)
  assert tok_folder == os.path.join(out, "tokenizer") and chat_template.settings(tok_folder)["chat_template"] == \
      OWN_TEMPLATE
  (res,) = main_generate(None, out, prompt="hello there", chat=True, temperature=0.0, max_new_tokens=4,
                         stdout=io.StringIO(), stderr=io.StringIO())
  assert res.finish_reason in ("eos", "length")
  from mor_jax.interop import gguf  # noqa: PLC0415  (what the server renders chat requests with)
  assert gguf.apply_chat_template(tok_folder, [{"role": "user", "content": "hi"}]) == \
      "<|im_start|>user\nhi<|endoftext|>\n<|im_start|>assistant\n"
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)   # resumes: done
  assert again.returncode == 0 and "completed: step 1/1" in again.stdout, again.stderr[-2000:]


def test_chatml_for_a_model_without_a_template_is_kept_by_the_workdir(tmp_path):
  w = workdir(str(tmp_path))                              # W's tokenizer has no chat template
  c = finetune_config(w, write_data(tmp_path / "train.jsonl"), tmp_path)
  from mor_jax.data import DataError  # noqa: PLC0415
  with pytest.raises(DataError, match="no chat template.*data.chat_template=chatml"):
    finetune(c, str(tmp_path / "refused"))
  assert not os.path.exists(tmp_path / "refused" / "checkpoints")
  c.data.chat_template = "chatml"
  out = str(tmp_path / "OUT")
  report = finetune(c, out)
  assert report["status"] == "completed"
  settings = chat_template.settings(os.path.join(out, "tokenizer"))
  assert settings["chat_template"] == chat_records.CHATML and settings["eos_token"] == "<|endoftext|>"
  text = io.StringIO()
  (res,) = main_generate(None, out, prompt="hello there", chat=True, temperature=0.0, max_new_tokens=3,
                         stdout=text, stderr=io.StringIO())
  assert "<|im_start|>" not in text.getvalue() and len(res.tokens) <= 3
  os.rename(w, w + ".gone")                               # a resumed run reads OUT's checkpoint, not W
  again = finetune(c, out)
  assert again["status"] == "completed" and again["steps_this_run"] == 0


def test_a_mor_workdir_is_copied_whole_and_its_routers_can_stay_frozen(tmp_path):
  w = workdir(str(tmp_path), template=OWN_TEMPLATE, mor="expert", seed=3)
  c = finetune_config(w, write_data(tmp_path / "train.jsonl"), tmp_path, freeze_routers=True, learning_rate=1e-2,
                      epochs=0.0, num_steps=2, warmup_fraction=0.0, eval_sequences=0, save_interval=0.0)
  out = str(tmp_path / "OUT")
  assert finetune(c, out)["status"] == "completed"
  before, after = infer_ckpt.restore(w).variables["params"], infer_ckpt.restore(out).variables["params"]
  assert C.model_config(infer_ckpt.restore(out).config).mor_enable     # the architecture came from W
  flat_b = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  routers = [k for k in flat_b if "router" in jax.tree_util.keystr(k)]
  assert routers
  for k, v in jax.tree_util.tree_flatten_with_path(after)[0]:
    equal = np.array_equal(np.asarray(v), np.asarray(flat_b[k]))
    assert equal == (k in routers), jax.tree_util.keystr(k)       # W's routers kept exactly; the rest trained


def test_an_unset_architecture_needs_init_from_path(tmp_path):
  c = importlib.import_module("configs.finetune_chat").get_config(None)
  c.data.path = write_data(tmp_path / "train.jsonl")
  with pytest.raises(C.ConfigError, match=r"config.model.vocab_size: is not set.*--config.init.from_path=W"):
    finetune(c, str(tmp_path / "OUT"))
  assert not os.path.exists(tmp_path / "OUT" / "checkpoints")
