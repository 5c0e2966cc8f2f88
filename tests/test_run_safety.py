"""Run safety (issue 22): the workdir lock, mismatch vs corruption, checksums, all-corrupt stop, the
finiteness check of a restored state, metrics.jsonl never short, disk full (main.py's exit codes: test_main.py),
kill -9 at random moments, and a validation set independent of the device count."""

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as C
from mor_jax.train import DataParallel, DeviceMemoryError, Trainer, abstract_state, init_state, make_eval_step
from mor_jax.train import make_optimizer
from mor_jax.train import read_metrics, train_and_evaluate
from mor_jax.train import evaluation
from mor_jax.train.metrics import MetricWriter
from mor_jax.train.synthetic import SyntheticIterator
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB, SEQ, ROWS = 128, 16, 8


def tiny(**train):
  """MoR expert-choice R=2, 6 steps on 4 devices, checkpoints every 2 steps, evaluation every 3."""
  c = tiny_config("cycle", 2, "expert", model__scan_layers=False, mor__cap_warmup_steps=2)
  c.train.update(dict(dict(num_steps=6, total_batch_size=ROWS, per_device_batch_size=1, warmup_steps=1,
                           learning_rate=1e-2, log_every_steps=1, eval_every_steps=3, eval_sequences=4,
                           save_every_steps=2, keep_checkpoints=3, progress_bar=False), **train))
  return c


def evals(rows):
  return SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=99, num_batches=2)


def train(workdir, config=None, hooks=()):
  return train_and_evaluate(config or tiny(), str(workdir), eval_iterator_fn=evals, hooks=hooks,
                            train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5))


def losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(str(workdir)) if "loss" in r]


def snapshot(workdir) -> dict:
  """{relative path: sha256} of every file under `workdir` (the lock file excluded)."""
  out = {}
  for root, _, files in os.walk(workdir):
    for f in files:
      p = os.path.join(root, f)
      if f != ".lock":
        out[os.path.relpath(p, workdir)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return out


def flip_bytes(step_dir, n=64) -> str:
  """Flips `n` bytes in the middle of the largest file of the step's state; returns its path."""
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    f.seek(0)
    f.write(data)
  return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """6 uninterrupted steps on 4 devices."""
  wd = tmp_path_factory.mktemp("reference")
  return str(wd), train(wd)


@pytest.fixture
def copy(reference, tmp_path):
  wd = str(tmp_path / "copy")
  shutil.copytree(reference[0], wd)
  return wd


def test_checkpoints_carry_checksums_and_the_state_signature(reference):
  wd, rep = reference
  assert rep["status"] == "completed" and rep["checkpoints"]["kept"] == [2, 4, 6]
  step_dir = os.path.join(wd, "checkpoints", "6")
  manifest = json.load(open(os.path.join(step_dir, "checksums.json")))["files"]
  assert any(k.startswith("state/") for k in manifest) and any(k.startswith("meta/") for k in manifest)
  meta = ckpt_lib.read_meta(step_dir)
  assert meta["version"] == 2 and meta["architecture"]["hidden_size"] == 32 and "model_config" not in meta
  assert any(k.startswith(".opt_state") for k in meta["state_signature"])
  assert open(os.path.join(wd, ".lock")).read() == ""          # released


def test_second_trainer_is_refused_and_the_first_run_untouched(copy):
  before = snapshot(copy)
  with ckpt_lib.WorkdirLock(copy):                             # a trainer running in this workdir
    with pytest.raises(ckpt_lib.WorkdirLockedError, match=f"pid {os.getpid()}"):
      train(copy, config=tiny(num_steps=8))
    assert snapshot(copy) == before
  # a lock left by a killed run (content, no holder) is taken over
  with open(os.path.join(copy, ".lock"), "w") as f:
    json.dump({"pid": 999999, "host": "gone", "started": "then"}, f)
  rep = train(copy)
  assert "already complete" in rep["message"]


def test_state_tree_change_is_refused_and_nothing_moves(copy):
  before = snapshot(copy)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    train(copy, config=_with(tiny(num_steps=8), model__hidden_size=64))
  msg = str(e.value)
  assert "model.hidden_size: checkpoint 32 vs config 64" in msg and "state tree cannot be changed" in msg
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="state tree"):   # never overridable
    train(copy, config=_with(tiny(num_steps=8, allow_changes=("model.hidden_size",)), model__hidden_size=64))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:                # the example
    train(copy, config=_with(tiny(num_steps=8), mor__rand_router=True))
  assert "mor.rand_router: checkpoint False vs config True" in str(e.value)
  assert ".params['router_0']['dense']['kernel']: only in the checkpoint" in str(e.value)
  assert snapshot(copy) == before and not os.path.exists(os.path.join(copy, "checkpoints_corrupt"))


