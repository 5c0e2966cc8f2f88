"""`--mode=info`'s train-step memory: the step compiled (never run) on this backend for the config's micro-batch
and remat policy, or for the automatic choice (mor_jax/train/fit.py) when the config asks for it."""

from __future__ import annotations

import ml_collections

from mor_jax import config as config_lib
from mor_jax.train import setup
from mor_jax.train.fit import StepCompiler, budget, choose, device_limit, local_devices, size


def memory_summary(config) -> str:
  """`--mode=info`: per-device memory of the train step compiled (not run) on this backend for the config's
  micro-batch and remat policy, or for the automatic choice when the config asks for one."""
  devices = setup.select_devices(config)
  n = len(devices)
  note = ""
  try:
    config = config_lib.validate(config, num_devices=n)
  except config_lib.ConfigError as e:       # e.g. a workdir's batch, written for another device count
    if "train.total_batch_size" not in str(e):
      raise
    c = ml_collections.ConfigDict(config.to_dict())
    old, per = int(c.train.total_batch_size), int(c.train.per_device_batch_size)
    c.train.update(total_batch_size=per * n if per else max(1, old // n) * n, grad_accum_steps=-1)
    note = f" (total_batch_size {old} does not split over {n} devices: shown for {c.train.total_batch_size})"
    config = config_lib.validate(c, num_devices=n)
  dp = setup.data_parallel(config, config_lib.model_config(config), devices)
  steps = StepCompiler.for_config(config, dp)
  fit = choose(steps)
  micro = fit.micro if fit else int(config.train.per_device_batch_size)
  remat = fit.remat if fit else steps.policy.remat_policy
  mem, state, d = steps.memory(micro, remat), steps.state_bytes, dp.devices[0]
  limit = device_limit(local_devices(dp))
  try:
    b = budget(config, dp).describe()
  except config_lib.ConfigError:
    b = "none (set execution.memory_budget_gib)"
  auto = " (automatic)"
  lines = [f"train step memory per device ({d.platform}, {dp.num_devices} x {d.device_kind}, {dp.describe()}; "
           f"compiled in {mem.get('compile_seconds', 0):.1f} s, not run){note}:",
           f"  batch            micro-batch {micro} x accumulation {steps.share // micro} x {dp.num_devices} devices "
           f"= {int(config.train.total_batch_size):,} sequences of {steps.seq_len} tokens"
           + (auto if int(config.train.per_device_batch_size) == 0 else ""),
           f"  remat            {remat}" + (auto if config.execution.remat_policy == "auto" else ""),
           f"  parameters       {size(state['params'])}",
           f"  optimizer state  {size(state['opt_state'])}",
           f"  temporaries      {size(mem.get('temp_size'))} (activations kept for the backward pass, "
           "gradients, accumulation buffer)",
           f"  peak             {size(mem.get('peak_memory'))} (arguments + outputs not aliased + "
           "temporaries)",
           f"  device limit     {size(limit) if limit else f'not reported by the {d.platform} backend'}",
           f"  budget           {b}: what train.per_device_batch_size=0 and execution.remat_policy=auto fit"]
  if fit is not None:
    lines.append("  candidates       " + ", ".join(f"{m} x {s} ({r}): {size(p)}" for m, r, s, p in fit.tried)
                 + f"; {fit.seconds:.1f} s of compiling")
  return "\n".join(lines)
