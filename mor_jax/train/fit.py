"""Fitting the train step to the devices' memory: the compiled step's bytes per device, the automatic
micro-batch and remat policy, and the one-line out-of-memory error.

Nothing here runs a step or allocates a state: `StepCompiler` lowers and compiles the train step for abstract
arguments (`jax.ShapeDtypeStruct`s placed as the run places them) and reads XLA's memory analysis of the
executable (`aot.memory_analysis`). Per device:
  parameters, optimizer state   exact, from the shapes and the placement (`dp.state_memory`)
  temporaries                   XLA's temp buffer: activations kept for the backward pass, gradients, the
                                accumulation buffer (accumulation > 1), the optimizer update's intermediates
  peak                          arguments + outputs not aliased to them + temporaries: all the executable holds

The budget (`execution.memory_budget_gib`, 0 = automatic): the device's limit (`memory_stats()['bytes_limit']`,
GPU/TPU: with JAX's default preallocation 75% of the card, XLA_PYTHON_CLIENT_MEM_FRACTION sets it) minus
MARGIN (allocator fragmentation, the evaluation step, prefetched batches, library workspaces). CPU reports no
limit: the host's physical memory divided by this process's devices (they share it), minus MARGIN.

`train.per_device_batch_size = 0`: the largest divisor m of total_batch_size / devices whose compiled step's
peak fits the budget, found by compiling a few candidates near the answer (`largest_fitting`: the smallest, then
guesses along the line through the measured peaks; peak memory grows about linearly with m). Accumulation is
total / (m x devices): the same optimisation as that setting by hand (step.py's objective is exactly the large
batch's). `execution.remat_policy = auto`: none,
then dots, then full, the first with which the step fits (at micro-batch 1 when that is automatic too). The
candidates are compiled for the routing mode of the run's first step (capacity warm-up when configured) and the
chosen one's executable is the one the run calls, so the search costs only the other candidates' compiles.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, Sequence

from absl import logging
import jax

from mor_jax import config as config_lib
from mor_jax import distributed
from mor_jax.errors import DeviceMemoryError
from mor_jax.train.aot import AOTStep, batch_signature, memory_analysis
from mor_jax.train.step import make_train_step, routing_mode_for_step

MARGIN = 0.10                                        # of the device's (or host's) memory, kept free
REMAT_ESCALATION = ("none", "dots", "full")          # what execution.remat_policy=auto tries, in order
BATCH_KEYS = ("tokens", "segment_ids", "positions")  # the int32 [rows, seq_len + 1] arrays of a training batch


def batch_keys(config) -> tuple[str, ...]:
  """The arrays of the run's training batches: chat data (data.corpus 'chat', data/chat.py) adds `loss_mask`."""
  return BATCH_KEYS + (("loss_mask",) if config.data.corpus == "chat" else ())
SEQ_DIVISORS = (2, 4, 8)                             # shorter data.seq_len tried when micro-batch 1 does not fit
FAR = 1.25                                           # largest_fitting: predicted this far over, not compiled


def size(n: float | None) -> str:
  """Bytes in MiB below 1 GiB, else GiB (what memory messages and `--mode=info` print)."""
  if n is None:
    return "n/a"
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


@dataclasses.dataclass(frozen=True)
class Budget:
  bytes: int                # per device
  limit: int | None         # the device's own limit, where the backend reports one
  how: str                  # where `bytes` comes from

  def describe(self) -> str:
    return f"{size(self.bytes)} ({self.how})"


def local_devices(dp) -> list:
  return [d for d in dp.devices if d.process_index == jax.process_index()]


def device_limit(devices) -> int | None:
  """The smallest `bytes_limit` the devices' allocators report (GPU/TPU), or None (CPU reports none)."""
  limits = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and stats.get("bytes_limit"):
      limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


