"""The iso-FLOP comparison with several seeds and budgets: means, spreads and which orderings hold over seeds.

  python benchmarks/isoflop_seeds.py --workers=2           # 3 seeds x budgets 1x and 3x (the full run; resumable)
  python benchmarks/isoflop_seeds.py --quick               # smoke test (tiny models, 2 seeds, 2 budgets)
  python benchmarks/isoflop_seeds.py --seeds=0,1,2,3,4 --budgets=1,3 --out_dir=/tmp/isoflop_seeds

Every (budget, model, seed) run is `benchmarks/isoflop.py`'s `train_run` (the library's Trainer, the same
validation batches, the same shape and optimiser; `--seed` seeds both the initialisation and the data order), and
its result is written to OUT_DIR/runs/<budget>x-<model>-s<seed>.json as soon as it finishes: a rerun skips the runs
already done, so an interrupted sweep continues where it stopped. The budget multiplier scales what vanilla spends
in `--vanilla_steps` steps (isoflop.py's default budget is 1x).

`--workers=N` runs N runs at once, each in its own process pinned to its own CPU core (longest runs first, the next
run starting as soon as a core is free). These models are too small for XLA to keep two cores busy in one process:
on 2 cores, 2 workers finish about 1.4x more runs per hour than 1 (one timing, output not kept: two pinned
120-step runs in 85 s against 2 x 61 s one after the other), which brings the full sweep to about 2 h 20 min.
The results are the same run for run
(the NLL of a run pinned to one core equals the unpinned one to 4 decimals). Each worker's log is in OUT_DIR/logs/.

Output (OUT_DIR): isoflop_seeds.json (every run and the summary), isoflop_seeds.md (per budget and model: mean and
standard deviation of the final validation NLL with top-k and causal routing; per pair of models: the mean paired
difference over seeds, its standard error and t statistic, and whether the ordering holds for every seed), and
isoflop_seeds.png (NLL against training FLOPs, mean with one-standard-deviation error bars, one line per model).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import isoflop  # noqa: E402  (benchmarks/isoflop.py: configs, one run, the table)
from mor_jax import files as files_lib  # noqa: E402
from mor_jax.tools.provenance import write_result  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# t above this (two-sided 95% for 2 degrees of freedom = 3 seeds is 4.30; 4 seeds 3.18; 5 seeds 2.78)
T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def run_path(out_dir: str, budget: float, name: str, seed: int) -> str:
  return os.path.join(out_dir, "runs", f"{budget:g}x-{name}-s{seed}.json")


def mean_std(xs):
  m = sum(xs) / len(xs)
  sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
  return m, sd


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
  """a - b over the seeds both have: mean, standard error, t, and whether the sign is the same for every seed."""
  seeds = sorted(set(a) & set(b))
  if len(seeds) < 2:
    return None
  d = [a[s] - b[s] for s in seeds]
  m, sd = mean_std(d)
  se = sd / math.sqrt(len(d))
  t = m / se if se > 0 else math.inf * (1 if m > 0 else -1)
  return {"seeds": len(d), "mean": m, "se": se, "t": t, "all_same_sign": all(x < 0 for x in d) or all(x > 0 for x in d),
          "significant": abs(t) > T_CRIT.get(len(d) - 1, 2.0)}


def summarise(runs: list[dict], names: list[str], budgets: list[float]) -> dict:
  out = {}
  for b in budgets:
    per = {}
    for n in names:
      rs = [r for r in runs if r["budget_x"] == b and r["name"] == n]
      if not rs:
        continue
      row = {"label": rs[0]["label"], "seeds": sorted(r["seed"] for r in rs), "unique_params": rs[0]["unique_params"],
             "train_flops": rs[0]["train_flops"], "steps": rs[0]["steps"]}
      for key in ("val_nll_topk", "val_nll_causal"):
        row[key], row[key + "_std"] = mean_std([r[key] for r in rs])
        row[key + "_by_seed"] = {r["seed"]: r[key] for r in rs}
      per[n] = row
    pairs = {}
    for x, y in itertools.combinations(per, 2):
      for key in ("val_nll_topk", "val_nll_causal"):
        p = paired(per[x][key + "_by_seed"], per[y][key + "_by_seed"])
        if p:
          pairs[f"{x} - {y} ({key[8:]})"] = p
    out[f"{b:g}x"] = {"models": per, "pairs": pairs}
  return out


def markdown(summary: dict) -> str:
  lines = []
  for budget, s in summary.items():
    lines += [f"### budget {budget}", "", "| model | unique params | steps | seeds | val NLL top-k (mean ± sd) "
              "| val NLL causal (mean ± sd) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in s["models"].values():
      lines.append(f"| {r['label']} | {r['unique_params'] / 1e6:.2f}M | {r['steps']:,} | {len(r['seeds'])} "
                   f"| {r['val_nll_topk']:.4f} ± {r['val_nll_topk_std']:.4f} "
                   f"| {r['val_nll_causal']:.4f} ± {r['val_nll_causal_std']:.4f} |")
    lines += ["", "| paired difference (a - b) | mean | s.e. | t | same sign every seed | significant (95%) |",
              "| --- | ---: | ---: | ---: | :---: | :---: |"]
    for k, p in s["pairs"].items():
      same = "yes" if p["all_same_sign"] else "no"
      lines.append(f"| {k} | {p['mean']:+.4f} | {p['se']:.4f} | {p['t']:+.1f} | {same} "
                   f"| {'yes' if p['significant'] else 'no'} |")
    lines.append("")
  return "\n".join(lines)


def plot(summary: dict, names: list[str], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for i, n in enumerate(names):
    pts = [s["models"][n] for s in summary.values() if n in s["models"]]
    if not pts:
      continue
    ax.errorbar([p["train_flops"] for p in pts], [p["val_nll_topk"] for p in pts],
                yerr=[p["val_nll_topk_std"] for p in pts], fmt="o-", color=f"C{i}", capsize=3, ms=4,
                label=f"{pts[0]['label']} ({pts[0]['unique_params'] / 1e6:.2f}M params)")
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("final validation NLL (top-k), mean ± sd over seeds")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with files_lib.replacing(path, suffix=".png") as tmp:
    fig.savefig(tmp, dpi=120)
  plt.close(fig)


def run_here(todo, iso, names, out_dir: str) -> None:
  """Runs the (budget, seed, model) runs one after the other in this process, writing each result as it finishes."""
  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
  fpt = {n: float(accounting.flops_per_token(isoflop.validated(isoflop.build_config(n, iso))[1], iso.seq_len)["train"])
         for n in names + ["vanilla"]}
  tokens_per_step = iso.batch * iso.seq_len
  first_config, _ = isoflop.validated(isoflop.build_config(names[0], iso))
  data_lib.prepare(first_config)
  vbatches = isoflop.val_batches(first_config, iso.eval_rows, iso.eval_batches)
  for b, seed, n in todo:
    iso.seed = seed
    budget = b * iso.vanilla_steps * tokens_per_step * fpt["vanilla"]
    steps = max(1, int(round(budget / (tokens_per_step * fpt[n]))))
    print(f"budget {b:g}x, seed {seed}, {n}: {steps} steps", flush=True)
    r = isoflop.train_run(n, iso, steps, vbatches, fpt[n], lambda m: print(m, flush=True))
    r.update(budget_x=b, seed=seed)
    r.pop("config", None)
    write_result(run_path(out_dir, b, n, seed), r, conditions={"seed": seed, "budget_x": b, "model": n,
                                                               "dtype": "float32", "batch": iso.batch})


def pending_runs(args, budgets, seeds, names) -> list[tuple[float, int, str]]:
  """(budget, seed, model) runs without a result file, the longest (largest budget) first."""
  todo = [(b, seed, n) for b, seed, n in itertools.product(budgets, seeds, names)
          if not os.path.exists(run_path(args.out_dir, b, n, seed))]
  return sorted(todo, key=lambda t: -t[0])


def dispatch(todo, workers: int, out_dir: str, passthrough: list[str]) -> int:
  """Runs each (budget, seed, model) in its own process, `workers` at a time, each pinned to a free core."""
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  pin = len(cores) >= workers
  log_dir = os.path.join(out_dir, "logs")
  os.makedirs(log_dir, exist_ok=True)
  running: dict[int, tuple[subprocess.Popen, tuple, float]] = {}  # slot -> (process, run, start time)
  failed = 0
  queue = list(todo)
  while queue or running:
    for slot in [k for k in range(workers) if k not in running][: len(queue)]:
      b, seed, n = run = queue.pop(0)
      cmd = [sys.executable, os.path.abspath(__file__), f"--seeds={seed}", f"--budgets={b:g}", "--workers=1",
             "--child", f"--out_dir={out_dir}", *passthrough, f"--runs={n}"]
      core = cores[slot] if pin else None
      log = open(os.path.join(log_dir, f"{b:g}x-{n}-s{seed}.log"), "w")  # pylint: disable=consider-using-with
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                              preexec_fn=(lambda c=core: os.sched_setaffinity(0, {c})) if pin else None)
      log.close()
      running[slot] = (proc, run, time.time())
      print(f"start budget {b:g}x, seed {seed}, {n}" + (f" on core {core}" if pin else "") + f" ({len(queue)} queued)",
            flush=True)
    time.sleep(1.0)
    for slot, (proc, (b, seed, n), t0) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[slot]
      failed += proc.returncode != 0
      print(f"{'done' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'} budget {b:g}x, seed {seed}, "
            f"{n} in {time.time() - t0:.0f} s; log {os.path.join(log_dir, f'{b:g}x-{n}-s{seed}.log')}", flush=True)
  return failed


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--budgets", default="1,3", help="multiples of the vanilla_steps budget")
  p.add_argument("--workers", type=int, default=1, help="runs at once, each in its own process on its own core")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one run for --workers; no summary
  p.add_argument("--quick", action="store_true", help="smoke test: isoflop.py --quick's tiny models, 2 seeds")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "benchmarks", "results", "isoflop_seeds"))
  args, rest = p.parse_known_args(argv)
  if args.workers < 1:
    p.error(f"--workers must be at least 1, got {args.workers}")
  base = ["--quick"] if args.quick else []
  if args.quick and args.out_dir == p.get_default("out_dir"):
    args.out_dir = os.path.join("/tmp", "mor_isoflop_seeds_quick")
  seeds = [int(s) for s in args.seeds.split(",")][: 2 if args.quick else None]
  budgets = [float(b) for b in args.budgets.split(",")]
  iso = isoflop.parse_args(base + rest)
  del iso.parser
  names = [n for n in iso.runs.split(",") if n]
  t0 = time.time()
  todo = pending_runs(args, budgets, seeds, names)
  if args.workers > 1 and todo:
    if dispatch(todo, args.workers, args.out_dir, base + rest):
      sys.exit("some runs failed (their logs are named above); rerun to retry them: finished runs are kept")
  elif todo:
    run_here(todo, iso, names, args.out_dir)
  if args.child:
    return None
  runs = []
  for b, seed, n in itertools.product(budgets, seeds, names):
    with open(run_path(args.out_dir, b, n, seed)) as f:
      runs.append(json.load(f))
  summary = summarise(runs, names, budgets)
  md = markdown(summary)
  print(md)
  shape = f"hidden {iso.hidden}, effective depth {iso.layers}, seq {iso.seq_len}, batch {iso.batch}"
  plot(summary, names, os.path.join(args.out_dir, "isoflop_seeds.png"),
       f"iso-FLOP over seeds {seeds}: {shape}")
  write_result(os.path.join(args.out_dir, "isoflop_seeds.json"),
               {"args": vars(args), "isoflop_args": vars(iso), "seeds": seeds, "budgets": budgets, "summary": summary,
                "runs": runs, "wall_s_this_call": time.time() - t0},
               conditions={"seeds": seeds, "budgets": budgets, "workers": args.workers, "dtype": "float32",
                           "note": "each run's own provenance is in runs[i].provenance"})
  with open(os.path.join(args.out_dir, "isoflop_seeds.md"), "w") as f:
    f.write(f"iso-FLOP over seeds {seeds}, budgets {budgets} x vanilla {iso.vanilla_steps} steps; {shape}\n\n{md}")
  return summary


if __name__ == "__main__":
  main()
