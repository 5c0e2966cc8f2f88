"""Training-step speed on CPU against the PyTorch reference (`cpu_speed.json`).

  python benchmarks/train_step.py [--steps 10] [--json benchmarks/results/cpu_train_step_<machine>.json]

The stored reference is `benchmarks/results/reference_pytorch_cpu_speed.json` (a copy of the
PyTorch reference data's `cpu_speed.json`; `--reference` to use another), and the config is
its: hidden 256, 8 layers, 8 heads, 4 kv heads, ffn 688, vocab 8192, batch 8 x seq 256,
fp32. A step is what training
runs: forward, backward of CE + aux losses, global-norm clipping and AdamW
(mor_jax.train.train_step). Prints median step time, tokens/s, model FLOPs
per token (mor_jax.model.accounting convention), achieved GFLOP/s, the fp32
matmul peak measured in the same process, and the reference's tokens/s.
Each variant is timed in a fresh process (`--in_process` to time them in this one).
`--interleave` times them in this process round-robin instead (one step of
each variant per round), so every variant sees the same machine speed; the
MoR/recursive step-time ratio is then the median of per-round ratios.
Without it, that ratio is printed twice: from the table's medians, and from
the two variants timed again round-robin in this process (the table's rows
run minutes apart, and the machine's drift over minutes can exceed the 10%
the ratio is judged by).
`--calibrate` also times the PyTorch step of cpu_speed.json right after each
variant it can build (vanilla and recursive; benchmarks/torch_calibration.py,
needs torch + transformers) and prints our speed against PyTorch's on this
machine at this time: a shared VM's speed drifts by tens of percent over a day,
so the stored reference alone cannot tell a regression from a slow hour.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mor_jax import runtime  # noqa: E402

if __name__ == "__main__":
  runtime.use_huge_pages()  # see mor_jax/runtime.py: ~20-30% of CPU step time is page faults otherwise

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mor_jax.config import defaults  # noqa: E402
from mor_jax.kernels import policy as policy_lib  # noqa: E402
from mor_jax import config as C  # noqa: E402
from mor_jax.model.accounting import flops_per_token  # noqa: E402
from mor_jax.tools.provenance import write_result  # noqa: E402
from mor_jax.train import init_state, make_optimizer, make_train_step  # noqa: E402

VARIANTS = {
    # name: (strategy, R, mor type, capacity, reference row)
    "vanilla": ("none", 1, None, (), "vanilla"),
    "recursive_middle_cycle_rec2": ("middle_cycle", 2, None, (), "recursive_middle_cycle_rec2"),
    "mor_expert_rec2_cap1-0.5": ("middle_cycle", 2, "expert", (1.0, 0.5), "mor_expert_middle_cycle_rec2_cap1.0,0.5"),
    "mor_expert_rec3": ("middle_cycle", 3, "expert", (), "mor_expert_middle_cycle_rec3_default_cap"),
    "mor_token_rec3": ("middle_cycle", 3, "token", (), None),
}


def make_config(strategy, R, mor, capacity, batch, seq, batch_groups=0):
  c = defaults()
  c.model.update(vocab_size=8192, hidden_size=256, intermediate_size=688, num_layers=8, num_heads=8, num_kv_heads=4,
                 max_seq_len=2048)
  c.execution.update(dtype="float32", batch_groups=batch_groups)
  c.recursion.update(strategy=strategy, num_recursions=R)
  if mor:
    c.mor.update(enable=True, type=mor, capacity_fractions=capacity)
    if mor == "token":
      c.mor.update(router_func="softmax", alpha=1.0, balancing="loss")
  c.data.seq_len = seq
  c.train.update(total_batch_size=batch, per_device_batch_size=batch, learning_rate=3e-3, beta1=0.9, beta2=0.95,
                 weight_decay=0.1, grad_clip=1.0, warmup_steps=0, num_steps=1000)
  return C.validate(c, num_devices=1)


def matmul_peak(n=1024, reps=10):
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = 1e9
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def machine_info():
  """The CPU this run timed on: stored rows and runs from other VMs are only comparable on the same kind."""
  info = {"utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "cores": os.cpu_count(), "cpu": "?", "isa": "?"}
  try:
    text = open("/proc/cpuinfo").read()
  except OSError:
    return info
  for line in text.splitlines():
    if line.startswith("model name"):
      info["cpu"] = line.split(":", 1)[1].strip()
    elif line.startswith("flags"):
      flags = set(line.split(":", 1)[1].split())
      info["isa"] = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
      break
  return info


def build_variant(name, batch, seq, warmup=3, batch_groups=0):
  """Compiles the variant's train step and runs `warmup` steps; returns (step_once, info).

  step_once() runs one step (donating the state) and waits for it; info holds
  what the table needs besides the time (FLOPs per token, last loss).
  """
  strategy, R, mor, cap, _ = VARIANTS[name]
  config = make_config(strategy, R, mor, cap, batch, seq, batch_groups)
  cfg = C.model_config(config)
  tx, schedule = make_optimizer(config)
  box = {"state": jax.jit(lambda: init_state(cfg, tx, 0))()}
  policy = policy_lib.resolve(config, jax.default_backend())
  step = jax.jit(make_train_step(cfg, tx, schedule, policy=policy), donate_argnums=0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, batch, seq + 1), 0, cfg.vocab_size, jnp.int32)
  batch_in = {"tokens": tokens}
  info = {"variant": name, "train_flops_per_token": flops_per_token(cfg, seq)["train"], "tokens": batch * seq}

  def step_once():
    box["state"], m = step(box["state"], batch_in)
    info["loss"] = float(jax.block_until_ready(m["loss"]))

  for _ in range(warmup):
    step_once()
  return step_once, info


def _row(info, times):
  med = float(np.median(times))
  fl = info["train_flops_per_token"]
  return {"variant": info["variant"], "step_s": med, "tokens_per_s": info["tokens"] / med, "train_flops_per_token": fl,
          "gflops": fl * info["tokens"] / med / 1e9, "loss": info["loss"], "step_s_all": [float(t) for t in times]}


def _timed(step_once):
  t = time.perf_counter()
  step_once()
  return time.perf_counter() - t


def time_variant(name, batch, seq, steps, warmup=3, batch_groups=0):
  step_once, info = build_variant(name, batch, seq, warmup, batch_groups)
  return _row(info, [_timed(step_once) for _ in range(steps)])


def time_interleaved(built, steps):
  """Times already built steps (`build_variant`'s pairs) round-robin: round i times one step of each.

  A shared VM's speed drifts by tens of percent within minutes, so variants
  timed one after another can differ by more than their code does; here
  every variant sees the same stretch of time. The order rotates every
  round so that no variant always runs first. Returns one row per pair,
  with every round's step time (for paired ratios between rows).
  """
  times = [[] for _ in built]
  for i in range(steps):
    for j in range(len(built)):
      k = (i + j) % len(built)
      times[k].append(_timed(built[k][0]))
  return [_row(info, t) for (_, info), t in zip(built, times)]


def _paired_ratio(a, b):
  """Median over rounds of a's step time / b's step time (rows from the same interleaved run)."""
  return float(np.median(np.array(a["step_s_all"]) / np.array(b["step_s_all"])))


def _time_in_subprocess(variant, args):
  import subprocess
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "row.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--in_process", "--variants", variant, "--steps",
           str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq), "--json", out,
           "--reference", args.reference, "--batch_groups", str(args.batch_groups)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out, encoding="utf-8") as f:
      return json.load(f)["rows"][0]


def _torch_in_subprocess(variant, args):
  import subprocess
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "torch.json")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_calibration.py"),
           "--variants", variant, "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
           "--json", out]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    with open(out, encoding="utf-8") as f:
      return json.load(f)["rows"][0]


def _parse(argv, here: str):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--reference", default=os.path.join(here, "results", "reference_pytorch_cpu_speed.json"),
                 help="the stored PyTorch timings (default: the committed copy of the reference's cpu_speed.json)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--json", default="", help="also write the rows to this file")
  p.add_argument("--batch_groups", type=int, default=0,
                 help="execution.batch_groups (0 auto: 2 on CPU; 1 times the layers without batch groups)")
  p.add_argument("--in_process", action="store_true",
                 help="time all variants in this process (default: a fresh process per variant, so one variant's "
                      "allocations and compiled programs cannot slow down the next)")
  p.add_argument("--interleave", action="store_true",
                 help="time all variants in this process round-robin, one step of each per round, so that they "
                      "all see the same machine speed (see time_interleaved); ratios between variants are then "
                      "taken per round")
  p.add_argument("--calibrate", action="store_true",
                 help="time PyTorch's step (sdpa) on this machine next to each variant it can build")
  args = p.parse_args(argv)
  unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
  if unknown:
    p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
  return args


def main(argv=None):
  here = os.path.dirname(os.path.abspath(__file__))
  args = _parse(argv, here)
  ref = {}
  if os.path.exists(args.reference):
    for row in json.load(open(args.reference))["results"]:
      ref.setdefault(row["variant"], {})[row["attn_implementation"]] = row["train_tokens_per_s"]
  peak = matmul_peak()
  machine = machine_info()
  print(f"{machine['utc']} UTC, {machine['cpu']} ({machine['isa']}, {machine['cores']} cores)")
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, fp32 matmul peak (1024^3) {peak:.1f} GFLOP/s; "
        f"batch {args.batch} x seq {args.seq}, median of {args.steps} steps, "
        f"execution.batch_groups {args.batch_groups or 'auto'} -> "
        f"{policy_lib.resolve_batch_groups(args.batch_groups, jax.default_backend())}")
  if args.interleave:
    rows = time_interleaved([build_variant(n, args.batch, args.seq, batch_groups=args.batch_groups)
                             for n in args.variants.split(",")], args.steps)
  elif args.in_process:
    rows = [time_variant(v, args.batch, args.seq, args.steps, batch_groups=args.batch_groups)
            for v in args.variants.split(",")]
  else:
    rows = [_time_in_subprocess(v, args) for v in args.variants.split(",")]
  if args.calibrate:
    rows_by = {r["variant"]: r for r in rows}
    for v in ("vanilla", "recursive_middle_cycle_rec2"):
      if v in rows_by:   # jax again, then torch, back to back, so both see the same machine
        again = (_time_in_subprocess(v, args) if not args.in_process
                 else time_variant(v, args.batch, args.seq, args.steps, batch_groups=args.batch_groups))
        torch_row = _torch_in_subprocess(v, args)
        rows_by[v]["torch_now_tokens_per_s"] = torch_row["tokens_per_s"]
        rows_by[v]["repeat_tokens_per_s"] = again["tokens_per_s"]
  print(f"{'variant':30s} {'step ms':>8s} {'tok/s':>7s} {'GFLOP/tok':>9s} {'GFLOP/s':>8s} {'%peak':>6s} "
        f"{'ref eager':>9s} {'ref sdpa':>8s} {'x ref':>6s}")
  for r in rows:
    rr = ref.get(VARIANTS[r["variant"]][4] or "", {})
    best = max(rr.values()) if rr else None
    print(f"{r['variant']:30s} {r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:7.0f} "
          f"{r['train_flops_per_token'] / 1e9:9.4f} "
          f"{r['gflops']:8.1f} {100 * r['gflops'] / peak:5.1f}% {rr.get('eager', float('nan')):9.0f} "
          f"{rr.get('sdpa', float('nan')):8.0f} {(r['tokens_per_s'] / best) if best else float('nan'):6.2f}")
  for r in rows:
    if "torch_now_tokens_per_s" in r:
      print(f"same machine, back to back: {r['variant']}: jax {r['repeat_tokens_per_s']:.0f} tok/s, then PyTorch "
            f"(sdpa) {r['torch_now_tokens_per_s']:.0f} tok/s -> x torch now "
            f"{r['repeat_tokens_per_s'] / r['torch_now_tokens_per_s']:.2f}")
  by = {r["variant"]: r for r in rows}
  a, b = by.get("mor_expert_rec2_cap1-0.5"), by.get("recursive_middle_cycle_rec2")
  ratios = {}
  if a and b:
    f_ratio = a["train_flops_per_token"] / b["train_flops_per_token"]
    if args.interleave:   # same rounds: the ratio of each round's two steps, then its median
      ratios["median of per-round ratios"] = _paired_ratio(a, b)
    else:   # the table's two rows ran minutes apart; time the pair again, round-robin in this process
      ratios["table medians, timed minutes apart"] = a["step_s"] / b["step_s"]
      pair = time_interleaved([build_variant(v["variant"], args.batch, args.seq, batch_groups=args.batch_groups)
                               for v in (a, b)], args.steps)
      ratios[f"interleaved in one process, median of {args.steps} per-round ratios"] = _paired_ratio(*pair)
    for how, t_ratio in ratios.items():
      print(f"MoR R=2 / recursive R=2: step-time ratio {t_ratio:.3f} ({how}), FLOPs ratio {f_ratio:.3f} "
            f"(step/FLOPs = {t_ratio / f_ratio:.3f}; within 10% when between 0.9 and 1.1)")
  if args.json:
    for r in rows:   # what the 'x ref' column divided by, so a reader needs no mapping of variant names
      rr = ref.get(VARIANTS[r["variant"]][4] or "", {})
      r["reference_best_tokens_per_s"] = max(rr.values()) if rr else None
    write_result(args.json, {"machine": machine, "peak_gflops": peak, "rows": rows, "mor_r2_over_recursive_r2": ratios,
                             "reference": os.path.relpath(args.reference, os.path.dirname(here))},
                 conditions={"dtype": "float32", "batch": f"{args.batch} x {args.seq}", "steps": args.steps,
                             "weights": "random", "mode": "interleave" if args.interleave else
                             "in_process" if args.in_process else "fresh process per variant",
                             "batch_groups": args.batch_groups or "auto"})


if __name__ == "__main__":
  main()
