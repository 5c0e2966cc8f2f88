"""Load test of `--mode=serve`: N concurrent streaming clients against a server on loopback, per model.

  python benchmarks/serve_load.py [--models=vanilla,mor2,mor3,mor4] [--clients=32] [--requests=128]
                                  [--max_tokens=64] [--slots=32] [--json=out.json] [--engine]

Models: the depth-wise batching benchmark's (benchmarks/depthwise_batching.py): the default Shakespeare job's
shape with 14 layers, vanilla and MoR expert-choice middle_cycle R = 2, 3, 4 (equal depth: 1 + 12/R shared
layers x R + 1), random weights (a smoke-level workload: the routers are untrained, so the depths are whatever a
random router picks), written once as workdirs under --root with a word-level tokenizer. For each model a
server (`main.py --mode=serve --ignore_eos`, so every request generates exactly --max_tokens) is started on a
free loopback port and warmed up; then --clients clients each send streaming completions one after another
(prompts of --prompt_len random words, greedy) until --requests were sent or --time_limit seconds passed.
Printed per model: requests, generated tokens, throughput (tokens / wall seconds of the run), p50 / p99 time to
first token and inter-token latency (per request: (last token - first token) / (tokens - 1)), mean recursions
per token (from the `return_depths` extension), and the ratio to vanilla's throughput.

--engine also runs benchmarks/depthwise_batching.py (engine only, no HTTP) at the same fixed batch with
--engine_requests requests: vanilla batched decoding against the engine, cache updates included.
Not a test: timings depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def make_workdir(name: str, workdir: str, max_len: int) -> None:
  """A random-weight workdir of the depth-wise batching benchmark's model `name`, with a word-level tokenizer."""
  import jax  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  from configs import shakespeare_mor  # pylint: disable=g-import-not-at-top
  import depthwise_batching as dwb  # pylint: disable=g-import-not-at-top
  from mor_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.interop import importer  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import init_variables  # pylint: disable=g-import-not-at-top
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  c = shakespeare_mor.get_config()
  R = dwb.MODELS[name]
  c.name = f"serve-load-{name}"
  c.model.update(num_layers=dwb.LAYERS, max_seq_len=max(c.model.max_seq_len, max_len))
  if R == 1:
    c.recursion.update(strategy="none", num_recursions=1)
    c.mor.enable = False
  else:
    c.recursion.num_recursions = R
  c.data.eos_token = "<eos>"
  cfg = config_lib.model_config(config_lib.validate(c, num_devices=1))
  importer.write_checkpoint(c, init_variables(cfg, jax.random.PRNGKey(R))["params"], workdir)
  words = {f"w{i}": i for i in range(cfg.vocab_size - 1)}
  words["<eos>"] = cfg.vocab_size - 1
  tok = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(["<eos>"])
  os.makedirs(os.path.join(workdir, "tokenizer"), exist_ok=True)
  tok.save(os.path.join(workdir, "tokenizer", "tokenizer.json"))


class Server:
  """`main.py --mode=serve` in a subprocess on a free loopback port."""

  def __init__(self, workdir: str, name: str, args):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=serve", f"--workdir={workdir}", "--port=0",
           "--host=127.0.0.1", f"--slots={args.slots}", f"--served_model_name={name}", "--ignore_eos",
           f"--ticks_per_step={args.ticks_per_step}", f"--max_queue={max(256, args.clients)}",
           f"--prefill_rows={args.prefill_rows}",
           f"--threshold={args.threshold}"]
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    self.lines, ready = [], threading.Event()

    def read():
      for line in self.proc.stderr:
        self.lines.append(line)
        if " serving " in line:
          ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(900):
      self.proc.kill()
      raise RuntimeError("server did not start:\n" + "".join(self.lines[-20:]))
    self.url = re.search(r"at (http://\S+)", [l for l in self.lines if " serving " in l][0]).group(1)

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(120)


async def one_request(client, url: str, body: dict) -> dict:
  """A streamed completion: arrival time of each token (a chunk's tokens share its time) and their depths."""
  t0 = time.perf_counter()
  times, depths = [], []
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      c = json.loads(line[6:])["choices"][0]
      d = (c.get("mor") or {}).get("depths", [])
      times += [time.perf_counter() - t0] * len(d)
      depths += d
  return {"times": times, "depths": depths}


async def drive(url: str, name: str, args, n_requests: int, clients: int, time_limit: float) -> tuple[list, float]:
  import httpx  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(args.seed)
  vocab = 2047
  prompts = [" ".join(f"w{x}" for x in rng.integers(0, vocab, args.prompt_len)) for _ in range(n_requests)]
  todo = list(range(n_requests))
  results = []
  t_end = time.perf_counter() + time_limit

  async def worker(client):
    while todo and time.perf_counter() < t_end:
      i = todo.pop()
      body = {"model": name, "prompt": prompts[i], "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
              "return_depths": True}
      results.append(await one_request(client, url, body))

  t0 = time.perf_counter()
  async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 8)) as client:
    await asyncio.gather(*(worker(client) for _ in range(clients)))
  return results, time.perf_counter() - t0


