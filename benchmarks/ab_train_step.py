"""A/B of the CPU training step between two source trees (e.g. a commit before a change and the change).

  git archive BASE_COMMIT | tar -x -C /tmp/ab_base
  python benchmarks/ab_train_step.py --base /tmp/ab_base [--rounds 4] [--steps 6] [--json out.json]

Each round runs `benchmarks/train_step.py --interleave` of both trees in fresh processes, one after the
other (the order alternates every round), so both see the same stretch of the machine's speed. Within a
process all five variants are timed round-robin. Per variant it prints each tree's median tokens/s over
the rounds and the median over rounds of the per-round ratio new/base (1.00 = no change). Not a test:
timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

from mor_jax.tools.provenance import write_result  # noqa: E402


def run_tree(tree: str, steps: int, out: str) -> dict:
  """One interleaved run of `tree`'s benchmark in a fresh process: {variant: tokens/s}."""
  cmd = [sys.executable, os.path.join(tree, "benchmarks", "train_step.py"), "--interleave", "--steps", str(steps),
         "--json", out]
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=tree)
  with open(out, encoding="utf-8") as f:
    return {r["variant"]: r["tokens_per_s"] for r in json.load(f)["rows"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--base", required=True, help="source tree of the base (e.g. git archive of the commit before)")
  p.add_argument("--new", default=HERE, help="source tree of the change (default: this one)")
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--steps", type=int, default=6, help="timed steps of each variant per process")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if not os.path.isfile(os.path.join(args.base, "benchmarks", "train_step.py")):
    p.error(f"--base: {args.base} holds no benchmarks/train_step.py; pass a source tree of the base commit.")
  runs = {"base": [], "new": []}
  with tempfile.TemporaryDirectory() as d:
    for i in range(args.rounds):
      order = ("base", "new") if i % 2 == 0 else ("new", "base")
      for name in order:
        tree = args.base if name == "base" else args.new
        runs[name].append(run_tree(os.path.abspath(tree), args.steps, os.path.join(d, f"{name}{i}.json")))
        print(f"round {i + 1}/{args.rounds} {name}: " +
              ", ".join(f"{k} {v:,.0f}" for k, v in runs[name][-1].items()), flush=True)
  table = []
  print(f"{'variant':30s} {'base tok/s':>10s} {'new tok/s':>10s} {'new/base (median of per-round ratios)':>38s}")
  for v in runs["base"][0]:
    base = [r[v] for r in runs["base"]]
    new = [r[v] for r in runs["new"]]
    ratio = float(np.median(np.array(new) / np.array(base)))
    table.append({"variant": v, "base_tokens_per_s": float(np.median(base)),
                  "new_tokens_per_s": float(np.median(new)), "ratio_new_over_base": ratio,
                  "ratio_range": [float(min(np.array(new) / np.array(base))),
                                  float(max(np.array(new) / np.array(base)))]})
    print(f"{v:30s} {np.median(base):10,.0f} {np.median(new):10,.0f} {ratio:38.3f}")
  if args.json:   # the provenance's commit is this checkout's; the trees compared are named in the conditions
    write_result(args.json, {"rounds": args.rounds, "steps": args.steps, "runs": runs, "table": table},
                 conditions={"base_tree": os.path.abspath(args.base), "new_tree": os.path.abspath(args.new),
                             "dtype": "float32", "batch": "8 x 256 (train_step.py's default)"})


if __name__ == "__main__":
  main()