def test_architecture_change_is_refused_unless_allowed(copy):
  before = snapshot(copy)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    train(copy, config=_with(tiny(num_steps=8), model__rope_theta=5000.0))
  assert "model.rope_theta: checkpoint 10000.0 vs config 5000.0" in str(e.value)
  assert "--config.train.allow_changes=model.rope_theta" in str(e.value)
  assert snapshot(copy) == before
  rep = train(copy, config=_with(tiny(num_steps=8, allow_changes=("model.rope_theta", "train.num_steps")),
                                 model__rope_theta=5000.0))
  assert rep["status"] == "completed" and rep["resumed_from_step"] == 6 and rep["steps_completed"] == 8
  rep = train(copy, config=_with(tiny(num_steps=8), model__rope_theta=5000.0))   # now the checkpoint's value
  assert "already complete" in rep["message"]


def test_extending_a_run_is_refused_unless_allowed_and_the_changes_are_logged(copy, caplog):
  """A raised train.num_steps restarts the schedule's shape: refused with the list of changes and the fix;
  accepted with train.allow_changes, and every changed field is logged as 'key: old -> new'."""
  caplog.set_level(logging.INFO)
  before = snapshot(copy)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    train(copy, config=tiny(num_steps=8, learning_rate=2e-2))
  msg = str(e.value)
  assert "train.num_steps: checkpoint 6 vs config 8" in msg and "train.learning_rate" in msg
  assert "--config.train.allow_changes=train.learning_rate,train.num_steps" in msg and "wsd" in msg
  assert "different model" not in msg and snapshot(copy) == before
  logged = [r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
  assert any(line.endswith("train.num_steps: 6 -> 8") for line in logged), logged
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="train.learning_rate"):   # each one must be allowed
    train(copy, config=tiny(num_steps=8, learning_rate=2e-2, allow_changes=("train.num_steps",)))
  caplog.clear()
  rep = train(copy, config=tiny(num_steps=8, log_every_steps=2, allow_changes=("train.num_steps",)))
  assert rep["status"] == "completed" and rep["resumed_from_step"] == 6 and rep["steps_completed"] == 8
  logged = [r.getMessage() for r in caplog.records if "differs from the checkpoint" in r.getMessage()]
  assert sorted(l.split(": ", 1)[1] for l in logged) == ["train.log_every_steps: 1 -> 2", "train.num_steps: 6 -> 8"]


def _with(c, **overrides):
  for key, value in overrides.items():
    section, field = key.split("__")
    c[section][field] = value
  return c


def test_every_checkpoint_unreadable_stops_with_nothing_moved(copy):
  for s in (2, 4, 6):
    flip_bytes(os.path.join(copy, "checkpoints", str(s)))
  before = snapshot(copy)
  with pytest.raises(ckpt_lib.CheckpointCorruptError) as e:
    train(copy)
  assert all(f"step {s}:" in str(e.value) for s in (2, 4, 6)) and "Nothing was moved" in str(e.value)
  assert snapshot(copy) == before and not os.path.exists(os.path.join(copy, "checkpoints_corrupt"))
  assert len(read_metrics(copy)) == 6


def test_flipped_bytes_fall_back_to_the_previous_step_and_resume_exactly(reference, copy, caplog):
  damaged = flip_bytes(os.path.join(copy, "checkpoints", "6"))
  rep = train(copy)
  assert rep["resumed_from_step"] == 4 and rep["status"] == "completed" and rep["steps_this_run"] == 2
  warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "damaged" in r.getMessage()]
  assert warned and damaged in warned[0] and "checksum" in warned[0]
  assert os.listdir(os.path.join(copy, "checkpoints_corrupt"))[0].startswith("6-")
  assert losses(copy) == losses(reference[0])                 # the same curve as the uninterrupted run


