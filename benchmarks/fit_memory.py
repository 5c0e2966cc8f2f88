"""The first user's setting worked through (issue 39): SmolLM-360M rec2 (configs/smollm360_rec2.py), seq 1024,
total batch 1,024 on 4 x NVIDIA L40S (44.31 GiB each): the micro-batch `train.per_device_batch_size=0` picks
there, computed without that hardware.

  python benchmarks/fit_memory.py            # 3 CPU compiles of the step (~3 min on 2 cores) and the model
  python benchmarks/fit_memory.py --search   # also times the automatic search on this CPU (1 device, ~5 compiles)
  python benchmarks/fit_memory.py --search_cost configs/smollm360_rec2.py:tiny configs/shakespeare_mor.py
      # what per_device_batch_size=0 costs before the first step against the config's own setting, one CPU device
      # (writes benchmarks/results/fit_search_cost_cpu.json)

Sources, each as exact as it can be here:
1. the train state per device (fp32 parameters, AdamW moments): exact, from the model's shapes (dp.state_memory);
2. the GPU step's temporaries: the H100 runs of benchmarks/results/gpu_h100_train_throughput.json (this model,
   bf16, cuDNN attention, layers unrolled, remat none, accumulation 1) at micro-batches 16 and 32 give a line,
   temporaries = fixed + per-sequence x micro-batch. The L40S runs the same XLA:GPU program up to autotuning
   choices, so this is an estimate there, not a measurement;
3. what accumulation > 1 adds (the scan's fp32 gradient carry): the difference between this config's step compiled
   (not run) on CPU at micro-batch 1 with accumulation 2 and with accumulation 1; XLA:CPU's buffer assignment,
   taken as the GPU's.
The choice is then made exactly as mor_jax.train.fit.choose makes it (fit.largest_fitting over the divisors of
1,024 / 4 = 256, the budget the device's limit minus 10%), with the modelled peaks in place of compiles, for
JAX's default GPU memory fraction (75% of the card) and for XLA_PYTHON_CLIENT_MEM_FRACTION=0.95. Writes
benchmarks/results/fit_smollm360_l40s.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from mor_jax import config as C  # noqa: E402
from mor_jax.tools.provenance import write_result  # noqa: E402
from mor_jax.train import DataParallel, fit  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H100 = os.path.join(ROOT, "benchmarks", "results", "gpu_h100_train_throughput.json")
OUT = os.path.join(ROOT, "benchmarks", "results", "fit_smollm360_l40s.json")
L40S_GIB, DEVICES, TOTAL, SEQ = 44.31, 4, 1024, 1024     # the first user's report


def config(total: int, per_device: int):
  c = importlib.import_module("configs.smollm360_rec2").get_config(None)
  c.train.update(total_batch_size=total, per_device_batch_size=per_device, grad_accum_steps=-1)
  return C.validate(c, num_devices=1)


def cpu_compiles() -> dict:
  """This config's step compiled on one CPU device: micro-batch 1 x accumulation 1 and 2, micro-batch 2 x 1."""
  dp = DataParallel("pjit", jax.devices()[:1])
  out = {}
  for micro, accum in ((1, 1), (1, 2), (2, 1)):
    steps = fit.StepCompiler.for_config(config(micro * accum, micro), dp)
    t = time.perf_counter()
    mem = steps.memory(micro, "none")
    out[f"{micro}x{accum}"] = {**mem, "seconds": time.perf_counter() - t}
    print(f"CPU compile micro-batch {micro} x accumulation {accum}: temporaries {fit.size(mem['temp_size'])}, "
          f"peak {fit.size(mem['peak_memory'])} ({out[f'{micro}x{accum}']['seconds']:.0f} s)", flush=True)
  out["state"] = steps.state_bytes
  return out


def gpu_line() -> dict:
  """Temporaries = fixed + per_sequence x micro from the H100 rows (unrolled, accumulation 1)."""
  rows = {r["run"]: r for r in json.load(open(H100))["sweep_rows"]}
  a, b = rows["sweep_unroll_b16"], rows["sweep_unroll_b32"]
  ta, tb = a["compiled_memory"]["temp_size"], b["compiled_memory"]["temp_size"]
  slope = (tb - ta) / (b["per_device_batch"] - a["per_device_batch"])
  held = {r: rows[r]["compiled_memory"] for r in ("sweep_unroll_b16", "sweep_unroll_b32")}
  return {"per_sequence": slope, "fixed": ta - slope * a["per_device_batch"],
          "state_on_h100": a["compiled_memory"]["alias_size"],
          "check": {r: {"compiled_peak": m["argument_size"] + m["output_size"] - m["alias_size"] + m["temp_size"],
                        "allocator_peak": rows[r]["peak_memory_bytes"]} for r, m in held.items()}}


def predicted_peak(micro: int, state: int, line: dict, accum_extra: int) -> int:
  accum = TOTAL // DEVICES // micro
  batch = 3 * 4 * accum * micro * (SEQ + 1)             # tokens, segment_ids, positions (int32)
  return int(state + batch + line["fixed"] + line["per_sequence"] * micro + (accum_extra if accum > 1 else 0))