def engine_counters(url: str) -> tuple[float, float]:
  """(engine steps, seconds in engine steps) so far, from the server's /metrics."""
  import httpx  # pylint: disable=g-import-not-at-top
  text = httpx.get(url + "/metrics", timeout=30).text
  get = lambda name: float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))
  return get("mor_engine_step_seconds_count"), get("mor_engine_step_seconds_sum")


def engine_share(before, after, s: dict) -> dict:
  """Engine steps of the measured run: their count, mean time, tokens per step and the share of the wall time
  spent inside them (the rest: HTTP, SSE encoding, event delivery, waiting for clients)."""
  n, t = after[0] - before[0], after[1] - before[1]
  return {"engine_steps": int(n), "engine_step_ms": 1e3 * t / max(1.0, n), "tokens_per_step": s["tokens"] / max(1, n),
          "engine_share": t / s["wall_s"]}


def summarise(results: list, wall: float) -> dict:
  tokens = sum(len(r["times"]) for r in results)
  ttft = [r["times"][0] for r in results if r["times"]]
  itl = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r["times"]) > 1]
  rec = [d for r in results for d in r["depths"]]
  pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")
  return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
          "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
          "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
          "mean_recursions": float(np.mean(rec)) if rec else float("nan")}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="vanilla,mor2,mor3,mor4")
  p.add_argument("--root", default=os.path.join(os.path.expanduser("~"), ".cache", "mor_jax", "serve_load"),
                 help="where the random-weight workdirs are written (once)")
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--requests", type=int, default=128)
  p.add_argument("--time_limit", type=float, default=300.0, help="seconds per model run at most")
  p.add_argument("--max_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--slots", type=int, default=32)
  p.add_argument("--ticks_per_step", type=int, default=4)
  p.add_argument("--prefill_rows", type=int, default=8)
  p.add_argument("--threshold", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--engine", action="store_true", help="also run depthwise_batching.py at batch --slots")
  p.add_argument("--engine_requests", type=int, default=256)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  out = {"args": vars(args), "serve": [], "engine": None}
  print(f"{args.clients} streaming clients, {args.requests} requests of {args.prompt_len}-token prompts x "
        f"{args.max_tokens} new tokens (greedy, EOS ignored), {args.slots} slots, random-weight models", flush=True)
  print("| model | R | requests | tokens | tok/s | vs vanilla | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| mean rec/token | engine step ms | tokens/step | time in engine |\n|" + " --- |" * 14, flush=True)
  base = None
  for name in args.models.split(","):
    wd = os.path.join(args.root, name)
    make_workdir(name, wd, args.prompt_len + args.max_tokens + 8)
    srv = Server(wd, name, args)
    try:
      asyncio.run(drive(srv.url, name, args, 2 * args.slots, args.slots, args.time_limit))       # compiles
      before = engine_counters(srv.url)
      s = summarise(*asyncio.run(drive(srv.url, name, args, args.requests, args.clients, args.time_limit)))
      s.update(engine_share(before, engine_counters(srv.url), s))
    finally:
      code = srv.stop()
    base = s["tok_s"] if name == "vanilla" else base
    rel = s["tok_s"] / base if base else float("nan")
    R = 1 if name == "vanilla" else int(name[-1])
    print(f"| {name} | {R} | {s['requests']} | {s['tokens']} | {s['tok_s']:,.0f} | {rel:.2f}x | {s['ttft_p50_ms']:.0f} "
          f"| {s['ttft_p99_ms']:.0f} | {s['itl_p50_ms']:.1f} | {s['itl_p99_ms']:.1f} | {s['mean_recursions']:.2f} "
          f"| {s['engine_step_ms']:.1f} | {s['tokens_per_step']:.1f} | {s['engine_share']:.0%} |",
          flush=True)
    out["serve"].append({"model": name, "vs_vanilla": rel, "server_exit": code, **s})
  if args.engine:
    import depthwise_batching as dwb  # pylint: disable=g-import-not-at-top
    print("\nengine only (benchmarks/depthwise_batching.py --random):", flush=True)
    out["engine"] = dwb.main(["--random", f"--models={args.models}", f"--batch={args.slots}", "--budget_batch=0",
                              f"--requests={args.engine_requests}", "--repeats=2", f"--threshold={args.threshold}"])
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, out, conditions={"weights": "random", "slots": args.slots, "clients": args.clients,
                                             "ticks_per_step": args.ticks_per_step, "dtype": "float32"})
  return out


if __name__ == "__main__":
  main()
