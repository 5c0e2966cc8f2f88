"""train.profile_steps=START,COUNT writes a jax.profiler trace of exactly those steps into WORKDIR/profile; the
first logged tokens/s of a (re)started run leaves out the compiling first step."""

import glob
import gzip
import json
import os
import time

import pytest

from mor_jax import config as C
from mor_jax.train import Trainer, profile, read_metrics
from mor_jax.train.synthetic import SyntheticIterator
from tiny import tiny_config

VOCAB, SEQ, ROWS = 128, 16, 8


def tiny(**train):
  c = tiny_config(vocab=VOCAB, seq_len=SEQ)
  c.name = "tiny-profile"
  c.train.update(dict(dict(num_steps=5, total_batch_size=ROWS, per_device_batch_size=ROWS, warmup_steps=1,
                           log_every_steps=1, eval_every_steps=0, eval_sequences=0, save_every_steps=5,
                           progress_bar=False), **train))
  c.parallel.num_devices = 1
  return c


def run(workdir, config, trainer_class=Trainer):
  data = SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=1)
  return trainer_class(config, str(workdir), train_iterator=data).run()


def traced_calls(trace_file, function: str) -> int:
  """Calls of a Python function (the profiler's Python tracer names it '$file.py:line name') in a trace."""
  with gzip.open(trace_file, "rt") as f:
    events = json.load(f)["traceEvents"]
  return sum(1 for e in events if str(e.get("name", "")).startswith("$") and e["name"].endswith(" " + function))


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path):
  wd = tmp_path / "run"
  assert run(wd, tiny(profile_steps="2,3"))["status"] == "completed"
  runs = glob.glob(str(wd / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  traces = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
  assert len(traces) == 1 and 2 <= traced_calls(traces[0], "train_step") <= 3   # inside steps 2 to 4 of 5
  assert traced_calls(traces[0], "_report") == 0                                # stopped before the end


class Calls(list):
  def __call__(self, name):
    return lambda *args, **kwargs: self.append((name, self.step))


def test_profiler_starts_before_start_and_stops_after_the_last_step_has_finished(tmp_path, monkeypatch):
  calls = Calls()
  for name in ("start_trace", "stop_trace"):
    monkeypatch.setattr(profile.jax.profiler, name, calls(name))
  monkeypatch.setattr(profile.jax, "block_until_ready", calls("block_until_ready"))
  p = profile.StepProfiler(C.validate(tiny(profile_steps="2,3"), 1), str(tmp_path), start_step=0)
  for calls.step in range(1, 6):       # the trainer: before(step) ... dispatch ... after(step, state)
    p.before(calls.step)
    p.after(calls.step, state=None)
  p.stop()                             # at the end of the run: nothing left to stop
  assert calls == [("start_trace", 2), ("block_until_ready", 4), ("stop_trace", 4)]
  calls.clear()                        # a run that resumes after START traces nothing; one stopped inside the
  late = profile.StepProfiler(C.validate(tiny(profile_steps="2,3"), 1), str(tmp_path), start_step=2)
  late.before(3)
  p = profile.StepProfiler(C.validate(tiny(profile_steps="2,3"), 1), str(tmp_path), start_step=0)
  for calls.step in (1, 2, 3):         # window is closed by stop()
    p.before(calls.step)
    p.after(calls.step, state=None)
  p.stop()
  assert calls == [("start_trace", 2), ("stop_trace", 3)]
  calls.clear()                        # a trace that cannot start (another one is running): warned, training goes on

  def busy(*args, **kwargs):
    raise RuntimeError("Only one profile may be run at a time.")
  monkeypatch.setattr(profile.jax.profiler, "start_trace", busy)
  p = profile.StepProfiler(C.validate(tiny(profile_steps="2,3"), 1), str(tmp_path), start_step=0)
  for calls.step in range(1, 6):
    p.before(calls.step)
    p.after(calls.step, state=None)
  p.stop()
  assert calls == [] and p.window is None


def test_profile_steps_bad_value_is_one_line_error():
  for bad in ("5", "a,b", "0,2", "3,0", "1,2,3"):
    with pytest.raises(C.ConfigError, match=r"^config\.train\.profile_steps: .*'START,COUNT'") as err:
      C.validate(tiny(profile_steps=bad), 1)
    assert "\n" not in str(err.value)
  assert C.validate(tiny(profile_steps=" "), 1).train.profile_steps == " "    # blank: off


COMPILE_SECONDS = 3.0


class SlowCompile(Trainer):
  """The first call of the train step in each process takes COMPILE_SECONDS longer (a slow compilation)."""

  def _prepare(self):
    super()._prepare()
    fn, calls = self.train_fn, []

    def first_call_slow(*args):
      if not calls:
        time.sleep(COMPILE_SECONDS)
      calls.append(1)
      return fn(*args)
    self.train_fn = first_call_slow


def test_first_logged_tokens_per_second_leaves_out_the_compile_step(tmp_path):
  wd = tmp_path / "run"
  assert run(wd, tiny(max_steps_per_run=2), SlowCompile)["status"] == "paused"
  assert run(wd, tiny(), SlowCompile)["status"] == "completed"            # resumed at step 2
  rows = {r["step"]: r for r in read_metrics(str(wd))}
  assert sorted(rows) == [1, 2, 3, 4, 5]
  floor = ROWS * SEQ / (COMPILE_SECONDS / 2)       # a step of this model takes far less than half the delay
  for step in (1, 3):                              # the first logged row of each process
    assert rows[step]["tokens_per_second"] > floor, (step, rows[step]["tokens_per_second"])