def choice(budget: int, state: int, line: dict, accum_extra: int) -> dict:
  """fit.largest_fitting over the divisors of 256 with the modelled peaks: its answer and what it would compile."""
  compiled = {}

  def peak(m):
    compiled.setdefault(m, predicted_peak(m, state, line, accum_extra))
    return compiled[m]
  micro = fit.largest_fitting(fit.divisors(TOTAL // DEVICES), peak, budget)
  return {"budget": budget, "micro": micro, "accum": TOTAL // DEVICES // micro if micro else None,
          "compiles": [{"micro": m, "peak": p, "fits": p <= budget} for m, p in compiled.items()]}


def search_cost(paths) -> None:
  """Seconds of compiling before the first step: the config's own micro-batch (one compile) against
  per_device_batch_size=0 (the search; its chosen executable is the one the run calls), on one CPU device."""
  dp, rows = DataParallel("pjit", jax.devices()[:1]), []
  for path in paths:
    name, _, arg = path.partition(":")
    module = importlib.import_module(os.path.splitext(name)[0].replace("/", "."))
    row = {"config": path}
    for label, per_device in (("manual", None), ("automatic", 0)):
      c = module.get_config(arg or None)
      if per_device is not None:
        c.train.update(per_device_batch_size=per_device, grad_accum_steps=-1)
      c = C.validate(c, num_devices=1)
      steps = fit.StepCompiler.for_config(c, dp)
      t = time.perf_counter()
      chosen = fit.choose(steps) if per_device == 0 else None
      micro = chosen.micro if chosen else int(c.train.per_device_batch_size)
      steps.memory(micro, steps.policy.remat_policy)
      row[label] = {"micro": micro, "accum": steps.share // micro, "seconds": time.perf_counter() - t,
                    "compiles": len(steps.results)}
    print(f"{path}: manual micro-batch {row['manual']['micro']}: 1 compile, {row['manual']['seconds']:.1f} s; "
          f"automatic: micro-batch {row['automatic']['micro']}, {row['automatic']['compiles']} compiles, "
          f"{row['automatic']['seconds']:.1f} s", flush=True)
    rows.append(row)
  write_result(os.path.join(ROOT, "benchmarks", "results", "fit_search_cost_cpu.json"), {"rows": rows},
               conditions={"devices": "1 CPU device", "budget": "host memory minus 10%"})


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--search", action="store_true", help="also time fit.choose for this config on one CPU device")
  ap.add_argument("--search_cost", nargs="+", metavar="CONFIG", help="only: the search's cost for these configs")
  args = ap.parse_args()
  if args.search_cost:
    search_cost(args.search_cost)
    return
  cpu = cpu_compiles()
  state = int(cpu["state"]["total"])
  accum_extra = int(cpu["1x2"]["temp_size"] - cpu["1x1"]["temp_size"])
  line = gpu_line()
  print(f"state per device (exact): parameters {fit.size(cpu['state']['params'])}, optimizer state "
        f"{fit.size(cpu['state']['opt_state'])}, total {fit.size(state)} (H100 run: {fit.size(line['state_on_h100'])})")
  print(f"accumulation > 1 adds {fit.size(accum_extra)} (CPU compile); GPU temporaries {fit.size(line['fixed'])} + "
        f"{fit.size(line['per_sequence'])} per sequence of {SEQ} tokens (H100, accumulation 1)")
  for run, c in line["check"].items():
    print(f"  {run}: compiled peak {c['compiled_peak']:,} B, allocator peak {c['allocator_peak']:,} B")
  result = {"state": cpu["state"], "accumulation_extra": accum_extra, "gpu_line": line, "cpu_compiles": cpu,
            "choices": {}}
  for fraction in (0.75, 0.95):
    limit = int(L40S_GIB * 2**30 * fraction)
    c = choice(int(limit * (1 - fit.MARGIN)), state, line, accum_extra)
    result["choices"][str(fraction)] = {"bytes_limit": limit, **c}
    steps = ", ".join(f"{x['micro']} ({fit.size(x['peak'])}{'' if x['fits'] else ', no'})" for x in c["compiles"])
    print(f"L40S, memory fraction {fraction}: limit {fit.size(limit)}, budget {fit.size(c['budget'])}: micro-batch "
          f"{c['micro']} x accumulation {c['accum']}; candidates in order: {steps}")
  if args.search:
    dp = DataParallel("pjit", jax.devices()[:1])
    steps = fit.StepCompiler.for_config(config(TOTAL, 0), dp)
    t = time.perf_counter()
    chosen = fit.choose(steps)
    result["cpu_search"] = {**chosen.record(), "wall_seconds": time.perf_counter() - t}
    print(f"CPU search (1 device, share {TOTAL}): micro-batch {chosen.micro} x accumulation {chosen.accum}, "
          f"{len(chosen.tried)} compiles in {chosen.seconds:.0f} s", flush=True)
  write_result(OUT, result, conditions={"config": "configs/smollm360_rec2.py", "seq_len": SEQ, "total_batch": TOTAL,
                                        "devices": f"{DEVICES} x L40S {L40S_GIB} GiB (modelled)",
                                        "margin": fit.MARGIN, "cpu_devices": 1})
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
