"""Small-scale iso-FLOP comparison of vanilla, recursive and MoR models (the paper's main comparison, in miniature).

  python benchmarks/isoflop.py                          # full run (~20-25 min on a 2-core CPU)
  python benchmarks/isoflop.py --quick                  # smoke test (< 2 min; writes to /tmp/mor_isoflop_quick)
  python benchmarks/isoflop.py --vanilla_steps=400 --hidden=192 --seq_len=256 --out_dir=/tmp/isoflop

What it does. Five models with the same *effective depth* (`--layers` layer applications for a token that takes
every recursion) and the same shape otherwise are trained on the embedded default corpus (Shakespeare, the corpus
of `configs/shakespeare_mor.py`, which this script starts from) under the SAME training-FLOPs budget:

  vanilla   L unique layers
  rec2      middle_cycle recursive, R = 2: unique first/last layer around a shared block of (L-2)/2 layers run twice
  mor_ec2   the same sharing + MoR expert-choice routing, R = 2, the spec's default capacities (1, 1/2)
  mor_ec3   middle_cycle R = 3 + expert-choice, capacities (1, 2/3, 1/3)
  mor_tc3   middle_cycle R = 3 + token-choice (softmax router, alpha 1.0, balancing loss 0.1)

Training FLOPs per token come from `mor_jax.model.accounting.flops_per_token(cfg, seq_len)["train"]` (matmuls
only, causal attention halved, 3 x forward; MoR counts the shared block once per token routed into each recursion,
token-choice at its balanced fractions). The budget is `--flops_budget`, or by default what vanilla spends in
`--vanilla_steps` steps; every model then gets round(budget / (FLOPs per token x tokens per step)) steps, so the
cheaper-per-token MoR models see more tokens (as in the paper, which holds FLOPs fixed). Recursive R = 2 costs
the same per token as vanilla (same depth) but has fewer unique parameters. Each run uses its own cosine schedule
over its own number of steps (the default job's optimiser: AdamW 3e-3, warm-up `--warmup_frac` of the steps,
floor 0.1 x peak), the same data order (`--seed` also seeds the initialisation) and batch.

Everything is the library's code, called in-process: the config is built from `configs/shakespeare_mor.py` and
checked by `mor_jax.config.validate`; `mor_jax.train.Trainer` trains each run (one device, no gradient
accumulation, in a temporary workdir) on `mor_jax.data.make_iterator`'s packed batches and gives the validation
curve (top-k routing, as during training, through a hook) at `--eval_points` points of each run; at the end
`mor_jax.evaluate.evaluate_nll` scores the same validation batches with top-k
(training) routing and with causal threshold routing (what generation does). Vanilla and recursive models have no
router: both numbers are the same by construction (only top-k is computed and reported in both columns).

How to read the output. The markdown table lists, per run: unique (trainable) parameters, training FLOPs per token,
steps, tokens seen, total training FLOPs (equal up to rounding of the step count), the final validation NLL in
nats/token with top-k routing and with causal routing (lower is better), mean recursions per token under causal
routing, and the wall time of training (+ evaluation). The paper's claim at 135M-1.7B scale: at equal training
FLOPs MoR expert-choice R = 2 reaches a lower NLL than recursive R = 2 and matches or beats vanilla with about
half the unique parameters. `isoflop.json` holds everything (config of each run, curves), `isoflop.png` plots
validation NLL (top-k) against training FLOPs spent, one curve per model, with the final causal-routing NLL as a
hollow marker. Differences of a few hundredths of a nat are within run-to-run noise at this scale (try --seed).

Not a test: small models, short runs and a tiny corpus; timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from mor_jax import runtime  # noqa: E402
from mor_jax.tools.provenance import write_result  # noqa: E402

if __name__ == "__main__":
  runtime.use_huge_pages()  # see mor_jax/runtime.py

import jax  # noqa: E402
import numpy as np  # noqa: E402

# name -> (label, recursion strategy, R, MoR type or None)
RUNS = {
    "vanilla": ("vanilla", "none", 1, None),
    "rec2": ("recursive R=2", "middle_cycle", 2, None),
    "mor_ec2": ("MoR expert R=2", "middle_cycle", 2, "expert"),
    "mor_ec3": ("MoR expert R=3", "middle_cycle", 3, "expert"),
    "mor_tc3": ("MoR token R=3", "middle_cycle", 3, "token"),
}


# ----------------------------------------------------------------------------------------------- configs
def build_config(name: str, args, num_steps: int = 1):
  """The default job's config (configs/shakespeare_mor.py) with this benchmark's shape, sharing and routing."""
  from configs import shakespeare_mor  # pylint: disable=g-import-not-at-top
  _, strategy, R, mor_type = RUNS[name]
  c = shakespeare_mor.get_config()
  c.name = f"isoflop-{name}"
  ffn = args.ffn or max(32, int(round(8 * args.hidden / 3 / 32)) * 32)
  c.model.update(hidden_size=args.hidden, intermediate_size=ffn,
                 num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                 max_seq_len=max(int(c.model.max_seq_len), args.seq_len))
  c.recursion.update(strategy=strategy, num_recursions=R)
  if mor_type is None:
    c.mor.enable = False
  elif mor_type == "expert":
    c.mor.update(enable=True, type="expert", router_type="linear", router_func="sigmoid", alpha=0.1,
                 expert_router_loss="bce", aux_coeff=1e-3, capacity_fractions=(), cap_warmup_steps=0)
  else:
    c.mor.update(enable=True, type="token", router_type="linear", router_func="softmax", alpha=1.0,
                 balancing="loss", bal_coeff=0.1, bal_warmup_steps=0)
  c.data.update(seq_len=args.seq_len, shuffle_seed=args.seed)
  c.train.update(seed=args.seed, num_steps=max(1, num_steps), total_batch_size=args.batch,
                 per_device_batch_size=args.batch, learning_rate=args.lr, schedule="cosine",
                 warmup_steps=max(1, int(round(args.warmup_frac * num_steps))), min_lr_ratio=0.1,
                 progress_bar=False)
  return c


def validated(config):
  from mor_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.validate(config, num_devices=1)
  return config, config_lib.model_config(config)


# ----------------------------------------------------------------------------------------------- data
def val_batches(config, rows: int, n: int) -> list[dict]:
  """The first `n` validation batches of `rows` rows (one pass, no repeat): the same set for every run."""
  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  it = data_lib.make_iterator(config, "validation", global_batch_size=rows, num_epochs=1)
  out = []
  try:
    for batch in it:
      out.append({k: np.asarray(v) for k, v in batch.items()})
      if 0 < n <= len(out):
        break
  finally:
    close = getattr(it, "close", None)
    if callable(close):
      close()
  return out


# ----------------------------------------------------------------------------------------------- one run
def eval_iterator_fn(batches: list[dict]):
  """`f(rows) -> batches of `rows` rows` over the fixed validation sequences (the trainer's eval_iterator_fn)."""
  seqs = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  n = len(seqs["tokens"])
  return lambda rows: ({k: v[i:i + rows] for k, v in seqs.items()} for i in range(0, n, rows))


def train_run(name: str, args, steps: int, vbatches: list[dict], fpt: float, log) -> dict:
  import shutil  # pylint: disable=g-import-not-at-top
  from mor_jax.evaluate import evaluate_nll  # pylint: disable=g-import-not-at-top
  from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
  from mor_jax.train import Hook, Trainer, read_metrics  # pylint: disable=g-import-not-at-top

  c = build_config(name, args, steps)
  c.parallel.num_devices = 1                   # one device, no gradient accumulation
  c.train.update(eval_every_steps=0, eval_sequences=-1, save_every_steps=0, save_interval=0.0, keep_checkpoints=1,
                 log_every_steps=args.log_every)
  config, cfg = validated(c)
  tokens_per_step = args.batch * args.seq_len
  points = sorted({int(round(steps * i / args.eval_points)) for i in range(1, args.eval_points + 1)})
  curve, clock = [], {"eval": 0.0}

  class Curve(Hook):
    """Validation NLL (top-k) at step 0 and the eval points, with the train loss of that step."""

    last_loss = None

    def on_metrics(self, ctx, step, metrics):
      self.last_loss = float(metrics["loss"])

    def on_eval(self, ctx, step, val_loss):
      loss = self.last_loss if step else None
      curve.append({"step": step, "flops": step * tokens_per_step * fpt, "tokens": step * tokens_per_step,
                    "val_nll_topk": val_loss, **({"train_loss": loss} if step else {})})
      if step:
        log(f"  {name} step {step}/{steps}: train loss {loss:.4f}, val NLL (top-k) {val_loss:.4f}")

  class TimedTrainer(Trainer):
    def evaluate(self, step):
      t = time.time()
      try:
        return super().evaluate(step)
      finally:
        clock["eval"] += time.time() - t

  workdir = tempfile.mkdtemp(prefix=f"isoflop-{name}-")   # a fresh workdir (an existing one would be resumed)
  t0 = time.time()
  trainer = TimedTrainer(c, workdir, eval_iterator_fn=eval_iterator_fn(vbatches), hooks=[Curve()],
                         eval_at=points.__contains__)
  trainer.run()
  state = trainer.state
  eval_s = clock["eval"]
  train_s = time.time() - t0 - eval_s
  losses = [[r["step"], r["loss"]] for r in read_metrics(workdir) if "loss" in r]
  shutil.rmtree(workdir, ignore_errors=True)
  te = time.time()
  modes = ("topk", "causal") if cfg.mor_enable else ("topk",)
  final = evaluate_nll(cfg, state.variables(), vbatches, modes=modes, step=int(state.step))
  eval_s += time.time() - te
  causal = final["causal"] if "causal" in final else final["topk"]
  counts = accounting.param_counts(cfg)
  return {
      "name": name, "label": RUNS[name][0], "strategy": cfg.strategy, "recursions": cfg.recursions,
      "mor": cfg.mor_type if cfg.mor_enable else None, "base_depth": cfg.base_depth,
      "capacities": list(cfg.selected_fractions) if cfg.mor_enable and cfg.mor_type == "expert" else None,
      "unique_params": int(counts["total"]), "params": counts,
      "train_flops_per_token": fpt, "flops_breakdown": accounting.flops_per_token(cfg, args.seq_len),
      "steps": steps, "tokens_seen": steps * tokens_per_step, "train_flops": steps * tokens_per_step * fpt,
      "val_nll_topk": final["topk"]["nll"], "val_nll_causal": causal["nll"],
      "causal_evaluated": "causal" in final, "gap": final.get("gap", 0.0),
      "mean_recursions_topk": final["topk"]["mean_recursions"],
      "mean_recursions_causal": causal["mean_recursions"], "val_tokens": final["topk"]["tokens"],
      "train_wall_s": train_s, "eval_wall_s": eval_s, "wall_s": time.time() - t0,
      "curve": curve, "train_losses": losses, "config": json.loads(config.to_json_best_effort()),
  }


# ----------------------------------------------------------------------------------------------- output
def table(results: list[dict]) -> str:
  lines = ["| model | unique params | train FLOPs/token | steps | tokens seen | train FLOPs | val NLL top-k "
           "| val NLL causal | recursions/token (causal) | wall time |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    causal = f"{r['val_nll_causal']:.4f}" if r["causal_evaluated"] else f"({r['val_nll_causal']:.4f})"
    lines.append(f"| {r['label']} | {r['unique_params'] / 1e6:.2f}M | {r['train_flops_per_token'] / 1e6:.2f}M "
                 f"| {r['steps']:,} | {r['tokens_seen'] / 1e6:.2f}M | {r['train_flops']:.3e} "
                 f"| {r['val_nll_topk']:.4f} | {causal} | {r['mean_recursions_causal']:.2f} "
                 f"| {r['train_wall_s']:.0f}s (+{r['eval_wall_s']:.0f}s eval) |")
  return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "matplotlib is not installed: no plot written (the JSON has the curves)"
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for i, r in enumerate(results):
    pts = [p for p in r["curve"] if p["step"] > 0]
    color = f"C{i}"
    ax.plot([p["flops"] for p in pts], [p["val_nll_topk"] for p in pts], "o-", color=color, ms=4,
            label=f"{r['label']} ({r['unique_params'] / 1e6:.2f}M params, {r['steps']} steps)")
    if r["causal_evaluated"]:
      ax.plot([r["train_flops"]], [r["val_nll_causal"]], "o", mfc="none", color=color, ms=8)
  ax.set_xscale("log")
  ax.set_xlabel("training FLOPs spent")
  ax.set_ylabel("validation NLL (nats/token, top-k routing)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  lo = min(min(p["val_nll_topk"] for p in r["curve"] if p["step"] > 0) for r in results)
  lo = min(lo, min(r["val_nll_causal"] for r in results))
  hi = max(max(p["val_nll_topk"] for p in r["curve"] if p["step"] > 0) for r in results)
  ax.set_ylim(lo - 0.05, min(hi, lo + 2.0) + 0.05)
  ax.legend(fontsize=8, title="hollow: final NLL, causal routing", title_fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return None


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
  """The command line (also used by benchmarks/isoflop_seeds.py)."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
  p.add_argument("--vanilla_steps", type=int, default=450,
                 help="the FLOPs budget is what vanilla spends in this many steps (unless --flops_budget)")
  p.add_argument("--flops_budget", type=float, default=0.0, help="training FLOPs per run (overrides --vanilla_steps)")
  p.add_argument("--hidden", type=int, default=128)
  p.add_argument("--ffn", type=int, default=0, help="MLP width (0: ~8/3 x hidden, rounded to 32)")
  p.add_argument("--layers", type=int, default=8, help="effective depth L (L - 2 must divide by 2 and 3)")
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=16, help="sequences per optimizer step")
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup_frac", type=float, default=0.07)
  p.add_argument("--eval_points", type=int, default=5, help="validation points per run (the curve)")
  p.add_argument("--eval_batches", type=int, default=0,
                 help="validation batches of --eval_rows rows (0: the whole validation split, ~47k tokens)")
  p.add_argument("--eval_rows", type=int, default=16)
  p.add_argument("--log_every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="smoke test: tiny model, few steps (< 2 minutes)")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "benchmarks", "results", "isoflop"))
  args = p.parse_args(argv)
  args.parser = p
  if args.quick:
    args.hidden, args.ffn, args.heads, args.kv_heads, args.seq_len, args.batch = 64, 128, 2, 1, 64, 8
    args.vanilla_steps, args.eval_points, args.eval_batches, args.eval_rows, args.log_every = 12, 2, 2, 8, 1000
    if args.out_dir == p.get_default("out_dir"):
      args.out_dir = os.path.join("/tmp", "mor_isoflop_quick")
  return args


def main(argv=None):
  args = parse_args(argv)
  p = args.parser
  del args.parser
  names = [n for n in args.runs.split(",") if n]
  for n in names:
    if n not in RUNS:
      p.error(f"unknown run {n!r}; choose from {','.join(RUNS)}")
  os.makedirs(args.out_dir, exist_ok=True)
  log_lines = []

  def log(msg):
    print(msg, flush=True)
    log_lines.append(msg)

  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
  t_all = time.time()
  # FLOPs per token of every run, and the budget
  fpt = {n: float(accounting.flops_per_token(validated(build_config(n, args))[1], args.seq_len)["train"])
         for n in names}
  vanilla_fpt = fpt.get("vanilla") or float(
      accounting.flops_per_token(validated(build_config("vanilla", args))[1], args.seq_len)["train"])
  tokens_per_step = args.batch * args.seq_len
  budget = args.flops_budget or args.vanilla_steps * tokens_per_step * vanilla_fpt
  steps = {n: max(1, int(round(budget / (tokens_per_step * fpt[n])))) for n in names}
  first_config, first_cfg = validated(build_config(names[0], args))
  data_lib.prepare(first_config)   # corpus, tokenizer, token shards (built once, offline; reused afterwards)
  vbatches = val_batches(first_config, args.eval_rows, args.eval_batches)
  shape = (f"hidden {args.hidden}, ffn {first_cfg.intermediate_size}, heads {args.heads}/{args.kv_heads}, "
           f"effective depth {args.layers}, vocab {first_cfg.vocab_size}, seq {args.seq_len}, "
           f"batch {args.batch} x {args.seq_len} = {tokens_per_step} tokens/step")
  log(f"device: {jax.devices()[0].device_kind} (CPU threads: {os.cpu_count()}); {shape}")
  log(f"budget {budget:.3e} training FLOPs per run; validation: {len(vbatches)} batches x {args.eval_rows} rows")
  for n in names:
    log(f"  {n}: {fpt[n] / 1e6:.2f} MFLOPs/token (x{fpt[n] / vanilla_fpt:.3f} vanilla) -> {steps[n]} steps")

  results = []
  for n in names:
    log(f"training {n} ({RUNS[n][0]}): {steps[n]} steps")
    r = train_run(n, args, steps[n], vbatches, fpt[n], log)
    log(f"  {n}: val NLL top-k {r['val_nll_topk']:.4f}, causal {r['val_nll_causal']:.4f}; "
        f"{r['train_wall_s']:.0f}s training, {r['eval_wall_s']:.0f}s evaluation")
    results.append(r)

  total = time.time() - t_all
  md = table(results)
  log("\n" + md + "\n")
  log(f"total wall time {total / 60:.1f} min")
  title = f"iso-FLOP: {budget:.2e} training FLOPs per run\n{shape}"
  png = os.path.join(args.out_dir, "isoflop.png")
  msg = plot(results, png, title)
  log(msg or f"plot: {png}")
  out = {"args": vars(args), "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
         "jax": jax.__version__, "flops_budget": budget, "tokens_per_step": tokens_per_step, "shape": shape,
         "validation": {"batches": len(vbatches), "rows": args.eval_rows, "tokens": results[0]["val_tokens"]},
         "total_wall_s": total, "table_markdown": md, "results": results}
  path = os.path.join(args.out_dir, "isoflop.json")
  write_result(path, out, conditions={"seed": args.seed, "dtype": "float32", "batch": args.batch,
                                      "flops_budget": budget})
  with open(os.path.join(args.out_dir, "isoflop.md"), "w") as f:
    f.write(f"{title}\n\n{md}\n\ntotal wall time {total / 60:.1f} min\n")
  log(f"results: {path}")
  return out


if __name__ == "__main__":
  main()
