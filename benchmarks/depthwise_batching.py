"""Decode throughput of continuous depth-wise batching (mor_jax.infer.engine) against vanilla and plain MoR decoding.

  python benchmarks/depthwise_batching.py --workdirs=vanilla=W0,mor2=W2,mor3=W3,mor4=W4 [--json=out.json]
  python benchmarks/depthwise_batching.py --train_steps=300 [--train_root=/tmp/mor_dwb]   # trains what is missing
  python benchmarks/depthwise_batching.py --random                                         # untrained, smoke run

Models (the default Shakespeare job's shape, `configs/shakespeare_mor.py`, with 14 layers so that R = 2, 3, 4 all
divide the 12 middle layers): a vanilla 14-layer model and MoR expert-choice middle_cycle models with R = 2, 3, 4
(1 + 12/R shared layers x R + 1; capacities (R - r)/R). Trained on the default corpus (`--train_steps` of the
default job's optimiser with 8 x 256 tokens per step), so the routers are real; `--random` uses random weights.

Workload: `--requests` requests, prompts cut from the validation split (random token windows of
`--prompt_min..--prompt_max` tokens), generation lengths uniform in `--min_new..--max_new`, greedy, no EOS (every
request generates exactly its length). Modes:

  (a)  vanilla, ordinary batched decoding: requests in arrival order in batches of B (prefill the batch, decode
       until its longest request is done: the plain path `Generator` uses, `_prefill` + `_decode` while_loop);
  (a') vanilla through the engine (R = 1: continuous *sequence-level* batching only, no depth effect);
  (b)  MoR, ordinary batched decoding (causal threshold routing, recursion-wise KV caches);
  (c)  MoR through the engine (continuous depth-wise batching).

Throughput = generated tokens / wall-clock seconds for the whole workload, prefill, KV-cache writes, host
scheduling and admission included, after a warm-up on the first 2B requests that compiles every program
(compilation excluded); best of `--repeats`, batched and engine runs interleaved. Two batch settings: the fixed
`--batch`, and the largest batch (multiple of 8) whose parameters + KV caches fit a memory budget (default:
what vanilla needs at `--budget_batch`; MoR then uses `kv_capacity=routed`, recursion r's cache holding
ceil(c_r * max_len) entries, so its KV memory follows the capacities). Also printed:
mean recursions per generated token, slot utilisation (the fraction of block rows that did useful work: engine =
applied block rows / (ticks x slots); batched = generated tokens / (decode steps x B)), the engine's exit/entry
waits, the ideal speedup from routing alone L / (2 + d x mean recursions) (layer applications per token, head
excluded), CPU time per generated token (all threads; less sensitive than wall clock to other processes on a
shared machine), whether the engine's tokens equal batched decoding's token for token, and the distribution of
recursion depths per generated token. The engine's first/last-layer sub-batch is 1.2 x B / the mean recursions
that batched decoding measured on the warm-up requests (`--exit_rows`).

Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from mor_jax import runtime  # noqa: E402

if __name__ == "__main__":
  runtime.use_huge_pages()  # see mor_jax/runtime.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

LAYERS = 14
MODELS = {"vanilla": 1, "mor2": 2, "mor3": 3, "mor4": 4}


# ----------------------------------------------------------------------------------------------- models
def train_overrides(name: str, steps: int) -> list[str]:
  R = MODELS[name]
  o = [f"--config.model.num_layers={LAYERS}", f"--config.train.num_steps={steps}",
       "--config.train.total_batch_size=8", f"--config.train.eval_every_steps={steps}",
       "--config.train.save_interval=0.5", "--config.train.progress_bar=False", f"--config.name=dwb-{name}"]
  if R == 1:
    o += ["--config.recursion.strategy=none", "--config.recursion.num_recursions=1", "--config.mor.enable=False"]
  else:
    o += [f"--config.recursion.num_recursions={R}"]
  return o


def train(name: str, workdir: str, steps: int) -> None:
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs/shakespeare_mor.py"),
         f"--workdir={workdir}"] + train_overrides(name, steps)
  print(f"training {name}: {' '.join(cmd)}", flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def random_model(name: str, max_len: int):
  from configs import shakespeare_mor  # pylint: disable=g-import-not-at-top
  from mor_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import init_variables  # pylint: disable=g-import-not-at-top
  c = shakespeare_mor.get_config()
  R = MODELS[name]
  c.model.num_layers = LAYERS
  c.model.max_seq_len = max(c.model.max_seq_len, max_len)
  if R == 1:
    c.recursion.update(strategy="none", num_recursions=1)
    c.mor.enable = False
  else:
    c.recursion.num_recursions = R
  del c["train"]
  cfg = config_lib.model_config(config_lib.validate(c))
  return c, cfg, init_variables(cfg, jax.random.PRNGKey(MODELS[name]))


def load_models(args):
  names = args.models.split(",")
  given = dict(kv.split("=", 1) for kv in args.workdirs.split(",") if kv) if args.workdirs else {}
  out = {}
  for name in names:
    if args.random:
      config, cfg, variables = random_model(name, args.max_len)
      out[name] = (config, cfg, variables, "random weights")
      continue
    from mor_jax.infer import find_checkpoints, restore  # pylint: disable=g-import-not-at-top
    wd = given.get(name) or os.path.join(args.train_root, name)
    try:
      find_checkpoints(wd)
    except ValueError:
      if name in given:
        raise
      train(name, wd, args.train_steps)
    r = restore(wd)
    cfg = r.cfg if r.cfg.max_seq_len >= args.max_len else dataclasses.replace(r.cfg, max_seq_len=args.max_len)
    out[name] = (r.config, cfg, r.variables, f"{wd} step {r.step}")
  return out


# ----------------------------------------------------------------------------------------------- workload
@dataclasses.dataclass
class Workload:
  prompts: list[list[int]]
  new_tokens: list[int]

  @property
  def total(self) -> int:
    return int(sum(self.new_tokens))


def make_workload(args, config, vocab: int) -> Workload:
  rng = np.random.default_rng(args.seed)
  n = args.requests
  lens = rng.integers(args.prompt_min, args.prompt_max + 1, n)
  new = rng.integers(args.min_new, args.max_new + 1, n)
  stream = None
  if not args.random:
    try:
      from mor_jax.data import corpus as corpora  # pylint: disable=g-import-not-at-top
      from mor_jax.infer import load_tokenizer  # pylint: disable=g-import-not-at-top
      tok = load_tokenizer(config)
      info = corpora.build_corpus(config)
      ids = []
      for text in corpora.iter_texts(info.dataset_dir, "validation", 0, 64):
        ids.extend(tok.encode(text))
        if len(ids) > 200_000:
          break
      stream = np.asarray(ids, np.int64)
    except Exception as e:  # pylint: disable=broad-except
      print(f"(validation text unavailable: {type(e).__name__}: {e}; random prompts)", flush=True)
  prompts = []
  for L in lens:
    if stream is not None and len(stream) > L + 1:
      a = int(rng.integers(0, len(stream) - L))
      prompts.append([int(x) for x in stream[a:a + L]])
    else:
      prompts.append([int(x) for x in rng.integers(1, vocab, L)])
  return Workload(prompts, [int(x) for x in new])


# ----------------------------------------------------------------------------------------------- runners
def _bucket(n, minimum=16):
  b = minimum
  while b < n:
    b *= 2
  return b


def run_batched(cfg, variables, wl: Workload, B: int, max_len: int, kv_capacity: str, threshold: float):
  """Ordinary batched decoding (the plain generation path): batches of B in arrival order."""
  from mor_jax.infer import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.generate import _programs  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.sampling import SamplingParams, sampling_arrays  # pylint: disable=g-import-not-at-top
  plan = cache_lib.make_plan(cfg, max_len, kv_capacity)
  prefill, decode = _programs(cfg, plan)
  n_out = max(wl.new_tokens)
  thr, sp, eos = jnp.float32(threshold), sampling_arrays(SamplingParams(temperature=0.0)), jnp.int32(-1)
  base = jax.random.PRNGKey(0)
  tokens_out, rec_out, steps = {}, {}, 0
  t0, c0 = time.perf_counter(), time.process_time()
  for a in range(0, len(wl.prompts), B):
    idx = list(range(a, min(a + B, len(wl.prompts))))
    P = _bucket(max(len(wl.prompts[i]) for i in idx))
    toks = np.zeros((B, P), np.int32)
    lengths = np.ones((B,), np.int32)
    limits = np.ones((B,), np.int32)
    for j, i in enumerate(idx):
      toks[j, :len(wl.prompts[i])] = wl.prompts[i]
      lengths[j], limits[j] = len(wl.prompts[i]), wl.new_tokens[i]
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(a, a + B, dtype=jnp.int32))
    state, _ = prefill(variables, jnp.asarray(toks), jnp.asarray(lengths), keys, jnp.asarray(limits), thr, sp, eos,
                       n_out=n_out)
    state = decode(variables, state, jnp.int32(n_out), thr, sp, eos)
    out, rec, count, step = jax.device_get((state.out, state.rec, state.count, state.step))
    steps += int(step)
    for j, i in enumerate(idx):
      tokens_out[i] = out[j, :count[j]].tolist()
      rec_out[i] = rec[j, :count[j]].tolist()
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  gen = sum(len(t) for t in tokens_out.values())
  recs = [r for i in rec_out for r in rec_out[i][1:]]   # recursions of the decoded tokens' positions
  return {"wall_s": wall, "generated_tokens": gen, "tok_s": gen / wall, "mean_recursions": float(np.mean(recs)),
          "cpu_ms_per_token": 1e3 * cpu / gen, "slot_utilisation": gen / max(1, steps * B), "tokens": [tokens_out[i] for i in range(len(wl.prompts))],
          "recursions": [rec_out[i] for i in range(len(wl.prompts))]}


def run_engine(cfg, variables, wl: Workload, B: int, max_len: int, kv_capacity: str, threshold: float, rows,
               refill_min):
  from mor_jax.infer.engine import Engine  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  refill = refill_min or max(1, B // 8)
  eng = Engine(cfg, variables, slots=B, max_len=max_len, max_new_tokens=max(wl.new_tokens), threshold=threshold,
               kv_capacity=kv_capacity, entry_rows=rows, exit_rows=rows, refill_min=refill, prefill_rows=refill)
  t0, c0 = time.perf_counter(), time.process_time()
  outs = eng.generate(wl.prompts, max_new_tokens=wl.new_tokens, sampling=SamplingParams(temperature=0.0),
                      stop_at_eos=False)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  s = eng.stats
  gen = sum(len(o.tokens) for o in outs)
  recs = [r for o in outs for r in o.recursions[1:]]
  return {"wall_s": wall, "generated_tokens": gen, "tok_s": gen / wall, "mean_recursions": float(np.mean(recs)),
          "cpu_ms_per_token": 1e3 * cpu / gen, "slot_utilisation": s["slot_utilisation"], "ticks": s["ticks"], "admit_s": s["admit_s"],
          "exit_waits_per_tick": s["exit_waits"] / max(1, s["ticks"]),
          "entry_waits_per_tick": s["entry_waits"] / max(1, s["ticks"]),
          "mixed_depth_ticks": s["mixed_depth_ticks"] / max(1, s["ticks"]), "tokens_per_tick": s["tokens_per_tick"],
          "exit_rows": eng.layout.exit_rows, "kv_bytes": eng.kv_bytes(), "tokens": [o.tokens for o in outs],
          "recursions": [o.recursions for o in outs]}


def warmup_workload(wl: Workload, B: int) -> Workload:
  """The first 2B requests, the first B of them with prompts cut to 16 tokens: they compile every program the
  timed runs use (both prompt buckets, the fixed admission batch, the decode / tick programs)."""
  n = min(len(wl.prompts), 2 * B)
  return Workload([p[:16] if i < B else p for i, p in enumerate(wl.prompts[:n])], wl.new_tokens[:n])


def best_of(fns: dict, repeats: int) -> dict:
  """Runs each fn `repeats` times, interleaved (load drifts hit every mode alike); keeps each one's fastest."""
  best = {}
  for _ in range(repeats):
    for k, fn in fns.items():
      r = fn()
      if k not in best or r["wall_s"] < best[k]["wall_s"]:
        best[k] = r
  return best


