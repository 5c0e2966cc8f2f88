"""Routing pictures during training (issue 28): a tiny MoR run's workdir holds routing.jsonl (one row per
evaluation), the TensorBoard histogram, routing.png, the validation sample coloured by depth (HTML and PNG), and
report.md shows them; a non-routed model gets none."""

import glob
import os
import struct

import numpy as np

from mor_jax.train import train_and_evaluate
from mor_jax.train.routing_pictures import read_history
from mor_jax.train.synthetic import SyntheticIterator
from tiny import tiny_config

VOCAB, SEQ, ROWS = 128, 16, 8


def _config(mor="expert"):
  c = tiny_config("middle_cycle", 2, mor, vocab=VOCAB, seq_len=SEQ)
  c.name = "tiny-routing"
  c.train.routing_pictures = True                 # the default (tests/tiny.py turns it off for other tests)
  c.train.update(num_steps=4, total_batch_size=ROWS, per_device_batch_size=1, warmup_steps=1, learning_rate=1e-2,
                 log_every_steps=1, eval_every_steps=2, eval_sequences=4, save_every_steps=2, progress_bar=False)
  return c


def _run(workdir, c):
  evals = lambda rows: SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=99, num_batches=2)
  return train_and_evaluate(c, str(workdir), train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ,
                                                                               rows=ROWS, seed=5),
                            eval_iterator_fn=evals)


def _histograms(workdir):
  """Tags of histogram summaries in the TensorBoard event files (TFRecord framing read by hand)."""
  from tensorboardX.proto import event_pb2
  tags = []
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    data = open(path, "rb").read()
    i = 0
    while i + 12 <= len(data):
      n = struct.unpack("<Q", data[i:i + 8])[0]
      ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      tags += [(ev.step, v.tag, v.histo.num) for v in ev.summary.value if v.HasField("histo")]
  return tags


def test_mor_run_records_and_draws_its_routing(tmp_path):
  for mor in ("expert", "token"):
    w = tmp_path / mor
    report = _run(w, _config(mor))
    assert report["status"] == "completed"
    hist = read_history(str(w))
    assert list(hist) == [0, 2, 4]                                  # every evaluation
    for row in hist.values():
      assert len(row["shares"]) == 2 and abs(sum(row["shares"]) - 1) < 1e-6
      np.testing.assert_allclose(row["mean_recursions"], row["shares"][0] + 2 * row["shares"][1], rtol=1e-6)
    tags = _histograms(str(w))
    assert sorted(s for s, t, _ in tags if t == "routing/recursions_per_token") == [0, 2, 4]
    assert all(num == 2 * SEQ for _, t, num in tags)                # 2 sample rows x SEQ tokens, none padding
    for name in ("routing.png", "routing_sample.png"):
      assert open(w / name, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    page = (w / "routing_sample.html").read_text()
    assert page.count('class="d d') == SEQ + 2                       # one span per token, plus the legend
    md = (w / "report.md").read_text()
    assert md.count("## Routing") == 1 and "![routing](routing.png)" in md and "routing_sample.html" in md
    assert "![loss](loss.png)" in md                                # the report's own content is kept


def test_non_routed_model_has_no_routing_pictures(tmp_path):
  c = _config(None)
  _run(tmp_path, c)
  assert not os.path.exists(tmp_path / "routing.jsonl") and not os.path.exists(tmp_path / "routing.png")
  assert "## Routing" not in (tmp_path / "report.md").read_text()
