"""Trainer hooks (mor_jax/train/hooks.py): a small context, `every=N`, the default hooks train_and_evaluate adds,
and pretrained initialisation handed in by the entry point (`init_params_fn`): train never imports interop."""

import os

import jax
import numpy as np
import pytest

from mor_jax.errors import ConfigError
from mor_jax.train import Hook, HookContext, train_and_evaluate
from mor_jax.train.loop import default_hooks
from mor_jax.train.synthetic import SyntheticIterator

VOCAB, SEQ, ROWS = 128, 16, 8


def _config(tiny, **train):
  c = tiny("cycle", 2, "expert", vocab=VOCAB, seq_len=SEQ, mor__cap_warmup_steps=0)
  c.train.update(dict(dict(num_steps=4, total_batch_size=ROWS, per_device_batch_size=2, warmup_steps=1,
                           log_every_steps=1, eval_every_steps=2, eval_sequences=4, save_every_steps=0,
                           save_interval=0.0, progress_bar=False), **train))
  return c


def _run(c, workdir, **kw):
  evals = lambda rows: SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=9, num_batches=1)
  batches = SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5)
  return train_and_evaluate(c, str(workdir), train_iterator=batches, eval_iterator_fn=evals, **kw)


class Recorder(Hook):
  every = 2

  def __init__(self):
    self.events = []

  def on_start(self, ctx):
    assert isinstance(ctx, HookContext) and ctx.is_main and ctx.cfg.recursions == 2
    self.events.append(("start", ctx.workdir, int(ctx.config.train.num_steps)))

  def on_metrics(self, ctx, step, metrics):
    self.events.append(("metrics", step, sorted(ctx.variables()["params"])[:1]))

  def on_eval(self, ctx, step, val_loss):
    self.events.append(("eval", step))

  def on_save(self, ctx, step):
    self.events.append(("save", step))

  def on_end(self, ctx, report):
    self.events.append(("end", report["status"]))


def test_hooks_see_a_context_and_run_every_n_steps(tiny, tmp_path):
  rec = Recorder()
  report = _run(_config(tiny), tmp_path / "w", hooks=[rec])
  assert report["status"] == "completed"
  w = os.path.abspath(tmp_path / "w")
  assert rec.events == [("start", w, 4), ("eval", 0), ("metrics", 2, ["block"]), ("eval", 2),
                        ("metrics", 4, ["block"]), ("eval", 4), ("save", 4), ("end", "completed")]


def test_default_hooks_follow_the_config(tiny):
  c = _config(tiny)
  c.train.routing_pictures = True
  assert [type(h).__name__ for h in default_hooks(c)] == ["RoutingPictures"]
  c.mor.enable = False
  assert default_hooks(c) == []
  c.data.corpus = "chat"
  assert [type(h).__name__ for h in default_hooks(c)] == ["ChatDataReport"]


def test_init_params_fn_makes_a_fresh_runs_state_and_from_path_needs_one(tiny, tmp_path):
  calls = []

  def init_params_fn(config, cfg, state, dp):
    calls.append(int(config.train.num_steps))
    params = jax.tree.map(lambda a: a * 0.0, state.params)
    return state.replace(params=params)

  c = _config(tiny, num_steps=1, eval_sequences=0)
  c.train.learning_rate = 0.0
  _run(c, tmp_path / "a", init_params_fn=init_params_fn)
  assert calls == [1]
  from mor_jax.infer import checkpoint as infer_ckpt  # noqa: PLC0415
  params = infer_ckpt.restore(str(tmp_path / "a")).variables["params"]
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(params["block"]))   # zeros, learning rate 0
  c.init.from_path = str(tmp_path / "a")
  with pytest.raises(ConfigError, match="config.init.from_path: set, but nothing initialises from it"):
    _run(c, tmp_path / "b")
  assert not os.path.exists(tmp_path / "b")
