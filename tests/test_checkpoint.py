"""mor_jax.checkpoint: old checkpoints still restore, the manifest names a damaged file, the compatibility
check lists fields, a failed save reads as one line, the workdir lock."""

import errno
import json
import os

import jax
import jax.numpy as jnp
import pytest

from mor_jax import checkpoint as ckpt_lib
from mor_jax import config as C
from mor_jax.checkpoint import integrity, schema
from mor_jax.train import DataParallel, abstract_state, init_state, make_optimizer
from tiny import tiny_config


@pytest.fixture(scope="module")
def setup():
  c = C.validate(tiny_config("cycle", 2, "expert", train__total_batch_size=4, train__per_device_batch_size=1), 1)
  cfg = C.model_config(c)
  tx, _ = make_optimizer(c)
  abstract = abstract_state(cfg, tx)
  shardings = DataParallel("pjit", jax.devices()[:1]).state_shardings(abstract)
  return c, cfg, tx, abstract, shardings


def _save(directory, step, state, meta):
  ck = ckpt_lib.Checkpointer(str(directory), async_save=False)
  ck.save(step, state.replace(step=jnp.int32(step)), {"index": step}, meta)
  ck.close()


def test_old_checkpoint_without_manifest_restores_for_training_and_inference(tmp_path, setup, caplog):
  caplog.set_level("INFO", logger="absl")
  c, cfg, tx, abstract, shardings = setup
  state = init_state(cfg, tx, 0)
  old_arch = dict(schema.architecture(c), attention_impl="custom", batch_groups=2, loss_chunk_tokens=0)
  meta = {"version": 1, "config": json.loads(c.to_json_best_effort()), "model_config": old_arch,
          "history": {"step": [], "loss": [], "learning_rate": []}}
  _save(tmp_path / "checkpoints", 3, state, meta)
  os.remove(tmp_path / "checkpoints" / "3" / "checksums.json")      # written before manifests existed
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  check = lambda m: schema.check_compatible(m, c, abstract, where="here")
  r = ck.restore_latest(abstract, shardings, check_meta=check)
  ck.close()
  assert r.step == 3 and r.data == {"index": 3}
  assert any("no checksums" in rec.getMessage() for rec in caplog.records)
  p = ckpt_lib.restore_params(str(tmp_path))
  assert p.step == 3 and jax.tree.structure(p.variables["params"]) == jax.tree.structure(state.params)


