"""mor_jax.model.depths: per-token recursions (token- and expert-choice, top-k and causal), the tally of which
tokens go deepest, the token_depths file --mode=eval writes, and the coloured text pictures."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.evaluate import main_eval
from mor_jax.model import depths
from mor_jax.model.transformer import MoRLM, init_variables
from test_evaluate_nll import make_workdir
from tiny import tiny_model_config

pytestmark = pytest.mark.usefixtures("fast_compilation")


def _model(mor_type):
  c = tiny_model_config("middle_cycle", 3, mor_type)
  return c, init_variables(c, jax.random.PRNGKey(1))


@pytest.mark.parametrize("mor_type", ["expert", "token"])
def test_token_recursions_match_the_models_own_routing(mor_type):
  cfg, v = _model(mor_type)
  v = jax.tree.map(lambda a: a * 8.0, v)                     # routers far from uniform
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, 24), 0, cfg.vocab_size)
  R = cfg.recursions
  for mode in ("topk", "causal"):
    _, aux = MoRLM(cfg).apply(v, tokens, routing_mode=mode)
    rec = np.asarray(depths.token_recursions(cfg, aux, 24))
    assert rec.shape == (3, 24) and rec.min() >= 0 and rec.max() <= R
    if mor_type == "token":
      np.testing.assert_array_equal(rec, np.asarray(aux["depth"]) + 1)
    elif mode == "topk":      # top-k: recursion r selects k_r positions of each row
      assert (rec.sum(axis=1) == sum(cfg.selected_tokens(24))).all()
    else:
      np.testing.assert_array_equal(rec, np.asarray(aux["recursions"]))
    # the mean over positions is the model's own mean_recursions
    np.testing.assert_allclose(rec.mean(), float(aux["mean_recursions"]), rtol=1e-6)
  # the jitted per-row function gives the causal depths of each row alone
  fn = depths.make_depth_fn(cfg, "causal")
  for b in range(3):
    _, aux = MoRLM(cfg).apply(v, tokens[b:b + 1], routing_mode="causal")
    np.testing.assert_array_equal(np.asarray(fn(v, tokens))[b], np.asarray(depths.token_recursions(cfg, aux, 24))[0])


def test_tally_ranks_tokens_by_full_depth_and_first_exit():
  t = depths.DepthTally(vocab_size=10, R=3)
  tokens = np.array([1] * 6 + [2] * 6 + [3] * 6 + [4] * 2)
  rec = np.array([3, 3, 3, 3, 3, 2] + [1, 1, 1, 1, 2, 3] + [2] * 6 + [3, 3])
  mask = np.ones_like(tokens, bool)
  mask[0] = False                                             # a padding position does not count
  t.add(tokens, rec, mask)
  s = t.summary()
  assert s["tokens"] == 19
  assert [r["id"] for r in s["full_depth"]] == [1, 2]        # token 4 is too rare (2 < MIN_COUNT); 3 never full
  assert s["full_depth"][0]["share"] == pytest.approx(4 / 5) and s["full_depth"][0]["count"] == 5
  assert [r["id"] for r in s["exit_first"]] == [2]
  assert s["exit_first"][0]["share"] == pytest.approx(4 / 6)
  assert s["exit_first"][0]["mean_recursions"] == pytest.approx(9 / 6)
  assert depths.shares(rec, 3, mask) == pytest.approx([4 / 19, 8 / 19, 7 / 19])
  md = t.table(decode=lambda ids: f"<{ids[0]}>")
  assert "'<1>' | 1 | 5 | 0.80 | 2.80 |" in md and "'<2>' | 2 | 6 | 0.67 | 1.50 |" in md


def test_eval_writes_which_tokens_go_deepest(tmp_path):
  wd = make_workdir(tmp_path)
  res = main_eval(None, wd["dir"], progress=False)
  md_path = res["token_depths_file"]
  assert md_path == os.path.join(wd["dir"], "token_depths_step7.md")
  saved = json.load(open(md_path[:-3] + ".json"))
  # the tally counts every real input position of the validation split, with the causal routing's depths
  from mor_jax import data as data_lib
  batches = list(data_lib.make_iterator(wd["config"], "validation", global_batch_size=8, num_epochs=1))
  fn = depths.make_depth_fn(wd["cfg"], "causal")
  want = depths.DepthTally(wd["cfg"].vocab_size, 2)
  for b in batches:
    want.add(b["tokens"][:, :-1], np.asarray(fn(wd["variables"], jnp.asarray(b["tokens"][:, :-1]))),
             b["segment_ids"][:, :-1] > 0)
  assert saved["tokens"] == int(want.count.sum()) > 100
  assert saved["mean_recursions"] == pytest.approx(want.summary()["mean_recursions"], rel=1e-9)
  assert saved["full_depth"] == [{**r, "text": wd["tokenizer"].decode([r["id"]])} for r in want.rows("full", 20)]
  assert "most often at full depth (2 recursions)" in open(md_path).read()


def test_colored_html_and_png(tmp_path):
  pieces, rec = ["ROM", "EO", ":", "\n", "But <soft>", "!"], [1, 3, 2, 1, 2, 3]
  page = depths.colored_html(pieces, rec, 3)
  assert page.count('class="d d') == len(pieces) + 3          # one span per piece, plus the legend's three
  assert "&lt;soft&gt;" in page and depths.color(3) in page
  path = depths.colored_png(pieces * 20, rec * 20, 3, str(tmp_path / "s.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 2000
