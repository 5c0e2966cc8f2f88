"""Decode throughput of continuous depth-wise batching (mor_jax.infer.engine) against vanilla and plain MoR decoding.

  python benchmarks/depthwise_batching.py [--json=benchmarks/results/depthwise_batching.json]
  python benchmarks/depthwise_batching.py --models=vanilla,mor4 --requests=64 --repeats=1   # a quick look
  python benchmarks/depthwise_batching.py --random                                         # untrained weights

Models (benchmarks/bench_models.py: trained once, cached): the default Shakespeare job's shape with 14 layers,
vanilla and MoR expert-choice middle_cycle R = 2, 3, 4 of equal depth, `--train_steps` steps on the default
corpus, so the routers are real; `--random` uses random weights of the same shapes instead (no training).

Workload: `--requests` requests, prompts cut from the validation split (random token windows of
`--prompt_min..--prompt_max` tokens), generation lengths uniform in `--min_new..--max_new`, greedy, no EOS (every
request generates exactly its length). Modes, all at the fixed batch `--batch`:

  (a)  vanilla, ordinary batched decoding: requests in arrival order in batches of B (prefill the batch, decode
       until its longest request is done: the plain path `Generator` uses, `_prefill` + `_decode` while_loop);
  (a') vanilla through the engine (R = 1: continuous *sequence-level* batching only, no depth effect);
  (b)  MoR, ordinary batched decoding (causal threshold routing, recursion-wise KV caches);
  (c)  MoR through the engine (continuous depth-wise batching).

Throughput = generated tokens / wall-clock seconds for the whole workload, prefill, KV-cache writes, host
scheduling and admission included. Every model and mode first runs the whole workload untimed (`--warmups`
times for the engine: its programs depend on the prompt buckets and cache capacities it meets, and a run starts
from the capacity the last one ended with); then `--repeats` timed runs, interleaved over models and modes (load
drifts hit every mode alike); the best run of each is reported, and the XLA compilations seen during timed runs
(should be 0). Printed per model and
mode: tokens/s, against vanilla batched (a) and vanilla's engine (a'), CPU time per token (all threads), mean
recursions per generated token, the routing ideal L / (2 + 12/R x mean recursions), slot utilisation, exit waits
per tick, whether the engine's tokens equal batched decoding's; then the issue-34 targets: the depth-wise part
(MoR engine / vanilla engine) >= 0.9 x the routing ideal for every R, and the best MoR engine >= 2.06x vanilla
batched decoding (the paper's figure). Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mor_jax import runtime  # noqa: E402

if __name__ == "__main__":
  runtime.use_huge_pages()  # see mor_jax/runtime.py

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_models as bm  # noqa: E402

TARGET_FRACTION_OF_IDEAL = 0.9
TARGET_VS_BATCHED = 2.06


# ----------------------------------------------------------------------------------------------- models
@dataclasses.dataclass
class Model:
  name: str
  config: object
  cfg: object
  variables: object
  source: str
  directory: str | None = None


def random_model(name: str, max_len: int) -> Model:
  from configs import shakespeare_mor  # pylint: disable=g-import-not-at-top
  from mor_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import init_variables  # pylint: disable=g-import-not-at-top
  c = shakespeare_mor.get_config()
  R = bm.recursions(name)
  c.model.num_layers = bm.LAYERS
  c.model.max_seq_len = max(c.model.max_seq_len, max_len)
  if R == 1:
    c.recursion.update(strategy="none", num_recursions=1)
    c.mor.enable = False
  else:
    c.recursion.num_recursions = R
  del c["train"]
  cfg = config_lib.model_config(config_lib.validate(c))
  return Model(name, c, cfg, init_variables(cfg, jax.random.PRNGKey(R)), "random weights")


def load_models(args) -> dict[str, Model]:
  names = bm.parse_models(args.models)
  if args.random:
    return {n: random_model(n, args.max_len) for n in names}
  from mor_jax.infer import restore  # pylint: disable=g-import-not-at-top
  out = {}
  for name, wd in bm.ensure_models(names, args.train_steps, args.models_root).items():
    r = restore(wd)
    cfg = r.cfg if r.cfg.max_seq_len >= args.max_len else dataclasses.replace(r.cfg, max_seq_len=args.max_len)
    out[name] = Model(name, r.config, cfg, r.variables, f"{os.path.basename(wd)} (trained, step {r.step})",
                      r.directory)
  return out


# ----------------------------------------------------------------------------------------------- workload
@dataclasses.dataclass
class Workload:
  prompts: list[list[int]]
  new_tokens: list[int]

  @property
  def total(self) -> int:
    return int(sum(self.new_tokens))


def make_workload(args, model: Model) -> Workload:
  rng = np.random.default_rng(args.seed)
  lens = rng.integers(args.prompt_min, args.prompt_max + 1, args.requests)
  new = rng.integers(args.min_new, args.max_new + 1, args.requests)
  if args.random:
    prompts = [[int(x) for x in rng.integers(1, model.cfg.vocab_size, L)] for L in lens]
  else:
    from mor_jax.infer import load_tokenizer  # pylint: disable=g-import-not-at-top
    ids = load_tokenizer(model.config, model.cfg, directory=model.directory).encode(bm.validation_text())
    prompts = bm.token_windows(ids, lens, rng)
  return Workload(prompts, [int(x) for x in new])


# ----------------------------------------------------------------------------------------------- runners
def run_batched(cfg, weights, wl: Workload, B: int, max_len: int, threshold: float) -> dict:
  """Ordinary batched decoding (the plain generation path): batches of B in arrival order."""
  from mor_jax.infer import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.generate import _programs  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.prompts import prompt_length  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.sampling import SamplingParams, sampling_arrays  # pylint: disable=g-import-not-at-top
  plan = cache_lib.make_plan(cfg, max_len, "full")
  n_out = max(wl.new_tokens)
  thr, sp, eos = jnp.float32(threshold), sampling_arrays(SamplingParams(temperature=0.0)), jnp.int32(-1)
  base = jax.random.PRNGKey(0)
  tokens_out, rec_out, steps = {}, {}, 0
  t0, c0 = time.perf_counter(), time.process_time()
  for a in range(0, len(wl.prompts), B):
    idx = list(range(a, min(a + B, len(wl.prompts))))
    P = prompt_length(max(len(wl.prompts[i]) for i in idx), max_len)
    prefill, decode = _programs(cfg, plan, str(weights.dtype), B, P)     # (the plain path's programs per shape)
    toks = np.zeros((B, P), np.int32)
    lengths, limits = np.ones((B,), np.int32), np.ones((B,), np.int32)
    for j, i in enumerate(idx):
      toks[j, :len(wl.prompts[i])] = wl.prompts[i]
      lengths[j], limits[j] = len(wl.prompts[i]), wl.new_tokens[i]
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(a, a + B, dtype=jnp.int32))
    state, _ = prefill(weights, jnp.asarray(toks), jnp.asarray(lengths), keys, jnp.asarray(limits), thr, sp, eos,
                       n_out=n_out)
    state = decode(weights, state, jnp.int32(n_out), thr, sp, eos)
    out, rec, count, step = jax.device_get((state.out, state.rec, state.count, state.step))
    steps += int(step)
    for j, i in enumerate(idx):
      tokens_out[i], rec_out[i] = out[j, :count[j]].tolist(), rec[j, :count[j]].tolist()
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  order = range(len(wl.prompts))
  return _summary(wall, cpu, [tokens_out[i] for i in order], [rec_out[i] for i in order],
                  slot_utilisation=sum(len(t) for t in tokens_out.values()) / max(1, steps * B))


def _summary(wall, cpu, tokens, recursions, **extra) -> dict:
  gen = sum(len(t) for t in tokens)
  recs = [r for rec in recursions for r in rec[1:]]   # recursions of the decoded tokens' positions
  return {"wall_s": wall, "generated_tokens": gen, "tok_s": gen / wall, "mean_recursions": float(np.mean(recs)),
          "cpu_ms_per_token": 1e3 * cpu / gen, **extra, "tokens": tokens, "recursions": recursions}


def make_engine(m: Model, B: int, args, exit_rows):
  from mor_jax.infer.engine import Engine  # pylint: disable=g-import-not-at-top
  return Engine(m.cfg, m.variables, slots=B, max_len=args.max_len, max_new_tokens=args.max_new,
                threshold=args.threshold, entry_rows=exit_rows, exit_rows=exit_rows,
                refill_min=args.refill_min or None, prefill_rows=args.prefill_rows or None)


def run_engine(eng, wl: Workload) -> dict:
  from mor_jax.infer.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  t0, c0 = time.perf_counter(), time.process_time()
  outs = eng.generate(wl.prompts, max_new_tokens=wl.new_tokens, sampling=SamplingParams(temperature=0.0),
                      stop_at_eos=False)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  s = eng.stats
  ticks = max(1, s["ticks"])
  return _summary(wall, cpu, [o.tokens for o in outs], [o.recursions for o in outs],
                  slot_utilisation=s["slot_utilisation"], ticks=s["ticks"], admit_s=s["admit_s"],
                  admit_calls=s["admit_calls"], resizes=s["resizes"], exit_waits_per_tick=s["exit_waits"] / ticks,
                  entry_waits_per_tick=s["entry_waits"] / ticks, mixed_depth_ticks=s["mixed_depth_ticks"] / ticks,
                  tokens_per_tick=s["tokens_per_tick"], exit_rows=eng.layout.exit_rows,
                  entry_rows=eng.layout.entry_rows, kv_bytes_end=eng.kv_bytes())


def depth_histogram(recursions: list[list[int]], R: int) -> list[float]:
  """Fraction of generated tokens (after the first of each request) that ran 0..R recursions."""
  c = np.bincount([r for rec in recursions for r in rec[1:]], minlength=R + 1)[:R + 1]
  return (c / max(1, c.sum())).tolist()


def exit_rows_setting(value: str, B: int, measured_recursions: float):
  if value == "measured":
    return min(B, int(np.ceil(1.2 * B / max(1.0, measured_recursions))))
  return {"all": None, "auto": "auto"}.get(value) or int(value)


# ----------------------------------------------------------------------------------------------- main
def measure(models: dict[str, Model], wl: Workload, args) -> dict:
  """{(name, mode): best run} after a whole-workload warm-up of each; timed runs interleaved."""
  from mor_jax.infer import weights as weights_lib  # pylint: disable=g-import-not-at-top
  B, fns = args.batch, {}
  for name, m in models.items():
    w = weights_lib.prepare_weights(m.cfg, m.variables)
    batched = lambda m=m, w=w: run_batched(m.cfg, w, wl, B, args.max_len, args.threshold)
    t = time.perf_counter()
    probe = batched()                                                   # warm-up: compiles every batch shape
    eng = make_engine(m, B, args, exit_rows_setting(args.exit_rows, B, probe["mean_recursions"]))
    for _ in range(args.warmups):
      run_engine(eng, wl)                                               # warm-up: every bucket and capacity
    print(f"  warmed up {name} in {time.perf_counter() - t:.0f}s (entry/exit rows {eng.layout.entry_rows}/"
          f"{eng.layout.exit_rows} of {B})", flush=True)
    fns[(name, "batched")] = batched
    fns[(name, "engine")] = lambda eng=eng: run_engine(eng, wl)
  best, walls, compiles = {}, {k: [] for k in fns}, bm.Compilations()
  for rep in range(args.repeats):
    for k, fn in fns.items():
      with compiles:
        r = fn()
      walls[k].append(r["wall_s"])
      if k not in best or r["wall_s"] < best[k]["wall_s"]:
        best[k] = r
    print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{n} {m} {walls[(n, m)][-1]:.1f}s" for n, m in fns),
          flush=True)
  for k in best:
    best[k]["walls_s"] = walls[k]
  return {"best": best, "compilations": compiles.count, "compile_s": compiles.seconds,
          "compiled": sorted(set(compiles.programs))}


def report(models: dict[str, Model], best: dict, args) -> tuple[list, dict]:
  rows = []
  print("| model | mode | batch | tok/s | vs (a) | vs (a') | CPU ms/token | mean rec/token | ideal (routing) "
        "| slot util | exit waits/tick | = batched |\n|" + " --- |" * 12, flush=True)
  base = best.get(("vanilla", "batched"), {}).get("tok_s")
  base_e = best.get(("vanilla", "engine"), {}).get("tok_s")
  for name, m in models.items():
    plain, eng = best[(name, "batched")], best[(name, "engine")]
    same = sum(a == b for a, b in zip(plain["tokens"], eng["tokens"])) / len(plain["tokens"])
    R = m.cfg.recursions if m.cfg.strategy != "none" else 1
    for mode, r in (("batched", plain), ("engine", eng)):
      label = {("vanilla", "batched"): "(a)", ("vanilla", "engine"): "(a')"}.get(
          (name, mode), "(b)" if mode == "batched" else "(c)")
      ideal = bm.ideal_speedup(R, r["mean_recursions"])
      rel = r["tok_s"] / base if base else float("nan")
      rel_e = r["tok_s"] / base_e if base_e else float("nan")
      engine = mode == "engine"
      print(f"| {name} | {label} {mode} | {args.batch} | {r['tok_s']:,.0f} | {rel:.2f}x | {rel_e:.2f}x | "
            f"{r['cpu_ms_per_token']:.2f} | {r['mean_recursions']:.2f} / {R} | {ideal:.2f}x | "
            f"{r['slot_utilisation']:.2f} | {r['exit_waits_per_tick']:.2f} | {same:.0%} |" if engine else
            f"| {name} | {label} {mode} | {args.batch} | {r['tok_s']:,.0f} | {rel:.2f}x | {rel_e:.2f}x | "
            f"{r['cpu_ms_per_token']:.2f} | {r['mean_recursions']:.2f} / {R} | {ideal:.2f}x | "
            f"{r['slot_utilisation']:.2f} | - | - |", flush=True)
      rows.append({"model": name, "mode": mode, "label": label, "recursions": R, "batch": args.batch,
                   "vs_vanilla_batched": rel, "vs_vanilla_engine": rel_e, "ideal": ideal,
                   "engine_equals_batched": same if engine else None,
                   "depth_histogram": depth_histogram(r["recursions"], R),
                   **{k: v for k, v in r.items() if k not in ("tokens", "recursions")}})
  return rows, targets(rows)


def targets(rows: list) -> dict:
  """The issue-34 targets: depth-wise part (MoR engine / vanilla engine) vs the routing ideal; best MoR engine vs
  vanilla batched."""
  eng = {r["model"]: r for r in rows if r["mode"] == "engine"}
  if "vanilla" not in eng:
    return {}
  out = {"depthwise": {}}
  for name, r in eng.items():
    if name == "vanilla":
      continue
    part = r["vs_vanilla_engine"]
    out["depthwise"][name] = {"mor_engine_vs_vanilla_engine": part, "ideal": r["ideal"],
                              "fraction_of_ideal": part / r["ideal"],
                              "pass": part / r["ideal"] >= TARGET_FRACTION_OF_IDEAL}
  mor = [r for n, r in eng.items() if n != "vanilla"]
  if mor:
    top = max(mor, key=lambda r: r["vs_vanilla_batched"])
    out["best_vs_vanilla_batched"] = {"model": top["model"], "ratio": top["vs_vanilla_batched"],
                                      "pass": top["vs_vanilla_batched"] >= TARGET_VS_BATCHED}
  print(f"\ntargets (issue 34): depth-wise part >= {TARGET_FRACTION_OF_IDEAL} x ideal; best MoR engine >= "
        f"{TARGET_VS_BATCHED}x vanilla batched")
  for name, t in out["depthwise"].items():
    print(f"  {name}: engine / vanilla engine {t['mor_engine_vs_vanilla_engine']:.2f}x, ideal {t['ideal']:.2f}x, "
          f"{t['fraction_of_ideal']:.0%} of ideal: {'pass' if t['pass'] else 'FAIL'}")
  if "best_vs_vanilla_batched" in out:
    b = out["best_vs_vanilla_batched"]
    print(f"  best: {b['model']} engine {b['ratio']:.2f}x vanilla batched: {'pass' if b['pass'] else 'FAIL'}")
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bm.add_flags(p)
  p.add_argument("--random", action="store_true", help="random weights instead of the trained models")
  p.add_argument("--requests", type=int, default=512)
  p.add_argument("--prompt_min", type=int, default=8)
  p.add_argument("--prompt_max", type=int, default=32)
  p.add_argument("--min_new", type=int, default=8)
  p.add_argument("--max_new", type=int, default=96)
  p.add_argument("--max_len", type=int, default=128, help="cache positions per sequence (prompt + new <= this)")
  p.add_argument("--batch", type=int, default=32, help="the fixed batch (engine slots, batched decoding's B)")
  p.add_argument("--exit_rows", default="auto",
                 help="engine entry/exit sub-batch: 'auto' (the engine's: 1.25 x B / expected recursions), "
                      "'measured' (1.2 x B / the mean recursions of batched decoding), 'all' or a number")
  p.add_argument("--refill_min", type=int, default=0, help="engine: free slots that trigger admission (0: its default)")
  p.add_argument("--prefill_rows", type=int, default=0, help="engine: prompts per prefill call (0: its default)")
  p.add_argument("--threshold", type=float, default=0.5)
  p.add_argument("--warmups", type=int, default=2, help=bm.WARMUPS_HELP)
  p.add_argument("--repeats", type=int, default=3, help="timed runs of each model and mode (best kept)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.prompt_max + args.max_new > args.max_len:
    p.error("--prompt_max + --max_new must fit in --max_len")

  models = load_models(args)
  wl = make_workload(args, next(iter(models.values())))
  print(f"device: {jax.devices()[0].device_kind} x1 (CPU threads: {os.cpu_count()}); {len(wl.prompts)} requests, "
        f"prompts {args.prompt_min}-{args.prompt_max} tokens, {args.min_new}-{args.max_new} new tokens "
        f"({wl.total} in all), greedy, batch {args.batch}, max_len {args.max_len}, threshold {args.threshold}",
        flush=True)
  for name, m in models.items():
    print(f"  {name}: {m.cfg.strategy} L={m.cfg.num_layers} R={m.cfg.recursions} "
          f"{'MoR ' + m.cfg.mor_type if m.cfg.mor_enable else ''}; {m.source}", flush=True)
  res = measure(models, wl, args)
  print(f"XLA compilations during timed runs: {res['compilations']} ({res['compile_s']:.1f}s"
        + (f": {', '.join(res['compiled'])})" if res["compiled"] else ")"), flush=True)
  rows, tg = report(models, res["best"], args)
  print("\nrecursion depth per generated token (fractions at depth 0..R; engine runs):")
  for r in rows:
    if r["mode"] == "engine" and r["model"] != "vanilla":
      print(f"  {r['model']}: " + ", ".join(f"{d}: {x:.2f}" for d, x in enumerate(r["depth_histogram"])))
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {"args": vars(args), "results": rows, "targets": tg,
                             "timed_compilations": res["compilations"]},
                 conditions={"weights": "random" if args.random else f"trained, {args.train_steps} steps",
                             "batch": args.batch, "requests": args.requests, "repeats": args.repeats,
                             "dtype": "float32", "models": {n: m.source for n, m in models.items()}})
  return rows


if __name__ == "__main__":
  main()
