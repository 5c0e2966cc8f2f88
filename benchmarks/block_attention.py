"""Where gathering each row's recursion region beats masked attention over all of them (the engine's 'auto').

  python benchmarks/block_attention.py [--models=mor2,mor3,mor4] [--prompt_lens=16,100,300] [--slots=16]
                                       [--json=benchmarks/results/block_attention.json]

The depth-wise batching engine keeps the shared block's cache as one region per recursion, side by side. Its block
pass either attends over all regions with a mask ('masked': no copies, R x the attention work) or gathers each
row's own region first ('gather': one copy per layer, 1 x the work). For each trained MoR model
(bench_models.py) and prompt length (which sets the cache capacity the measured steps run at), the same greedy
requests run through an engine with each setting; the figure is decode tokens per second (wall clock, best of
`--repeats` timed steps of `--step_ticks` ticks, after warm-up steps), with the entries each row's masked attention
adds beyond its own region ("extra"), and what 'auto' (`layout.EngineLayout.gather`) picks at that capacity.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_models as bm  # noqa: E402


def measure(cfg, variables, prompts, mode: str, args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import SamplingParams  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.engine import Engine  # pylint: disable=g-import-not-at-top
  eng = Engine(cfg, variables, slots=args.slots, max_len=cfg.max_seq_len - 1, block_attention=mode)
  for p in prompts:
    eng.submit(p, args.new_tokens)
  eng.start(sampling=SamplingParams(temperature=0.0), stop_at_eos=False)
  for _ in range(args.warmup_steps):
    eng.step(max_ticks=args.step_ticks)
  best = None
  for _ in range(args.repeats):
    s0 = jax.device_get(eng._state.stats)   # pylint: disable=protected-access
    t = time.perf_counter()
    eng.step(max_ticks=args.step_ticks)
    wall = time.perf_counter() - t
    s1 = jax.device_get(eng._state.stats)   # pylint: disable=protected-access
    tokens = int(s1["tokens"] - s0["tokens"])
    run = {"tok_s": tokens / wall, "ms_per_tick": wall / max(1, int(s1["ticks"] - s0["ticks"])) * 1e3,
           "mean_recursions": float(s1["applied_rows"] - s0["applied_rows"]) / max(1, tokens)}
    best = run if best is None or run["tok_s"] > best["tok_s"] else best
  lay = eng.layout
  eng.finish()
  auto = dataclasses.replace(lay, block_attention="auto").gather
  return {**best, "capacity": lay.capacity, "extra": lay.width - 1 - lay.span, "auto_gathers": auto}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bm.add_flags(p, models="mor2,mor3,mor4")
  p.add_argument("--prompt_lens", default="16,100,300")
  p.add_argument("--slots", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=200)
  p.add_argument("--step_ticks", type=int, default=24)
  p.add_argument("--warmup_steps", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import restore  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.engine.layout import GATHER_SPAN  # pylint: disable=g-import-not-at-top
  names = bm.parse_models(args.models)
  workdirs = bm.ensure_models(names, args.train_steps, args.models_root)
  print(f"{args.slots} slots, greedy, float32, trained models ({args.train_steps} steps); GATHER_SPAN = "
        f"{GATHER_SPAN}\n| model | prompt | capacity | extra | masked tok/s | gather tok/s | gather / masked "
        "| auto |\n|" + " --- |" * 8, flush=True)
  rows = []
  for name in names:
    r = restore(workdirs[name])
    for plen in [int(x) for x in args.prompt_lens.split(",")]:
      rng = np.random.default_rng(args.seed)
      prompts = [[int(x) for x in rng.integers(1, r.cfg.vocab_size - 1, plen)] for _ in range(args.slots)]
      m = {mode: measure(r.cfg, r.variables, prompts, mode, args) for mode in ("masked", "gather")}
      auto = m["gather"]["auto_gathers"]
      row = {"model": name, "recursions": bm.recursions(name), "prompt_len": plen,
             "capacity": m["masked"]["capacity"], "extra": m["masked"]["extra"], "masked": m["masked"],
             "gather": m["gather"], "gather_vs_masked": m["gather"]["tok_s"] / m["masked"]["tok_s"],
             "auto": "gather" if auto else "masked"}
      rows.append(row)
      print(f"| {name} | {plen} | {row['capacity']} | {row['extra']} | {m['masked']['tok_s']:.0f} | "
            f"{m['gather']['tok_s']:.0f} | {row['gather_vs_masked']:.2f} | {row['auto']} |", flush=True)
  won = [r["extra"] for r in rows if r["gather_vs_masked"] > 1.0]
  lost = [r["extra"] for r in rows if r["gather_vs_masked"] <= 1.0]
  summary = {"gather_span": GATHER_SPAN, "smallest_extra_gather_won": min(won) if won else None,
             "largest_extra_masked_won": max(lost) if lost else None,
             "auto_picked_the_slower": [f"{r['model']} at capacity {r['capacity']}" for r in rows
                                        if (r["auto"] == "gather") != (r["gather_vs_masked"] > 1.0)],
             "auto_vs_best": min((r[r["auto"]]["tok_s"] / max(r["masked"]["tok_s"], r["gather"]["tok_s"]))
                                 for r in rows)}
  print(summary, flush=True)
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {"rows": rows, "summary": summary, "args": vars(args)},
                 conditions={"weights": f"trained, {args.train_steps} steps", "slots": args.slots,
                             "dtype": "float32", "timing": "wall clock, best of repeats"})
  return rows


if __name__ == "__main__":
  main()
