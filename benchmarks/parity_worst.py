"""The worst difference from the PyTorch reference over its fixtures, written as a result with provenance.

  python benchmarks/parity_worst.py                      # tests/refdata/*/ -> benchmarks/results/parity_worst.json
  python benchmarks/parity_worst.py --fixtures=tests/refdata/01_vanilla --json=/tmp/parity.json

Runs `mor_jax.tools.parity` (the same computation as `python -m mor_jax.tools.parity DIR`) on every fixture and
records, per fixture, the max abs difference of each group of quantities (logits, losses, routing decisions and
router outputs, gradients) and the worst of all; the README quotes the worst one. Exits 1 when any difference is
above --tol (the tolerance the parity tool and the tests check). About 10 s a fixture on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mor_jax.tools import parity  # noqa: E402
from mor_jax.tools.provenance import write_result  # noqa: E402


def group(name: str) -> str:
  """Which kind of quantity a parity row is."""
  if name.startswith("grad:"):
    return "gradients"
  if name.startswith("logits_"):
    return "logits"
  if "loss" in name:
    return "losses"
  return "routing"


def measure(fixture: str) -> dict:
  t0 = time.perf_counter()
  ours, expected = parity.compute(fixture)
  rows = parity.compare(ours, expected)
  by_group: dict = {}
  for name, diff in rows:
    g = group(name)
    by_group[g] = max(by_group.get(g, 0.0), diff)
  worst_name, worst = max(rows, key=lambda r: r[1])
  return {"fixture": os.path.basename(os.path.normpath(fixture)), "quantities": len(rows),
          "max_abs_diff": by_group, "worst": worst, "worst_quantity": worst_name,
          "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--fixtures", default="", help="comma-separated fixture directories (default: tests/refdata/*/)")
  p.add_argument("--tol", type=float, default=1e-4)
  p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "parity_worst.json"))
  args = p.parse_args(argv)
  fixtures = (args.fixtures.split(",") if args.fixtures
              else sorted(d for d in glob.glob(os.path.join(ROOT, "tests", "refdata", "*")) if os.path.isdir(d)))
  missing = [f for f in fixtures if not os.path.isdir(f)]
  if missing or not fixtures:
    p.error(f"--fixtures: no such fixture directory: {', '.join(missing) or '(none found)'}")
  rows = []
  for f in fixtures:
    rows.append(measure(f))
    r = rows[-1]
    groups = ", ".join(f"{g} {d:.2e}" for g, d in sorted(r["max_abs_diff"].items()))
    print(f"{r['fixture']:55s} worst {r['worst']:.2e} ({r['worst_quantity']}); {groups}", flush=True)
  worst = max(rows, key=lambda r: r["worst"])
  import jax  # noqa: PLC0415  (already imported by the parity computation; recorded in the provenance)
  write_result(args.json, {"tol": args.tol, "fixtures": len(rows), "worst": worst["worst"],
                           "worst_fixture": worst["fixture"], "worst_quantity": worst["worst_quantity"],
                           "rows": rows},
               conditions={"dtype": "float32", "backend": jax.default_backend(),
                           "what": "max abs difference from the PyTorch reference's stored outputs and gradients"})
  print(f"worst over {len(rows)} fixtures: {worst['worst']:.2e} ({worst['fixture']}, {worst['worst_quantity']}); "
        f"tol {args.tol:g} -> {args.json}")
  return 0 if worst["worst"] <= args.tol else 1


if __name__ == "__main__":
  sys.exit(main())