def host_memory() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budget(config, dp) -> Budget:
  """Per-device bytes the automatic choices must fit (see the module docstring)."""
  devices = local_devices(dp)
  limit = device_limit(devices)
  given = float(config.execution.memory_budget_gib)
  if given > 0:
    return Budget(int(given * 2**30), limit, f"execution.memory_budget_gib={given:g}")
  if limit is not None:
    return Budget(int(limit * (1 - MARGIN)), limit, f"the device limit {size(limit)} minus {MARGIN:.0%}")
  if devices[0].platform == "cpu":
    host = host_memory()
    return Budget(int(host / len(devices) * (1 - MARGIN)), None,
                  f"host memory {size(host)} / {len(devices)} device{'s' if len(devices) > 1 else ''}, minus "
                  f"{MARGIN:.0%}")
  raise config_lib.ConfigError(f"config.execution.memory_budget_gib: the {devices[0].platform} backend reports no "
                               "memory limit; set the per-device budget in GiB (e.g. 40).")


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def largest_fitting(candidates: Sequence[int], peak: Callable[[int], int], budget: int) -> int | None:
  """The largest of the ascending `candidates` m with peak(m) <= budget, or None; `peak` compiles (the caller
  caches it) and grows with m.

  The smallest first; when even its peak times m would fit, the largest next (ample memory: two compiles). Else
  the second smallest, then a line through the smallest and the largest fitting so far guesses the answer, and the
  guess (kept strictly between the largest known to fit and the smallest known not to) is compiled, until they are
  neighbours: three or four compiles near the answer when memory is linear in m. A candidate the line puts more
  than FAR x the budget is taken as not fitting without compiling it (a large batch is slow to compile, on CPU
  too); the answer itself is always compiled. When the smallest does not fit, no larger one with accumulation
  fits either; of two candidates the larger (accumulation 1: no accumulation buffer) is still tried.
  """
  n, fits = len(candidates), lambda i: peak(candidates[i]) <= budget
  if not fits(0):
    return candidates[-1] if n == 2 and fits(1) else None
  lo, hi = 0, n                       # candidates[lo] fits; candidates[hi] does not (n: none known)
  if n > 1 and peak(candidates[0]) * candidates[-1] / candidates[0] <= budget:
    if fits(n - 1):                   # fits even if every byte grew with m: ample memory, two compiles in all
      return candidates[-1]
    hi = n - 1
  while hi - lo > 1:
    if lo == 0:
      g = 1
    else:
      slope = max((peak(candidates[lo]) - peak(candidates[0])) / (candidates[lo] - candidates[0]), 1e-9)
      room = (budget - peak(candidates[lo])) / slope
      g = max((i for i in range(lo + 1, hi) if candidates[i] - candidates[lo] <= room), default=lo + 1)
      if peak(candidates[lo]) + slope * (candidates[g] - candidates[lo]) > FAR * budget:
        break
    if fits(g):
      lo = g
    else:
      hi = g
  return candidates[lo]


@dataclasses.dataclass(frozen=True)
class Fit:
  """What the search chose, with the chosen step's memory and every candidate compiled."""
  micro: int
  accum: int
  remat: str
  memory: dict
  budget: Budget
  tried: tuple              # ((micro, remat, seq_len, peak bytes), ...) in compile order
  seconds: float            # spent compiling candidates

  def apply(self, config, policy):
    """Sets the config's micro-batch, accumulation and remat policy; returns the policy with this remat."""
    config.train.per_device_batch_size, config.train.grad_accum_steps = self.micro, self.accum
    config.execution.remat_policy = self.remat
    return dataclasses.replace(policy, remat_policy=self.remat)

  def record(self) -> dict:
    """What report.json and the checkpoint's run record keep."""
    return {"per_device_batch_size": self.micro, "grad_accum_steps": self.accum, "remat_policy": self.remat,
            "peak_bytes": self.memory.get("peak_memory"), "budget_bytes": self.budget.bytes,
            "budget": self.budget.how, "search_seconds": round(self.seconds, 2),
            "candidates": [{"per_device_batch_size": m, "remat_policy": r, "seq_len": s, "peak_bytes": p}
                           for m, r, s, p in self.tried]}


