"""Input-pipeline throughput: tokens/s from raw text and pre-tokenized shards.

  python benchmarks/input_pipeline.py [--workers=0,4] [--seq_len=2048]
      [--batch=8] [--seconds=10] [--tokenizer_path=...] [--data_dir=...] [--json=out.json]

Reads the embedded Shakespeare corpus (built offline on first use) through
`mor_jax.data.make_iterator`, with the SmolLM tokenizer (vocab 49,152, the repository's
assets/tokenizers/smollm), or a trained BPE with --tokenizer_path=''. For each path (raw text: tokenize in the
pipeline; pre-tokenized: read ArrayRecord token shards) and each worker count
it reports packed tokens/s after a warm-up (worker start-up excluded).

Targets to compare with:
  CPU model here consumes ~2-4k tokens/s  -> pipeline target >= 40k tokens/s
  reference run (L40S)                     ~10.6k tokens/s per GPU
  H100, smollm360 at 45% MFU               ~190k tokens/s per GPU
"""

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMOLLM = os.path.join(REPO, "assets", "tokenizers", "smollm")   # the repository's copy (tokenizer.json, config)
NEEDS = {"cpu_model_x10": 40_000, "l40s_reference": 10_600,
         "h100_smollm360_45pct_mfu": 190_000}


def _config(args, pretokenized, workers):
  from mor_jax.config import defaults  # pylint: disable=g-import-not-at-top
  c = defaults()
  c.data.data_dir = args.data_dir
  c.data.seq_len = args.seq_len
  c.data.pretokenized = pretokenized
  c.data.num_workers = workers
  c.data.prefetch = 4
  c.data.read_threads = args.read_threads
  if args.tokenizer_path:
    c.data.tokenizer_path = args.tokenizer_path
    c.model.vocab_size = 49152
  else:
    c.model.vocab_size = args.vocab_size
  return c


def measure(args, pretokenized, workers):
  from mor_jax.data import make_iterator  # pylint: disable=g-import-not-at-top
  c = _config(args, pretokenized, workers)
  t0 = time.perf_counter()
  it = make_iterator(c, "train", global_batch_size=args.batch,
                     process_index=0, process_count=1)
  try:
    for _ in range(args.warmup):
      next(it)
    startup = time.perf_counter() - t0
    n = 0
    t = time.perf_counter()
    while time.perf_counter() - t < args.seconds:
      n += next(it)["tokens"].size
    rate = n / (time.perf_counter() - t)
  finally:
    it.close()
  return {"path": "pretokenized" if pretokenized else "raw",
          "workers": workers, "tokens_per_s": round(rate),
          "startup_s": round(startup, 2)}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workers", default=f"0,{os.cpu_count() or 1}",
                 help="comma-separated worker counts")
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seconds", type=float, default=10.0)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--read_threads", type=int, default=2)
  p.add_argument("--tokenizer_path",
                 default=SMOLLM if os.path.isdir(SMOLLM) else "")
  p.add_argument("--vocab_size", type=int, default=4096,
                 help="trained BPE size when no tokenizer_path")
  p.add_argument("--data_dir", default=os.path.join(
      tempfile.gettempdir(), "mor_jax_bench_data"))
  p.add_argument("--json", default="", help="also write the results here (with provenance)")
  args = p.parse_args()

  from mor_jax.data import prepare  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  info = prepare(_config(args, True, 0))
  print(f"prepare (corpus + tokenizer + token shards): "
        f"{time.perf_counter() - t:.1f}s; {info.tokens['splits']['train']}"
        .replace(str(info.tokens["splits"]["train"].get("files")), "..."))
  results = []
  for pretok in (False, True):
    for w in [int(x) for x in args.workers.split(",")]:
      r = measure(args, pretok, w)
      results.append(r)
      print(f"{r['path']:>12}  workers={w:<2}  {r['tokens_per_s']:>10,} "
            f"tokens/s  (start-up {r['startup_s']}s)", flush=True)
  best = {k: max(r["tokens_per_s"] for r in results if r["path"] == k)
          for k in ("raw", "pretokenized")}
  for name, need in NEEDS.items():
    print(f"need {name:<26} {need:>9,} tokens/s: raw "
          f"{'meets' if best['raw'] >= need else 'MISSES'}, pre-tokenized "
          f"{'meets' if best['pretokenized'] >= need else 'MISSES'}")
  out = {"cpus": os.cpu_count(), "seq_len": args.seq_len, "batch": args.batch,
         "tokenizer": info.tokenizer_path, "results": results, "needs": NEEDS}
  print(json.dumps(out))
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, out, conditions={"batch": f"{args.batch} x {args.seq_len}",
                                             "read_threads": args.read_threads})


if __name__ == "__main__":
  main()