def test_manifest_names_a_truncated_file(tmp_path, setup):
  c, cfg, tx, _, _ = setup
  _save(tmp_path, 2, init_state(cfg, tx, 0), {"history": {}})
  step_dir = str(tmp_path / "2")
  integrity.verify_manifest(step_dir)
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  victim = max(files, key=os.path.getsize)
  with open(victim, "r+b") as f:
    f.truncate(os.path.getsize(victim) // 2)
  with pytest.raises(ckpt_lib.CheckpointCorruptError, match="truncated") as e:
    integrity.verify_manifest(step_dir)
  assert e.value.path == victim
  with pytest.raises(ckpt_lib.CheckpointCorruptError):            # inference verifies too
    ckpt_lib.restore_params(step_dir, config=c)


def test_compatibility_check_lists_fields_and_honours_allow_changes(setup):
  c, cfg, tx, abstract, _ = setup
  meta = schema.new_meta(c, abstract)
  other = C.validate(tiny_config("cycle", 2, "expert", model__rope_theta=500.0, mor__alpha=0.5,
                                 train__total_batch_size=4, train__per_device_batch_size=1), 1)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    schema.check_compatible(meta, other, abstract, where="W")
  msg = str(e.value)
  assert "model.rope_theta: checkpoint 10000.0 vs config 500.0" in msg
  assert "mor.alpha: checkpoint 0.1 vs config 0.5" in msg
  assert "--config.train.allow_changes=" in msg and "Nothing was changed" in msg
  assert schema.check_compatible(meta, other, abstract, where="W",
                                 allow=("model.rope_theta", "mor.alpha")) == ["alpha", "rope_theta"]
  assert schema.check_compatible(meta, c, abstract, where="W") == []


def test_a_failed_save_is_one_clear_line(tmp_path, setup, monkeypatch):
  _, cfg, tx, _, _ = setup
  state = init_state(cfg, tx, 0)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  ck.save(2, state.replace(step=jnp.int32(2)), None, {})

  def full(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")
  monkeypatch.setattr(ck._manager, "save", full)
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    ck.save(4, state.replace(step=jnp.int32(4)), None, {})
  ck.close()
  assert str(e.value) == (f"no space left on device while writing checkpoint 4 to {tmp_path}; the last complete "
                          "checkpoint is step 2")


def test_workdir_lock(tmp_path, caplog):
  wd = str(tmp_path / "w")
  with ckpt_lib.WorkdirLock(wd):
    holder = json.load(open(os.path.join(wd, ".lock")))
    assert holder["pid"] == os.getpid()
    with pytest.raises(ckpt_lib.WorkdirLockedError, match=f"pid {os.getpid()} on {holder['host']}"):
      ckpt_lib.WorkdirLock(wd).acquire()
  assert open(os.path.join(wd, ".lock")).read() == ""          # released cleanly
  with open(os.path.join(wd, ".lock"), "w") as f:                # left by a killed run
    json.dump({"pid": 999999, "host": "h", "started": "t"}, f)
  with ckpt_lib.WorkdirLock(wd):
    pass
  assert any("pid 999999 on h" in r.getMessage() and "taking it over" in r.getMessage() for r in caplog.records)


def test_a_read_error_during_restore_stops_and_moves_nothing(tmp_path, setup, monkeypatch):
  _, cfg, tx, abstract, shardings = setup
  state = init_state(cfg, tx, 0)
  for s in (2, 4):
    _save(tmp_path, s, state, {"history": {}})
  ck = ckpt_lib.Checkpointer(str(tmp_path))
  real = ck._manager.restore

  def flaky(step, args=None):
    if "state" in dict(args.items()):
      raise OSError(errno.EIO, "Input/output error")
    return real(step, args=args)
  monkeypatch.setattr(ck._manager, "restore", flaky)
  with pytest.raises(ckpt_lib.CheckpointError, match="not a proven corruption") as e:
    ck.restore_latest(abstract, shardings)
  ck.close()
  assert "checkpoint 4" in str(e.value) and "Input/output error" in str(e.value)
  assert ckpt_lib.steps_in(str(tmp_path)) == [2, 4] and not os.path.exists(str(tmp_path) + "_corrupt")


def test_the_manifest_is_written_off_the_training_thread_and_only_for_a_complete_save(tmp_path, setup, monkeypatch):
  """poll() (after each step) starts the SHA-256 on a background thread once Orbax reports the step complete, and
  returns without waiting for it; the next save / close joins it. The manifest lists exactly the finished step's
  files (no Orbax temporary directory exists while it is computed)."""
  import threading  # noqa: PLC0415
  import time  # noqa: PLC0415
  from mor_jax.checkpoint import manager  # noqa: PLC0415
  _, cfg, tx, _, _ = setup
  state = init_state(cfg, tx, 0)
  seen, release = [], threading.Event()
  real = integrity.write_manifest

  def slow_manifest(step_dir):
    parent = os.path.dirname(step_dir)
    seen.append((threading.current_thread() is threading.main_thread(), os.path.isdir(step_dir),
                 [n for n in os.listdir(parent) if "tmp" in n]))
    release.wait(30)
    return real(step_dir)

  monkeypatch.setattr(manager.integrity, "write_manifest", slow_manifest)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=True)
  ck.save(1, state.replace(step=jnp.int32(1)), {"index": 1}, {"history": {}})
  deadline = time.time() + 60
  while not seen and time.time() < deadline:     # the training loop's poll() after each step
    t0 = time.time()
    ck.poll()
    assert time.time() - t0 < 5                  # never waits for the hashing
    time.sleep(0.05)
  assert seen == [(False, True, [])]             # off the main thread, the step final, no Orbax temporary left
  assert not os.path.exists(tmp_path / "1" / "checksums.json")
  release.set()
  ck.close()                                     # joins the manifest
  integrity.verify_manifest(str(tmp_path / "1"))
  listed = json.load(open(tmp_path / "1" / "checksums.json"))["files"]
  on_disk = {os.path.relpath(os.path.join(r, f), tmp_path / "1") for r, _, fs in os.walk(tmp_path / "1") for f in fs}
  assert set(listed) == on_disk - {"checksums.json"}


def test_a_failed_manifest_is_one_clear_line_at_the_next_save(tmp_path, setup, monkeypatch):
  from mor_jax.checkpoint import manager  # noqa: PLC0415
  _, cfg, tx, _, _ = setup

  def broken(step_dir):
    raise OSError(errno.EIO, "Input/output error")

  monkeypatch.setattr(manager.integrity, "write_manifest", broken)
  ck = ckpt_lib.Checkpointer(str(tmp_path), async_save=False)
  with pytest.raises(ckpt_lib.CheckpointSaveError, match="writing the checksums of .*/2 failed"):
    ck.save(2, init_state(cfg, tx, 0).replace(step=jnp.int32(2)), {"index": 2}, {"history": {}})
  ck.close()
  assert not os.path.exists(tmp_path / "2" / "checksums.json")