def depth_histogram(recursions: list[list[int]], R: int) -> list[float]:
  """Fraction of generated tokens (after the first of each request) that ran 0..R recursions."""
  c = np.bincount([r for rec in recursions for r in rec[1:]], minlength=R + 1)[:R + 1]
  return (c / max(1, c.sum())).tolist()


# ----------------------------------------------------------------------------------------------- memory
def params_bytes(variables) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(variables)))


def batched_kv_bytes(cfg, max_len, kv_capacity, B) -> int:
  from mor_jax.infer import cache as cache_lib  # pylint: disable=g-import-not-at-top
  plan = cache_lib.make_plan(cfg, max_len, kv_capacity)
  shapes = jax.eval_shape(lambda: cache_lib.init_cache(cfg, plan, B))
  return int(sum(np.prod(a.shape) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(shapes)))


def largest_batch(cfg, variables, max_len, kv_capacity, budget, cap) -> int:
  best = 0
  for B in range(8, cap + 1, 8):
    if params_bytes(variables) + batched_kv_bytes(cfg, max_len, kv_capacity, B) <= budget:
      best = B
  return max(best, 8)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdirs", default="", help="name=workdir,... for vanilla, mor2, mor3, mor4")
  p.add_argument("--models", default="vanilla,mor2,mor3,mor4")
  p.add_argument("--train_root", default="/tmp/mor_dwb", help="where missing models are trained")
  p.add_argument("--train_steps", type=int, default=300)
  p.add_argument("--random", action="store_true", help="random weights instead of trained models (smoke run)")
  p.add_argument("--requests", type=int, default=768)
  p.add_argument("--prompt_min", type=int, default=8)
  p.add_argument("--prompt_max", type=int, default=32)
  p.add_argument("--min_new", type=int, default=8)
  p.add_argument("--max_new", type=int, default=96)
  p.add_argument("--max_len", type=int, default=128, help="cache positions per sequence (prompt + new <= this)")
  p.add_argument("--batch", type=int, default=32, help="the fixed batch (slots)")
  p.add_argument("--budget_batch", type=int, default=64,
                 help="memory budget = vanilla's parameters + KV caches at this batch (0: skip the setting)")
  p.add_argument("--budget_cap", type=int, default=192, help="largest batch tried under the budget")
  p.add_argument("--exit_rows", default="measured",
                 help="engine entry/exit sub-batch: 'measured' (1.2 x B / the mean recursions measured with batched "
                      "decoding), 'auto' (from the capacities), 'all' or a number")
  p.add_argument("--refill_min", type=int, default=0, help="engine: free slots that trigger admission (0: B/8)")
  p.add_argument("--threshold", type=float, default=0.5)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  assert args.prompt_max + args.max_new <= args.max_len, "prompt_max + max_new must fit in max_len"

  models = load_models(args)
  first = next(iter(models.values()))
  wl = make_workload(args, first[0], first[1].vocab_size)
  refill = args.refill_min or None
  print(f"device: {jax.devices()[0].device_kind} x1 (CPU threads: {os.cpu_count()}); {len(wl.prompts)} requests, "
        f"prompts {args.prompt_min}-{args.prompt_max} tokens, {args.min_new}-{args.max_new} new tokens "
        f"({wl.total} in all), greedy, max_len {args.max_len}, threshold {args.threshold}", flush=True)
  for name, (_, cfg, variables, src) in models.items():
    print(f"  {name}: {cfg.strategy} L={cfg.num_layers} R={cfg.recursions} "
          f"{'MoR ' + cfg.mor_type if cfg.mor_enable else ''} {params_bytes(variables) / 2**20:.1f} MiB params; {src}")

  settings = [("fixed", {n: args.batch for n in models}, "full")]
  if args.budget_batch and "vanilla" in models:
    _, vcfg, vvars, _ = models["vanilla"]
    budget = params_bytes(vvars) + batched_kv_bytes(vcfg, args.max_len, "full", args.budget_batch)
    bs = {n: largest_batch(cfg, v, args.max_len, "full" if n == "vanilla" else "routed", budget, args.budget_cap)
          for n, (_, cfg, v, _) in models.items()}
    settings.append((f"budget {budget / 2**20:.0f} MiB", bs, "routed"))
    print(f"memory budget {budget / 2**20:.1f} MiB (vanilla at batch {args.budget_batch}): batches {bs}", flush=True)

  results = []
  header = ("| setting | model | mode | batch | tok/s | vs (a) | vs (a') | CPU ms/token | mean rec/token "
            "| ideal (routing) | slot util | exit waits/tick | = batched |")
  print(header + "\n|" + " --- |" * 13, flush=True)
  for setting, batches, mor_capacity in settings:
    base_tok_s = base_engine = None
    for name, (_, cfg, variables, _) in models.items():
      B = batches[name]
      rows = None
      cap = "full" if name == "vanilla" else mor_capacity
      warm = warmup_workload(wl, B)
      probe = run_batched(cfg, variables, warm, B, args.max_len, cap, args.threshold)   # compiles; routing rate
      if args.exit_rows == "measured":
        rows = min(B, int(np.ceil(1.2 * B / max(1.0, probe["mean_recursions"]))))
      else:
        rows = {"all": None, "auto": "auto"}.get(args.exit_rows) or int(args.exit_rows)
      run_engine(cfg, variables, warm, B, args.max_len, cap, args.threshold, rows, refill)   # compiles
      best = best_of({"batched": lambda: run_batched(cfg, variables, wl, B, args.max_len, cap, args.threshold),
                      "engine": lambda: run_engine(cfg, variables, wl, B, args.max_len, cap, args.threshold, rows,
                                                   refill)}, args.repeats)
      plain, eng = best["batched"], best["engine"]
      same = sum(a == b for a, b in zip(plain["tokens"], eng["tokens"])) / len(wl.prompts)
      if name == "vanilla":
        base_tok_s, base_engine = plain["tok_s"], eng["tok_s"]
      d = cfg.base_depth
      for mode, r in (("batched", plain), ("engine", eng)):
        label = {("vanilla", "batched"): "(a)", ("vanilla", "engine"): "(a')"}.get(
            (name, mode), "(b)" if mode == "batched" else "(c)")
        ideal = LAYERS / (LAYERS if name == "vanilla" else 2 + d * r["mean_recursions"])
        rel = r["tok_s"] / base_tok_s if base_tok_s else float("nan")
        rel_e = r["tok_s"] / base_engine if base_engine else float("nan")
        engine = mode == "engine"
        waits = f"{r['exit_waits_per_tick']:.2f}" if engine else "-"
        same_s = f"{same:.0%}" if engine else "-"
        print(f"| {setting} | {name} | {label} {mode} | {B} | {r['tok_s']:,.0f} | {rel:.2f}x | {rel_e:.2f}x | "
              f"{r['cpu_ms_per_token']:.2f} | {r['mean_recursions']:.2f} / {cfg.recursions} | {ideal:.2f}x | "
              f"{r['slot_utilisation']:.2f} | {waits} | {same_s} |", flush=True)
        results.append({"setting": setting, "model": name, "mode": mode, "label": label, "batch": B,
                        "kv_capacity": cap, "vs_vanilla_batched": rel, "vs_vanilla_engine": rel_e,
                        "ideal_routing_speedup": ideal,
                        "engine_equals_batched": same, "depth_histogram": depth_histogram(r["recursions"],
                                                                                          cfg.recursions),
                        **{k: v for k, v in r.items() if k not in ("tokens", "recursions")}})
  print("\nrecursion depth per generated token (fractions at depth 0..R; engine runs, fixed batch):")
  for r in results:
    if r["mode"] == "engine" and r["setting"] == "fixed" and r["model"] != "vanilla":
      print(f"  {r['model']}: " + ", ".join(f"{d}: {x:.2f}" for d, x in enumerate(r["depth_histogram"])))
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {"args": vars(args), "results": results},
                 conditions={"weights": "random" if args.random else "trained", "batch": args.batch,
                             "dtype": "float32", "models": {n: m[3] for n, m in models.items()}})
  return results


if __name__ == "__main__":
  main()