def test_nonfinite_restored_state_falls_back_naming_the_leaf(tmp_path, caplog):
  c = C.validate(tiny(), 1)
  cfg = C.model_config(c)
  tx, _ = make_optimizer(c)
  good = init_state(cfg, tx, 0)
  mu = jax.tree.map(lambda x: x, good.opt_state)
  leaves, treedef = jax.tree.flatten(mu)
  i = next(k for k, x in enumerate(leaves) if jnp.issubdtype(x.dtype, jnp.floating) and x.size > 1)
  leaves[i] = leaves[i].at[0].set(jnp.nan)
  bad = good.replace(step=jnp.int32(4), opt_state=jax.tree.unflatten(treedef, leaves))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ck.save(2, good.replace(step=jnp.int32(2)), None, {"history": {}})
  ck.save(4, bad, None, {"history": {}})
  abstract = abstract_state(cfg, tx)
  shardings = DataParallel("pjit", jax.devices()[:1]).state_shardings(abstract)
  r = ck.restore_latest(abstract, shardings)
  ck.close()
  assert r.step == 2
  warned = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
  assert "non-finite values in .opt_state" in warned and os.path.join("4", "state") in warned
  assert os.listdir(tmp_path / "checkpoints_corrupt")[0].startswith("4-")


def test_metrics_jsonl_is_never_empty_or_short(tmp_path, monkeypatch):
  wd = str(tmp_path)
  rows = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.writelines(rows + ['{"step": 6, "lo'])               # a row cut by a kill
  import mor_jax.train.metrics as metrics_mod  # noqa: PLC0415

  def killed(*a):
    raise KeyboardInterrupt("killed before the rename")
  monkeypatch.setattr(metrics_mod.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    MetricWriter(wd, resume_step=3)
  assert open(os.path.join(wd, "metrics.jsonl")).read().startswith("".join(rows))   # untouched
  monkeypatch.undo()
  w = MetricWriter(wd, resume_step=3)
  w.write(4, {"loss": 0.5})
  w.write(4, {"loss": 0.25})                                  # a step written twice reads once (the last)
  w.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(wd)] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]


def test_eval_counts_the_same_sequences_on_1_and_4_devices():
  c = tiny(per_device_batch_size=2)
  cfg = C.model_config(C.validate(c, 4))
  state = init_state(cfg, make_optimizer(C.validate(c, 4))[0], 0)
  seqs = np.random.default_rng(0).integers(0, VOCAB, (11, SEQ + 1)).astype(np.int32)

  def batches(rows):
    return ({"tokens": seqs[i:i + rows]} for i in range(0, len(seqs), rows))
  got = {}
  for n in (1, 4):
    dp = DataParallel("pjit", jax.devices()[:n])
    fn = dp.compile_eval_step(make_eval_step(cfg))
    got[n] = evaluation.evaluate(dp.place_state(state), dp=dp, eval_fn=fn, batches=batches(2 * n), sequences=6,
                                 rows=2 * n)
  whole = make_eval_step(cfg)(state, {"tokens": seqs[:6]})
  np.testing.assert_allclose(got[1], got[4], rtol=1e-6)
  np.testing.assert_allclose(got[4], float(whole["nll_sum"]) / float(whole["count"]), rtol=1e-6)


class _FillDisk(Trainer):
  """After the first checkpoint completed, fills the filesystem to ~1 MB free: the next save fails."""

  def save(self, step):
    super().save(step)
    if step == 2:
      self.ckpt.wait()
      st = os.statvfs(self.workdir)
      with open(os.path.join(os.path.dirname(self.workdir), "filler"), "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - (1 << 20)))


@pytest.mark.environment("root, to mount a tmpfs")
def test_disk_full_one_clear_line_report_and_restorable_checkpoint(tmp_path):
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  mnt = str(tmp_path / "small")
  os.makedirs(mnt)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt], check=True)
  try:
    wd = os.path.join(mnt, "run")
    c = tiny(num_steps=8)
    c.model.update(vocab_size=4096)                          # ~3 MB per checkpoint: more than the space left
    with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
      _FillDisk(c, wd, eval_iterator_fn=evals,
                train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5)).run()
    assert str(e.value) == (f"no space left on device while writing checkpoint 4 to {wd}/checkpoints; the last "
                            "complete checkpoint is step 2")
    rep = json.load(open(os.path.join(wd, "report.json")))
    assert rep["status"] == "failed" and rep["message"] == str(e.value)
    os.remove(os.path.join(mnt, "filler"))
    assert ckpt_lib.steps_in(os.path.join(wd, "checkpoints")) == [2]
    rep = train_and_evaluate(c, wd, eval_iterator_fn=evals,
                             train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5))
    assert rep["resumed_from_step"] == 2 and rep["status"] == "completed"
  finally:
    subprocess.run(["umount", "-l", mnt], check=False)


