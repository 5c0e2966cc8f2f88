"""W&B logging (logging.wandb=offline): the local run files hold metrics.jsonl's series, the config, the report's
summary and plot; a resumed run continues the same run id; no console noise; a missing package or a failing
wandb call never costs a run."""

import glob
import json
import os
import struct
import sys

import numpy as np
import pytest

from mor_jax import config as C
from mor_jax.train import Trainer, read_metrics, train_and_evaluate, wandb_log
from mor_jax.train.synthetic import SyntheticIterator
from tiny import tiny_config

wandb_proto = pytest.importorskip("wandb.proto.wandb_internal_pb2")   # requirements-logging.txt (CI installs it)

VOCAB, SEQ, ROWS = 128, 16, 8
BLOCK, HEADER = 32768, 7        # the .wandb file: ':W&B' + magic + version, then LevelDB-log blocks of records


def read_wandb_file(path):
  """The protobuf Records of an offline run's .wandb file (LevelDB log format: 7-byte record headers,
  records split over 32 KiB blocks as FULL=1 or FIRST=2 / MIDDLE=3 / LAST=4 chunks)."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B", data[:HEADER]
  pos, chunk, records = HEADER, b"", []
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:          # a block's tail too short for a header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
    if kind == 0:
      break
    chunk += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      rec = wandb_proto.Record()
      rec.ParseFromString(chunk)
      records.append(rec)
      chunk = b""
  return records


def offline_runs(workdir):
  """[(run folder, records)] of WORKDIR/wandb/offline-run-*, oldest first (the latest-run link left out)."""
  dirs = sorted(d for d in glob.glob(os.path.join(workdir, "wandb", "offline-run-*")) if not os.path.islink(d))
  return [(d, read_wandb_file(glob.glob(os.path.join(d, "*.wandb"))[0])) for d in dirs]


def history(records):
  """{step: {key: value}} of the history records."""
  out = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      out.setdefault(int(items["_step"]), {}).update(items)
  return out


def summary(records):
  out = {}
  for r in records:
    if r.WhichOneof("record_type") == "summary":
      out.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
  return out


def tiny(**train):
  c = tiny_config("cycle", 2, "expert", vocab=VOCAB, seq_len=SEQ, model__scan_layers=False)
  c.name = "tiny-wandb"
  c.train.update(dict(dict(num_steps=6, total_batch_size=ROWS, per_device_batch_size=ROWS, warmup_steps=1,
                           learning_rate=1e-2, log_every_steps=2, eval_every_steps=3, eval_sequences=8,
                           save_every_steps=3, progress_bar=False, max_steps_per_run=3), **train))
  c.parallel.num_devices = 1
  c.logging.update(wandb="offline", wandb_project="mor-jax-tests", wandb_tags=("tiny,test",))   # a flag's 'tiny,test'
  return c


def run(workdir, config):
  evals = lambda rows: SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=9, num_batches=1)
  return train_and_evaluate(config, str(workdir),
                            train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=3),
                            eval_iterator_fn=evals)


def test_offline_run_matches_metrics_and_resume_continues_the_run(tmp_path, capfd):
  import importlib.util
  if importlib.util.find_spec("openai"):
    import openai  # noqa: F401  (wandb advertises Weave on the console when openai is imported: it must not)
  wd = tmp_path / "run"
  assert run(wd, tiny())["status"] == "paused"                 # steps 1-3
  rid = (wd / "wandb_run_id").read_text().strip()
  assert run(wd, tiny())["status"] == "completed"              # resumed: steps 4-6
  assert (wd / "wandb_run_id").read_text().strip() == rid
  console = "".join(capfd.readouterr())
  assert "wandb:" not in console, console                     # W&B's own console lines stay off

  runs = offline_runs(str(wd))
  assert len(runs) == 2 and all(d.endswith("-" + rid) for d, _ in runs)
  for _, records in runs:
    ids = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert ids == {rid}
  first = [r.run for r in runs[0][1] if r.WhichOneof("record_type") == "run"][0]
  assert first.project == "mor-jax-tests" and list(first.tags) == ["tiny", "test"]
  config = {i.key: json.loads(i.value_json) for i in first.config.update}
  assert config["train"]["num_steps"] == 6 and config["logging"]["wandb"] == "offline"

  merged = {}
  for _, records in runs:
    merged.update(history(records))
  rows = read_metrics(str(wd))
  logged = [r["step"] for r in rows]
  assert logged == [1, 2, 3, 4, 6]                             # every log_every_steps, step 1, evals, the ends
  assert [s for s in sorted(merged) if "loss" in merged[s]] == logged
  np.testing.assert_allclose([merged[s]["loss"] for s in logged], [r["loss"] for r in rows], rtol=1e-12)
  for key in ("total_loss", "learning_rate", "grad_norm", "tokens_per_second"):
    np.testing.assert_allclose([merged[s][key] for s in logged], [r[key] for r in rows], rtol=1e-12)
  for r in rows:
    assert [merged[r["step"]][f"tokens_per_recursion/r{i}"] for i in range(2)] == r["tokens_per_recursion"]
  assert [s for s in sorted(merged) if "val_loss" in merged[s]] == [0, 3, 6]
  assert [merged[s]["val_loss"] for s in (3, 6)] == [r["val_loss"] for r in rows if "val_loss" in r]

  report = json.loads((wd / "report.json").read_text())
  for (_, records), status in zip(runs, ("paused", "completed")):
    s = summary(records)
    assert s["status"] == status and s["steps_completed"] == (3 if status == "paused" else 6)
    assert s["report/loss/_type"] == "image-file"              # the plot, logged as an image
    assert glob.glob(os.path.join(_, "files", "media", "images", "report", "loss_*.png"))
  assert s["loss/final"] == report["loss"]["final"] == rows[-1]["loss"]


def test_missing_wandb_is_one_line_error_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)               # `import wandb` raises ImportError
  with pytest.raises(C.ConfigError, match=r"^config\.logging\.wandb: 'offline' needs the wandb package.*"
                     r"pip install -r requirements-logging\.txt") as err:
    Trainer(tiny(), str(tmp_path / "w"))
  assert "\n" not in str(err.value)
  assert not os.path.exists(tmp_path / "w")                    # nothing written
  c = tiny()
  c.logging.wandb = "off"                                      # off: wandb is never imported
  Trainer(c, str(tmp_path / "w"))


def test_bad_wandb_fields_are_one_line_errors():
  for field, value, match in (("wandb", "yes", r"config\.logging\.wandb: unknown value 'yes'"),
                              ("wandb_tags", ("a", 3), r"config\.logging\.wandb_tags: must be a tuple of")):
    c = tiny()
    c.logging[field] = value
    with pytest.raises(C.ConfigError, match=match):
      C.validate(c, 1)


class FailingRun:
  """A wandb run whose every call fails (a full disk, a lost connection)."""

  def __init__(self):
    self.calls = 0
    self.summary = self

  def log(self, *args, **kwargs):
    self.calls += 1
    raise OSError("no space left on device")

  def update(self, *args):
    raise RuntimeError("summary broken")

  def finish(self, exit_code=0):
    self.calls += 1
    self.exit_code = exit_code
    raise RuntimeError("finish broken")


def test_failing_wandb_calls_are_warned_once_and_never_raise(monkeypatch, tmp_path):
  warnings = []
  monkeypatch.setattr(wandb_log.logging, "warning", lambda msg, *a: warnings.append(msg % a))
  fake = FailingRun()
  sink = wandb_log.WandbRun(fake)
  for step in (1, 2, 3):
    sink.write(step, {"step": step, "loss": 2.0, "tokens_per_recursion": [1.0, 0.5], "val_loss": "nan"})
  sink.finish({"status": "failed", "loss": {"final": 2.0}}, str(tmp_path))
  assert fake.calls == 4 and fake.exit_code == 1 and sink.run is None
  assert len(warnings) == 1 and "W&B: log failed (OSError: no space left on device)" in warnings[0]
  assert wandb_log.scalars({"step": 4, "loss": 2.5, "tokens_per_recursion": [1.0, 0.5], "val_loss": "nan"}) == {
      "loss": 2.5, "tokens_per_recursion/r0": 1.0, "tokens_per_recursion/r1": 0.5, "val_loss": pytest.approx(
          float("nan"), nan_ok=True)}


def test_run_id_is_kept_and_written_atomically(tmp_path):
  ids = iter(["first", "second"])
  assert wandb_log.run_id(str(tmp_path), lambda: next(ids)) == "first"
  assert wandb_log.run_id(str(tmp_path), lambda: next(ids)) == "first"
  assert (tmp_path / "wandb_run_id").read_text() == "first\n" and os.listdir(tmp_path) == ["wandb_run_id"]
