"""Fitting the run to the devices (issue 39): the automatic micro-batch against a memory budget, the one-line
error when nothing fits, and the search's binary search."""

import json

import numpy as np
import pytest

from mor_jax import config as C
from mor_jax.train import DeviceMemoryError, Trainer, read_metrics, train_and_evaluate
from mor_jax.train import fit, setup
from mor_jax.train.synthetic import SyntheticIterator
from tiny import tiny_config

pytestmark = pytest.mark.usefixtures("shared_compilation_cache")

VOCAB, SEQ, ROWS = 128, 64, 8


def tiny(**train):
  """A vanilla tiny model, 4 steps on the 4 test devices: 2 rows per device and step (micro-batch 1 or 2)."""
  c = tiny_config(vocab=VOCAB, seq_len=SEQ)
  c.train.update(dict(dict(num_steps=4, total_batch_size=ROWS, warmup_steps=1, learning_rate=1e-2, log_every_steps=1,
                           eval_every_steps=0, eval_sequences=0, save_every_steps=0, progress_bar=False), **train))
  return c


def train(workdir, config):
  return train_and_evaluate(config, str(workdir), eval_iterator_fn=lambda rows: iter(()),
                            train_iterator=SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=ROWS, seed=5))


@pytest.fixture(scope="module")
def peaks():
  """Compiled (not run) peak bytes per device of micro-batch 1 and 2, and the state's bytes."""
  c = C.validate(tiny(per_device_batch_size=1), 4)
  steps = fit.StepCompiler.for_config(c, setup.data_parallel_for(c))
  return (steps.peak(1, "none"), steps.peak(2, "none")), steps.state_bytes


def test_largest_fitting_compiles_few_candidates_near_the_answer():
  """Linear peaks (state + accumulation buffer + activations per sequence; accumulation 1, the largest candidate,
  has no buffer): the right answer for every budget, the two smallest, then at most two compiles near it, never
  the largest (a huge batch) unless it is predicted to fit within fit.FAR. Any growing peak: still the right answer."""
  share = 256
  candidates = fit.divisors(share)

  def linear(m):
    return 3000 + 100 * m + (130 if m < share else 0)
  for budget in [*range(2000, 3000 + 101 * share, 97), linear(1) * share]:
    calls = []                                          # distinct candidates compiled, in order

    def peak(m, calls=calls):
      if m not in calls:
        calls.append(m)
      return linear(m)
    got = fit.largest_fitting(candidates, peak, budget)
    assert got == max([m for m in candidates if linear(m) <= budget], default=None), budget
    assert len(calls) <= 4 and (share not in calls or linear(share) <= fit.FAR * budget), (budget, calls)
    if linear(1) * share <= budget:                     # ample memory: the smallest, then the largest
      assert calls == [1, share], (budget, calls)
  for budget in range(0, 70000, 1000):                  # quadratic: slower to guess, still exact
    got = fit.largest_fitting(candidates, lambda m: 5 * m * m, budget)
    assert got == max([m for m in candidates if 5 * m * m <= budget], default=None)
  assert fit.largest_fitting([1, 2], {1: 10, 2: 8}.get, 9) == 2      # micro-batch 1's buffer weighs more


def test_auto_micro_batch_fits_the_budget_and_trains_like_the_manual_setting(peaks, tmp_path):
  (p1, p2), _ = peaks
  assert p1 < p2
  budget_gib = (p1 + p2) / 2 / 2**30                    # below the full micro-batch's peak, above micro-batch 1's
  auto = train(tmp_path / "auto", _with(tiny(per_device_batch_size=0), memory_budget_gib=budget_gib))
  manual = train(tmp_path / "manual", tiny(per_device_batch_size=1))
  assert manual["status"] == "completed"
  assert auto["per_device_batch_size"] == 1 and auto["grad_accum_steps"] == 2 and auto["status"] == "completed"
  stored = json.load(open(tmp_path / "auto" / "report.json"))
  assert (stored["per_device_batch_size"], stored["grad_accum_steps"]) == (1, 2)
  record = stored["runs"][-1]["memory_fit"]
  assert [(c["per_device_batch_size"], c["peak_bytes"]) for c in record["candidates"]] == [(1, p1), (2, p2)]
  assert record["peak_bytes"] == p1 <= record["budget_bytes"] < p2
  assert auto["compilations"]["train_step"] == 2         # the two candidates; the chosen one's executable is reused
  a = [r["loss"] for r in read_metrics(str(tmp_path / "auto"))]
  m = [r["loss"] for r in read_metrics(str(tmp_path / "manual"))]
  assert len(a) == 4
  np.testing.assert_allclose(a, m, rtol=0, atol=1e-5)


def _with(c, **execution):
  c.execution.update(execution)
  return c


def test_a_budget_nothing_fits_is_one_line_naming_sizes(peaks, tmp_path):
  (p1, _), state = peaks
  wd = tmp_path / "w"
  with pytest.raises(DeviceMemoryError) as e:          # below the state itself: no compile needed to know
    Trainer(_with(tiny(per_device_batch_size=0), memory_budget_gib=state["total"] / 2 / 2**30), str(wd))
  msg = str(e.value)
  assert "\n" not in msg and "the train state alone needs" in msg and "MiB" in msg and "Nothing was run" in msg
  assert f"{fit.size(state['total'])} per device" in msg and "parallel.fsdp=4" in msg
  assert not wd.exists()                                # nothing written: the search runs before the lock
  with pytest.raises(DeviceMemoryError) as e:           # above the state, below micro-batch 1's peak
    Trainer(_with(tiny(per_device_batch_size=0), memory_budget_gib=(p1 - 1) / 2**30), str(wd))
  msg = str(e.value)
  assert "\n" not in msg and f"needs {fit.size(p1)} per device at micro-batch 1 (remat none, seq_len {SEQ})" in msg
  fix = msg.split("settings that fit: ")[1]
  assert fix.startswith(("execution.remat_policy=full with", "data.seq_len=")), msg
  assert not wd.exists()


def test_auto_remat_escalates_to_the_first_policy_that_fits():
  """execution.remat_policy=auto: none, dots, full in turn; on CPU with 4 layers `dots` keeps more than `none`
  and only `full` fits a budget just above its peak (the trainer applies the choice the same way: fit.fit_run)."""
  c = tiny(per_device_batch_size=2)
  c.model.num_layers = 4
  c = C.validate(c, 4)
  steps = fit.StepCompiler.for_config(c, setup.data_parallel_for(c))
  peak = {r: steps.peak(2, r) for r in fit.REMAT_ESCALATION}
  assert peak["full"] < peak["none"] < peak["dots"]
  c.execution.update(remat_policy="auto", memory_budget_gib=(peak["full"] + 1024) / 2**30)
  chosen = fit.choose(steps)                              # the candidates are compiled already
  assert (chosen.micro, chosen.accum, chosen.remat) == (2, 1, "full")
  assert [(m, r, p) for m, r, _, p in chosen.tried] == [(2, r, peak[r]) for r in fit.REMAT_ESCALATION]
  policy = chosen.apply(c, steps.policy)
  assert policy.remat_policy == c.execution.remat_policy == "full" and c.train.per_device_batch_size == 2