class _OutOfMemoryAfterSave(Trainer):
  """From the first save on, the train step fails the way XLA does when the device runs out of memory."""

  def save(self, step):
    super().save(step)

    def out_of_memory(*args):
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.21GiB.")
    self.train_fn = out_of_memory


def test_out_of_memory_while_running_is_one_line_and_keeps_the_checkpoints(tmp_path):
  wd = str(tmp_path / "oom")
  with pytest.raises(DeviceMemoryError) as e:
    _OutOfMemoryAfterSave(tiny(), wd, eval_iterator_fn=evals,
                          train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5)).run()
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("out of device memory at step 3: the train step needs ") and " MiB" in msg
  assert "(compiled peak at micro-batch 1 x accumulation 2, remat none, seq_len 16)" in msg
  assert "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.21GiB." in msg
  assert "train.per_device_batch_size=0 (automatic" in msg and msg.endswith("the last checkpoint is step 2.")
  assert ckpt_lib.steps_in(os.path.join(wd, "checkpoints")) == [2]          # the good checkpoint stays, nothing new
  rep = json.load(open(os.path.join(wd, "report.json")))
  assert rep["status"] == "failed" and rep["message"] == msg and rep["steps_completed"] == 2


# ------------------------------------------------------------------ subprocesses
def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")


KILL_RUNNER = """
import os, sys
sys.path[:0] = [{tests!r}, os.path.dirname({tests!r})]   # this checkout's tests and mor_jax (as conftest.py does)
from test_run_safety import train, tiny
train(sys.argv[1], config=tiny(num_steps=6, save_every_steps=1, async_checkpoints=True))
"""


def test_kill_9_at_random_moments_resumes_bit_exactly(tmp_path):
  """kill -9 at random moments (every step saves, so some land mid-save); the finished run has the loss curve
  of an uninterrupted run (in a process of its own too), every metric row once, and its final state."""
  wd, ref = str(tmp_path / "killed"), str(tmp_path / "uninterrupted")
  runner = tmp_path / "runner.py"
  runner.write_text(KILL_RUNNER.format(tests=os.path.dirname(os.path.abspath(__file__))))
  run = lambda w: subprocess.run([sys.executable, str(runner), w], env=_env(), cwd=ROOT, capture_output=True,
                                 text=True, timeout=300)
  assert run(ref).returncode == 0
  rng = random.Random(0)
  for _ in range(2):
    proc = subprocess.Popen([sys.executable, str(runner), wd], env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    start = len(read_metrics(wd)) if os.path.exists(os.path.join(wd, "metrics.jsonl")) else 0
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(os.path.join(wd, "metrics.jsonl")) and len(read_metrics(wd)) > start:
        time.sleep(rng.uniform(0.0, 0.3))
        break
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  p = run(wd)
  assert p.returncode == 0, p.stderr[-2000:]
  assert losses(wd) == losses(ref)
  with open(os.path.join(wd, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if line.strip()]
  assert steps == [1, 2, 3, 4, 5, 6]                              # no duplicated or missing row
  c = C.validate(tiny(), 4)
  abstract = abstract_state(C.model_config(c), make_optimizer(c)[0])
  shardings = DataParallel("pjit", jax.devices()[:1]).state_shardings(abstract)
  got = []
  for w in (wd, ref):
    ck = ckpt_lib.Checkpointer(os.path.join(w, "checkpoints"))
    got.append(ck.restore(6, abstract, shardings).state)
    ck.close()
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1])))
