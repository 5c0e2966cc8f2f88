"""The training loop: exact resume, SIGTERM, corrupt-checkpoint fallback, NaN stop, metrics and report."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from mor_jax import config as C
from mor_jax.train import (Checkpointer, DataParallel, NonFiniteLossError, abstract_state, make_optimizer,
                           make_schedule, read_metrics, train_and_evaluate)
from mor_jax.train.synthetic import SyntheticIterator
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")

VOCAB, SEQ, ROWS = 128, 16, 8
REQUIRED = ("step", "loss", "total_loss", "learning_rate", "grad_norm", "tokens_per_second")


def tiny(**train):
  """MoR expert-choice (capacity warm-up for 2 steps), 6 steps, checkpoints every 2, eval every 3."""
  c = tiny_config("cycle", 2, "expert", vocab=VOCAB, seq_len=SEQ, model__scan_layers=False, mor__cap_warmup_steps=2)
  c.name = "tiny-loop"
  c.train.update(dict(dict(num_steps=6, total_batch_size=ROWS, per_device_batch_size=1, warmup_steps=1,
                           learning_rate=1e-2, log_every_steps=1, eval_every_steps=3, eval_sequences=4,
                           save_every_steps=2, keep_checkpoints=3, progress_bar=False), **train))
  return c


class Batches(SyntheticIterator):
  """Synthetic training data that can send SIGTERM to this process or poison one batch with bad token ids."""

  def __init__(self, sigterm_at=None, nan_at=None):
    super().__init__(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5)
    self.sigterm_at, self.nan_at = sigterm_at, nan_at

  def make_batch(self, index):
    b = super().make_batch(index)
    if index == self.nan_at:
      b["tokens"][:] = VOCAB + 7          # out-of-range ids: the embedding lookup yields NaN
    return b

  def __next__(self):
    if self.index == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def evals(rows):
  return SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=99, num_batches=2)


def train(workdir, config=None, **data):
  return train_and_evaluate(config or tiny(), str(workdir), train_iterator=Batches(**data), eval_iterator_fn=evals)


def restore(workdir, step, mode="pjit", n=1, config=None):
  c = C.validate(config or tiny(), n)
  cfg = C.model_config(c)
  abstract = abstract_state(cfg, make_optimizer(c)[0])
  dp = DataParallel(mode, jax.devices()[:n])
  ck = Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    r = ck.restore(step, abstract, dp.state_shardings(abstract))
  finally:
    ck.close()
  return dp, r


def losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir)) if "loss" in r]


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """6 uninterrupted steps on 4 devices (pjit)."""
  wd = tmp_path_factory.mktemp("reference")
  return str(wd), train(wd)


def test_metrics_report_and_files(reference):
  wd, rep = reference
  assert rep["status"] == "completed" and rep["steps_completed"] == 6 and rep["devices"]["count"] == 4
  assert rep["checkpoints"]["written"] == [2, 4, 6] and rep["checkpoints"]["kept"] == [2, 4, 6]
  for f in ("report.md", "report.json", "loss.png", "metrics.jsonl"):
    assert os.path.getsize(os.path.join(wd, f)) > 0, f
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(wd, "tensorboard")))
  records = read_metrics(wd)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for r in records:
    assert all(k in r for k in REQUIRED), r.keys()
    assert len(r["tokens_per_recursion"]) == 2 and r["tokens_per_second"] > 0
  assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
  sched = make_schedule(C.validate(tiny(), 4))
  np.testing.assert_allclose([r["learning_rate"] for r in records], [float(sched(s)) for s in range(6)], rtol=1e-6)
  # capacity warm-up for the first 2 steps: every token reaches recursion 1, then half of them ...
  assert [r["tokens_per_recursion"][1] for r in records] == [1.0, 0.75, 0.5, 0.5, 0.5, 0.5]
  # ... with exactly two compiled versions of the train step (warm-up and after) and one eval step
  assert rep["compilations"] == {"train_step": 2, "eval_step": 1}
  loss = [r["loss"] for r in records]
  stored = json.load(open(os.path.join(wd, "report.json")))
  assert stored["status"] == "completed"
  L = rep["loss"]
  assert L["initial"] == loss[0] and L["final"] == loss[-1] and L["at_50pct"] == loss[2]
  np.testing.assert_allclose(L["average"], np.mean(loss))
  assert rep["learning_rate"]["start"] == 0.0 and rep["learning_rate"]["end"] == records[-1]["learning_rate"]
  assert rep["val_loss"]["initial_step"] == 0 and rep["val_loss"]["final_step"] == 6
  assert rep["trainable_parameters"] > 0 and rep["total_training_flops"] == rep["flops_per_token"] * 6 * ROWS * SEQ
  assert rep["tokens_per_second"] > 0 and rep["samples_per_second"] > 0 and rep["steps_per_second"] > 0
  md = open(os.path.join(wd, "report.md")).read()
  assert "**Status: completed**" in md and "trainable parameters" in md and "loss at 90%" in md


def test_sigterm_checkpoint_then_exact_resume(reference, tmp_path):
  ref_wd, _ = reference
  wd = str(tmp_path / "run")
  rep = train(wd, sigterm_at=2)            # SIGTERM while step 3's batch is read: step 3 finishes, then exit
  assert rep["status"] == "interrupted" and rep["steps_completed"] == 3
  assert rep["checkpoints"]["written"] == [2, 3]
  assert json.load(open(os.path.join(wd, "report.json")))["status"] == "interrupted"
  assert signal.getsignal(signal.SIGTERM) is not None          # our handler was removed again
  _, r = restore(wd, 3)                                        # the checkpoint it left restores
  assert int(r.state.step) == 3 and r.data == {"index": 3} and len(r.meta["history"]["loss"]) == 3
  rep2 = train(wd)                                             # resumes at step 3 and runs 3 more
  assert rep2["status"] == "completed" and rep2["resumed_from_step"] == 3 and rep2["steps_this_run"] == 3
  assert rep2["compilations"]["train_step"] == 1               # resumed after the warm-up: only the top-k step
  assert losses(wd) == losses(ref_wd)                          # bit-identical loss trace
  _, a = restore(wd, 6)
  _, b = restore(ref_wd, 6)
  assert tree_equal(a.state, b.state)                          # bit-identical parameters and optimizer state
  assert a.meta["history"] == b.meta["history"] and rep2["loss"] == reference[1]["loss"]


# Orbax's failed restore of the corrupt step leaves an asyncio callback that fires after its loop closed (harmless)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_latest_checkpoint_falls_back_and_resumes_on_other_devices(reference, tmp_path):
  ref_wd, ref_rep = reference
  wd = str(tmp_path / "copy")
  shutil.copytree(ref_wd, wd)
  state_dir = os.path.join(wd, "checkpoints", "6", "state")
  for root, _, files in os.walk(state_dir):          # garbage in every array file of the latest step
    for f in files:
      if "ocdbt" in root or f.startswith("manifest"):
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"not a checkpoint")
  ck = Checkpointer(os.path.join(wd, "checkpoints"))
  assert ck.all_steps() == [2, 4, 6]                 # Orbax still lists it
  ck.close()
  c = tiny(per_device_batch_size=0)                 # the micro-batch chosen for the memory (issue 39): here all
  c.parallel.update(mode="pmap", num_devices=2)      # 4 rows a device has, on 2 devices with pmap: the reference
  rep = train(wd, config=c)                          # ran 1 row x accumulation 2 on 4 devices
  assert rep["resumed_from_step"] == 4 and rep["status"] == "completed" and rep["devices"]["count"] == 2
  assert (rep["per_device_batch_size"], rep["grad_accum_steps"]) == (4, 1) and ref_rep["grad_accum_steps"] == 2
  assert [c["per_device_batch_size"] for c in rep["runs"][-1]["memory_fit"]["candidates"]] == [1, 4]   # ample
  assert os.listdir(os.path.join(wd, "checkpoints_corrupt"))[0].startswith("6-")
  assert rep["checkpoints"]["kept"] == [2, 4, 6]
  got, ref = losses(wd), losses(ref_wd)
  assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6] and got[:4] == ref[:4]
  np.testing.assert_allclose([l for _, l in got[4:]], [l for _, l in ref[4:]], rtol=1e-6)
  _, a = restore(wd, 6)
  _, b = restore(ref_wd, 6)
  diff = max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a.state.params),
                                                         jax.tree.leaves(b.state.params)))
  assert diff < 1e-5


def test_restore_onto_other_device_counts(reference):
  ref_wd, _ = reference
  _, base = restore(ref_wd, 6)
  for mode, n in (("pjit", 2), ("pmap", 4)):
    dp, r = restore(ref_wd, 6, mode, n)
    placed = dp.place_state(r.state)
    leaf = jax.tree.leaves(placed.params)[0]
    assert len(leaf.sharding.device_set) == n
    assert tree_equal(jax.device_get(dp.unreplicate(placed)), base.state)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "nan")
  with pytest.raises(NonFiniteLossError, match="step 3"):
    train(wd, config=tiny(keep_checkpoints=1), nan_at=2)      # step 3 sees bad token ids
  ck = Checkpointer(os.path.join(wd, "checkpoints"))
  assert ck.all_steps() == [2]                               # step 4 was never saved over it
  ck.close()
  rep = json.load(open(os.path.join(wd, "report.json")))
  assert rep["status"] == "failed" and "non-finite" in rep["message"] and "step 2" in rep["message"]
  assert [r["step"] for r in read_metrics(wd)] == [1, 2]
  _, r = restore(wd, 2)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(r.state.params))


def test_rerun_of_a_finished_run_trains_nothing(reference, tmp_path):
  wd = str(tmp_path / "done")
  shutil.copytree(reference[0], wd)
  before = open(os.path.join(wd, "report.json")).read()
  rep = train(wd)
  assert rep["steps_this_run"] == 0 and rep["resumed_from_step"] == 6 and "already complete" in rep["message"]
  assert losses(wd) == losses(reference[0])
  assert open(os.path.join(wd, "report.json")).read() == before      # the finished run's report is kept


def test_names_and_logged_fields_follow_the_model(reference, tmp_path, caplog):
  """A recursive model without routers: its run name says so ('{model}' in config.name), its compile line names
  no routing mode and its metrics have no router loss; the MoR reference run keeps all three."""
  import logging
  caplog.set_level(logging.INFO)
  c = tiny(num_steps=2, eval_every_steps=0, save_every_steps=0)
  c.name = "tiny-{model}"
  c.mor.enable = False
  rep = train(tmp_path / "plain", config=c)
  assert rep["status"] == "completed" and rep["name"] == "tiny-cycle-r2"
  compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled train_step")]
  assert compiled and all(m.startswith("compiled train_step in ") for m in compiled), compiled
  records = read_metrics(str(tmp_path / "plain"))
  assert [r["step"] for r in records] == [1, 2] and not any("aux_loss" in r for r in records)
  assert all(r["total_loss"] == r["loss"] for r in records)
  assert all("aux_loss" in r for r in read_metrics(reference[0]))            # MoR: the router loss is there
  assert C.describe_model(C.validate(tiny(), 1)) == "mor-expert-r2"
  assert C.describe_model(C.validate(tiny_config("middle_cycle", 2), 1)) == "middle_cycle-r2"
  assert C.run_name(C.validate(_named(tiny_config(), "shakespeare-{model}"), 1)) == "shakespeare-vanilla"


def _named(c, name):
  c.name = name
  return c