class StepCompiler:
  """Compiles, never runs, the train step of a validated `config` on `dp` for candidate settings."""

  def __init__(self, config, dp, cfg, tx, schedule, policy, abstract):
    self.config, self.dp, self.cfg, self.tx, self.schedule, self.policy = config, dp, cfg, tx, schedule, policy
    self.abstract = abstract
    self.seq_len = int(config.data.seq_len)
    self.share = int(config.train.total_batch_size) // dp.num_devices      # rows per device and optimizer step
    self.routing_mode = routing_mode_for_step(cfg, 0)
    self.state_bytes = dp.state_memory(abstract)
    self.results: dict[tuple, dict] = {}    # (micro, remat, seq_len) -> memory analysis
    self._fns: dict[str, Callable] = {}

  @classmethod
  def for_config(cls, config, dp) -> "StepCompiler":
    """From a config validated for `dp`'s devices (what `--mode=info` uses; the trainer passes its own parts)."""
    from mor_jax.kernels import policy as policy_lib  # pylint: disable=g-import-not-at-top
    from mor_jax.train.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
    from mor_jax.train.state import abstract_state  # pylint: disable=g-import-not-at-top
    cfg = config_lib.model_config(config)
    tx, schedule = make_optimizer(config)
    return cls(config, dp, cfg, tx, schedule, policy_lib.resolve(config, jax.default_backend()),
               abstract_state(cfg, tx, int(config.train.seed)))

  def _build(self, remat: str, sink: dict | None) -> Callable:
    policy = dataclasses.replace(self.policy, remat_policy=remat)
    step = make_train_step(self.cfg, self.tx, self.schedule, policy=policy,
                           document_mask=bool(self.config.data.document_mask))
    shardings = self.dp.state_shardings(self.abstract) if self.dp.mode == "pjit" else None
    return self.dp.ahead_of_time(self.dp.compile_train_step(step, shardings), routes=self.cfg.mor_enable, sink=sink)

  def train_fn(self, remat: str) -> Callable:
    """The train function with `remat` that candidates are compiled with (one per policy)."""
    if remat not in self._fns:
      self._fns[remat] = self._build(remat, {})
    return self._fns[remat]

  def _args(self, micro: int, seq_len: int):
    return self.dp.abstract_train_args(self.abstract, self.share // micro, micro, seq_len + 1,
                                       batch_keys(self.config))

  def memory(self, micro: int, remat: str, seq_len: int | None = None) -> dict:
    """XLA's memory analysis of the step at micro-batch `micro` (accumulation share / micro), compiled once."""
    seq_len = seq_len or self.seq_len
    key = (micro, remat, seq_len)
    if key not in self.results:
      fn, (state, batch) = self.train_fn(remat), self._args(micro, seq_len)
      if isinstance(fn, AOTStep):
        fn.compile(state, batch, self.routing_mode)
        mem = fn.key_memory[(self.routing_mode, batch_signature(batch))]
      else:                                   # pmap: compiled here; its own call compiles again
        t = time.perf_counter()
        mem = memory_analysis(fn.lower(state, batch, self.routing_mode).compile())
        mem["compile_seconds"] = time.perf_counter() - t
      self.results[key] = mem
      logging.info("memory fit: micro-batch %d x accumulation %d, remat %s, seq_len %d: peak %s per device",
                   micro, self.share // micro, remat, seq_len, size(mem.get("peak_memory")))
    return self.results[key]

  def peak(self, micro: int, remat: str, seq_len: int | None = None) -> int:
    return int(self.memory(micro, remat, seq_len).get("peak_memory", 0))

  def run_fn(self, fit: Fit | None, remat: str) -> Callable:
    """The train function the run calls: with `fit`, the chosen candidate's (its executable compiled already,
    its memory recorded in `dp.compiled_memory`); else a fresh one with `remat`."""
    if fit is None:
      return self._build(remat, self.dp.compiled_memory)
    fn = self.train_fn(fit.remat)
    if isinstance(fn, AOTStep):
      fn.keep_only(self.routing_mode, self._args(fit.micro, self.seq_len)[1], self.dp.compiled_memory)
    return fn


def choose(steps: StepCompiler) -> Fit | None:
  """Resolves train.per_device_batch_size=0 and execution.remat_policy=auto by compiling candidates (module
  docstring); None when the config asks for neither. Raises DeviceMemoryError when nothing fits."""
  t, e = steps.config.train, steps.config.execution
  auto_batch, auto_remat = int(t.per_device_batch_size) == 0, e.remat_policy == "auto"
  if not (auto_batch or auto_remat):
    return None
  start, b = time.perf_counter(), budget(steps.config, steps.dp)
  micros = divisors(steps.share) if auto_batch else [int(t.per_device_batch_size)]
  remats = REMAT_ESCALATION if auto_remat else (str(e.remat_policy),)
  chosen = None
  if steps.state_bytes["total"] < b.bytes:
    for remat in remats:
      micro = largest_fitting(micros, lambda m, r=remat: steps.peak(m, r), b.bytes)
      if micro is not None:
        chosen = (micro, remat)
        break
  everyone = distributed.allgather_json(chosen)         # several processes: the most cautious choice of all
  if any(c is None for c in everyone):
    raise nothing_fits(steps, b, micros, remats)
  micro = min(c[0] for c in everyone)
  remat = max((c[1] for c in everyone), key=lambda r: REMAT_ESCALATION.index(r) if r in REMAT_ESCALATION else 0)
  tried = tuple((m, r, s, int(mem.get("peak_memory", 0))) for (m, r, s), mem in steps.results.items())
  fit = Fit(micro, steps.share // micro, remat, steps.memory(micro, remat), b, tried, time.perf_counter() - start)
  logging.info("memory fit: micro-batch %d x accumulation %d x %d devices = %d sequences, remat %s; peak %s per "
               "device within the budget %s; %d candidates compiled in %.1f s", micro, fit.accum,
               steps.dp.num_devices, int(t.total_batch_size), remat, size(fit.memory.get("peak_memory")),
               b.describe(), len(tried), fit.seconds)
  return fit


def run_record(config, fit: Fit | None) -> dict:
  """The micro-batch and accumulation a run used (and the search's record when automatic), for its run record."""
  out = {"per_device_batch_size": int(config.train.per_device_batch_size),
         "grad_accum_steps": int(config.train.grad_accum_steps)}
  return {**out, "memory_fit": fit.record()} if fit is not None else out


def fit_run(config, dp, cfg, tx, schedule, policy, abstract) -> tuple[StepCompiler, Fit | None, object]:
  """The trainer's (StepCompiler, Fit or None, policy): the config's micro-batch and remat policy set when chosen."""
  steps = StepCompiler(config, dp, cfg, tx, schedule, policy, abstract)
  fit = choose(steps)
  return steps, fit, fit.apply(config, policy) if fit is not None else policy


def nothing_fits(steps: StepCompiler, b: Budget, micros: Sequence[int], remats: Sequence[str]) -> DeviceMemoryError:
  """The one-line error when no candidate fits, with the settings that do (found by compiling a few more)."""
  state, smallest, last, n = steps.state_bytes, micros[0], remats[-1], steps.dp.num_devices
  if state["total"] >= b.bytes:
    need = (f"the train state alone needs {size(state['total'])} per device (parameters "
            f"{size(state['params'])}, optimizer state {size(state['opt_state'])})")
    fixes = []
  else:
    need = (f"the train step needs {size(steps.peak(smallest, last))} per device at micro-batch {smallest} "
            f"(remat {last}, seq_len {steps.seq_len})")
    fixes = _smaller_settings(steps, b, micros, remats)
  if not fixes:
    fixes.append("none found (" + ("a smaller micro-batch, remat full and a shorter data.seq_len were compiled"
                                   if state["total"] < b.bytes else "no micro-batch, remat or seq_len makes the "
                                   "state smaller") + ")")
    if steps.dp.mode == "pjit" and steps.dp.fsdp_size == 1 and n > 1:
      fixes.append(f"parallel.fsdp={n} may (it shards parameters and optimizer state: about "
                   f"{size(state['total'] / n)} per device instead of {size(state['total'])})")
    fixes.append("a larger execution.memory_budget_gib" if b.how.startswith("execution.") else
                 "devices with more memory")
  return DeviceMemoryError(f"out of memory: {need}, but {b.describe()} is available; settings that fit: "
                           f"{'; '.join(fixes)}. Nothing was run or written.")


def _smaller_settings(steps: StepCompiler, b: Budget, micros: Sequence[int], remats: Sequence[str]) -> list[str]:
  """What fits when no candidate did: a smaller micro-batch (when one was given by hand), else remat full, else a
  shorter data.seq_len at micro-batch 1: the first that fits, found by compiling."""
  fits = lambda m, r, s=None: steps.peak(m, r, s) <= b.bytes  # noqa: E731
  last = remats[-1]
  smaller = [m for m in divisors(steps.share) if m < micros[0]]
  m = largest_fitting(smaller, lambda m: steps.peak(m, last), b.bytes) if smaller else None
  if m is not None:
    return [f"train.per_device_batch_size={m} (accumulation {steps.share // m}) or 0 (automatic)"]
  remat = last
  if "full" not in remats:
    candidates = smaller + list(micros)
    if fits(candidates[0], "full"):
      m = largest_fitting(candidates, lambda m: steps.peak(m, "full"), b.bytes)
      return [f"execution.remat_policy=full with train.per_device_batch_size={m}"]
    remat = min((last, "full"), key=lambda r: steps.peak(candidates[0], r))
  for k in SEQ_DIVISORS:
    if steps.seq_len // k >= 1 and fits(1, remat, steps.seq_len // k):
      return [f"data.seq_len={steps.seq_len // k} with train.per_device_batch_size=1" +
              ("" if remat == last else f" and execution.remat_policy={remat}")]
  return []


def is_out_of_memory(e: BaseException) -> bool:
  """XLA's out-of-memory error (RESOURCE_EXHAUSTED) from a device allocation, a compile or a transfer."""
  text = str(e)
  return isinstance(e, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text or
                                                         "out of memory" in text.lower())


def runtime_error(e: BaseException, *, config, dp, state_bytes: dict, step: int, last_checkpoint: int | None
                  ) -> DeviceMemoryError:
  """The one-line error for an out-of-memory at run time (`is_out_of_memory(e)`), in place of XLA's trace."""
  t = config.train
  micro, accum = int(t.per_device_batch_size), int(t.grad_accum_steps)
  compiled = [m for m in dp.compiled_memory.values() if m.get("peak_memory")]
  peak = max((m["peak_memory"] for m in compiled), default=None)
  if peak is not None:
    need = (f"the train step needs {size(peak)} per device (compiled peak at micro-batch {micro} x "
            f"accumulation {accum}, remat {config.execution.remat_policy}, seq_len {int(config.data.seq_len)})")
  else:
    need = f"the train state alone needs {size(state_bytes.get('total'))} per device"
  devices = local_devices(dp)
  limit = device_limit(devices)
  if limit is not None:
    have = f"the device's limit is {size(limit)}"
  elif devices[0].platform == "cpu":
    have = f"the host has {size(host_memory())} for {len(devices)} devices"
  else:
    have = "the backend reports no limit"
  fixes = ["train.per_device_batch_size=0 (automatic: the largest micro-batch whose compiled step fits, same "
           "total batch)"]
  if peak is not None and limit is not None and micro > 1:    # temporaries scale about linearly with the micro-batch
    temp = max((m.get("temp_size", 0) for m in compiled), default=0)
    share = micro * accum
    guess = [m for m in divisors(share) if m < micro and peak - temp + temp * m / micro <= limit * (1 - MARGIN)]
    if guess:
      fixes.append(f"about train.per_device_batch_size={guess[-1]} (accumulation {share // guess[-1]})")
  if config.execution.remat_policy != "full":
    fixes.append("execution.remat_policy=auto")
  kept = f"the last checkpoint is step {last_checkpoint}" if last_checkpoint and last_checkpoint > 0 else \
      "no checkpoint was written"
  first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
  return DeviceMemoryError(f"out of device memory at step {step + 1}: {need}, but {have} (XLA: {first}); settings "
                           f"that fit: {' or '.join(fixes)}. No checkpoint was touched; {kept}.")

