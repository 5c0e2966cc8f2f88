"""Load test of `--mode=serve` with trained models: streaming clients against a server on loopback, per model,
and the same engine alone in-process.

  python benchmarks/serve_load.py [--json=benchmarks/results/serve_trained.json]
  python benchmarks/serve_load.py --models=vanilla,mor2 --requests=32 --max_tokens=16    # a quick look

Models (benchmarks/bench_models.py: trained once, cached): vanilla (14 layers) and MoR expert-choice
middle_cycle R = 2, 3, 4 of equal depth, `--train_steps` steps on the default Shakespeare corpus. Each is served
by `main.py --mode=serve` at the DEFAULT server flags; only --port=0 (a free loopback port), --ignore_eos (every
request generates exactly --max_tokens), --served_model_name and --max_queue (>= the clients) are given.
`--clients` streaming clients run a closed loop (each sends its next request when its last one ended) over
`--requests` completions of `--prompt_len`-token prompts cut from the validation split (token windows decoded to
text with the model's own tokenizer, so the routers see real text), greedy, `return_depths`. The whole workload
runs `--warmups` times untimed first (every program the timed run needs is compiled; compilations the server
logs during the timed run are counted and reported), then once timed.

Per model: tokens/s (generated tokens / wall seconds of the timed run), time to first token and inter-token
latency p50 / p99 (client side; ITL of a request = (last token - first token) / (tokens - 1)), mean recursions per
generated token (from return_depths), the share of the wall time the server spent in engine steps (/metrics),
the routing ideal L / (unique layers + mean recursions x block layers) (L = 14, 2 unique, 12/R block layers;
vanilla 1.0), tokens/s against vanilla's (`vs_vanilla`), and the engine alone: the server's own engine
(`build_service`, same slots and step budget) in this process on the same requests after the same warm-up
(`engine_tok_s`), and in the clients' closed loop without HTTP (`engine_closed_tok_s`: the same arrivals, so
server / closed-loop engine is the cost of the HTTP layer). Also the cores the server and the clients kept busy
(CPU seconds / wall). Targets (issue 34): MoR vs vanilla through the server >= 0.85 x the ideal for every R; vanilla
through the server >= 0.85 x vanilla engine-only. Not a test: timings depend on the machine and its load.
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

import bench_models as bm  # noqa: E402

TARGET_VS_IDEAL = 0.85
TARGET_SERVER_VS_ENGINE = 0.85


# ----------------------------------------------------------------------------------------------- server and clients
class Server:
  """`main.py --mode=serve` in a subprocess on a free loopback port; `startup_s`: process start to the ready line."""

  def __init__(self, workdir: str, flags: list[str], env: dict | None = None, timeout: float = 900):
    cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=serve", f"--workdir={workdir}", "--port=0",
           "--host=127.0.0.1"] + flags
    t0 = time.perf_counter()
    self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "JAX_LOG_COMPILES": "1", **(env or {})})
    self.lines, ready = [], threading.Event()

    def read():
      for line in self.proc.stderr:
        self.lines.append(line)
        if " serving " in line:
          ready.set()
      ready.set()
    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(timeout) or self.proc.poll() is not None:
      self.proc.kill()
      raise RuntimeError("server did not start:\n" + "".join(self.lines[-20:]))
    self.startup_s = time.perf_counter() - t0
    line = [l for l in self.lines if " serving " in l][0]
    self.url = re.search(r"at (http://\S+)", line).group(1)
    m = re.search(r"ready in ([\d.]+)s", line)
    self.ready_s = float(m.group(1)) if m else float("nan")     # the server's own count (after its imports)

  def cpu_s(self) -> float:
    """CPU seconds the server process used so far (all threads; Linux /proc; NaN elsewhere)."""
    try:
      with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
      return float("nan")

  def compilations(self, start: int, end: int | None = None) -> dict:
    """XLA compilations the server logged (JAX_LOG_COMPILES) in its stderr lines [start, end): count, seconds,
    program names."""
    done = [re.search(r"Finished XLA compilation of (\S+) in ([\d.e-]+) sec", l) for l in self.lines[start:end]]
    done = [m for m in done if m]
    return {"count": len(done), "seconds": sum(float(m.group(2)) for m in done),
            "programs": sorted({m.group(1) for m in done})}

  def wait_compiled(self, quiet_s: float = 2.0, limit_s: float = 300.0) -> float:
    """Waits until every XLA compilation the server started (its background compiler's included) has finished and
    none started for `quiet_s`; returns the seconds waited (a steady server is what the timed runs measure)."""
    t0 = time.perf_counter()
    quiet_since, seen = t0, len(self.lines)
    while time.perf_counter() - t0 < limit_s:
      time.sleep(0.25)
      lines = list(self.lines)
      started = sum("Compiling " in l for l in lines)
      finished = sum("Finished XLA compilation" in l for l in lines)
      if len(lines) != seen and any("Compiling " in l for l in lines[seen:]) or started > finished:
        quiet_since = time.perf_counter()
      seen = len(lines)
      if time.perf_counter() - quiet_since >= quiet_s:
        break
    return time.perf_counter() - t0

  def stop(self) -> int:
    self.proc.send_signal(signal.SIGTERM)
    return self.proc.wait(120)


async def one_request(client, url: str, body: dict) -> dict:
  """A streamed completion: arrival time of each token (a chunk's tokens share its time), of each chunk, and the
  tokens' depths."""
  t0 = time.perf_counter()
  times, chunks, depths = [], [], []
  async with client.stream("POST", url + "/v1/completions", json=body) as r:
    r.raise_for_status()
    async for line in r.aiter_lines():
      if not line.startswith("data: {"):
        continue
      c = json.loads(line[6:])["choices"][0]
      d = (c.get("mor") or {}).get("depths", [])
      if d:
        chunks.append(time.perf_counter() - t0)
        times += [chunks[-1]] * len(d)
        depths += d
  return {"times": times, "chunks": chunks, "depths": depths}


async def drive(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                time_limit: float = 1e9) -> tuple[list, float]:
  """`clients` closed-loop streaming clients over `prompts` (each sends its next when its last ended)."""
  import httpx  # pylint: disable=g-import-not-at-top
  todo = list(range(len(prompts)))[::-1]
  results = []
  t_end = time.perf_counter() + time_limit

  async def worker(client):
    while todo and time.perf_counter() < t_end:
      body = {"model": model, "prompt": prompts[todo.pop()], "max_tokens": max_tokens, "temperature": 0,
              "stream": True, "return_depths": True}
      results.append(await one_request(client, url, body))

  t0 = time.perf_counter()
  async with httpx.AsyncClient(timeout=3600, limits=httpx.Limits(max_connections=clients + 8)) as client:
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


def cpu_shares(srv: Server, before: tuple, wall: float) -> dict:
  """Cores the server and the clients (this process) kept busy during a run of `wall` seconds."""
  return {"server_cores": (srv.cpu_s() - before[0]) / wall, "client_cores": (time.process_time() - before[1]) / wall}


def pct(xs, q) -> float:
  return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarise(results: list, wall: float) -> dict:
  tokens = sum(len(r["times"]) for r in results)
  ttft = [r["times"][0] for r in results if r["times"]]
  itl = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results if len(r["times"]) > 1]
  gaps = [b - a for r in results for a, b in zip(r["chunks"], r["chunks"][1:])]
  per_chunk = [len(r["times"]) / len(r["chunks"]) for r in results if r["chunks"]]
  rec = [d for r in results for d in r["depths"]]
  return {"requests": len(results), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
          "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
          "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99),
          "chunk_gap_p50_ms": 1e3 * pct(gaps, 50), "chunk_gap_p99_ms": 1e3 * pct(gaps, 99),
          "tokens_per_chunk": float(np.mean(per_chunk)) if per_chunk else float("nan"),
          "mean_recursions": float(np.mean(rec)) if rec else float("nan")}


# ----------------------------------------------------------------------------------------------- per model
def serve_model(name: str, wd: str, prompts: list[str], args) -> dict:
  flags = ["--ignore_eos", f"--served_model_name={name}", f"--max_queue={max(256, 2 * args.clients)}"]
  srv = Server(wd, flags)
  try:
    start = len(srv.lines)
    for _ in range(args.warmups):
      asyncio.run(drive(srv.url, name, prompts, args.clients, args.max_tokens))
    warm = srv.compilations(start)
    waited = srv.wait_compiled()                                 # the background compiler done with the warm-up's
    before, first, cpu = engine_counters(srv.url), len(srv.lines), (srv.cpu_s(), time.process_time())
    s = summarise(*asyncio.run(drive(srv.url, name, prompts, args.clients, args.max_tokens)))
    s.update(engine_share(before, engine_counters(srv.url), s))
    s.update(cpu_shares(srv, cpu, s["wall_s"]))
    time.sleep(0.5)                                              # (the last stderr lines of the run)
    comp = srv.compilations(first)
  finally:
    code = srv.stop()
  if comp["count"]:
    print(f"  ({name}: the server compiled {comp['count']} programs in the timed run, {comp['seconds']:.1f}s: "
          f"{', '.join(comp['programs'][:6])})", flush=True)
  return {**s, "startup_s": srv.startup_s, "server_exit": code, "timed_compilations": comp["count"],
          "timed_compile_s": comp["seconds"], "startup_compilations": srv.compilations(0, start)["count"],
          "warmup_compilations": warm["count"], "waited_for_compiler_s": waited}


def closed_loop(eng, ids: list, clients: int, n_new: int) -> int:
  """The server's arrival pattern without HTTP: `clients` requests in flight, each finished one replaced by the
  next at the following step (a streaming session, as the server's loop runs it). Returns the tokens made."""
  from mor_jax.infer.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  todo, tokens = list(ids)[::-1], 0
  eng.start(sampling=SamplingParams(temperature=0.0), stop_at_eos=False, stream=True)
  try:
    for _ in range(min(clients, len(todo))):
      eng.submit(todo.pop(), n_new)
    while not eng.idle:
      for ev in eng.step():
        tokens += len(ev.tokens)
        if ev.result is not None and todo:
          eng.submit(todo.pop(), n_new)
  finally:
    eng.finish()
  return tokens


def engine_only(wd: str, prompts: list[str], args) -> dict:
  """The server's engine (build_service at the default flags) in this process on the same requests: all queued
  at once (`engine_*`), and in the clients' closed loop (`engine_closed_*`)."""
  from mor_jax.infer.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  from mor_jax.serve.server import build_service  # pylint: disable=g-import-not-at-top
  svc = build_service(None, wd, ignore_eos=True)
  eng = svc.engine
  bos = [svc.bos_id] if svc.bos_id is not None else []
  ids = [bos + svc.tokenizer.encode(p) for p in prompts]
  queued = lambda: eng.generate(ids, max_new_tokens=args.max_tokens, sampling=SamplingParams(temperature=0.0),
                                stop_at_eos=False)
  closed = lambda: closed_loop(eng, ids, args.clients, args.max_tokens)
  for _ in range(args.warmups):
    queued()
    closed()
  out = {"engine_slots": eng.slots}
  with bm.Compilations() as c:
    for key, fn in (("engine", queued), ("engine_closed", closed)):
      t, cpu = time.perf_counter(), time.process_time()
      res = fn()
      wall, cpu = time.perf_counter() - t, time.process_time() - cpu
      tokens = res if isinstance(res, int) else sum(len(o.tokens) for o in res)
      out.update({f"{key}_tok_s": tokens / wall, f"{key}_wall_s": wall, f"{key}_cores": cpu / wall,
                  f"{key}_ticks": eng.stats["ticks"], f"{key}_slot_utilisation": eng.stats["slot_utilisation"]})
  return {**out, "engine_timed_compilations": c.count, "engine_timed_compiled": sorted(set(c.programs))}


def model_prompts(wd: str, args, text: str) -> list[str]:
  from mor_jax.infer import load_tokenizer, restore  # pylint: disable=g-import-not-at-top
  r = restore(wd)
  tok = load_tokenizer(r.config, r.cfg, directory=r.directory)
  return bm.text_prompts(tok, args.requests, args.prompt_len, args.seed, text)


# ----------------------------------------------------------------------------------------------- main
def print_row(r: dict) -> None:
  print(f"| {r['model']} | {r['recursions']} | {r['mean_recursions']:.2f} | {r['ideal']:.2f}x | {r['tok_s']:,.0f} | "
        f"{r['vs_vanilla']:.2f}x | {r['vs_vanilla'] / r['ideal']:.0%} | {r['engine_tok_s']:,.0f} | "
        f"{r['engine_closed_tok_s']:,.0f} | {r['tok_s'] / r['engine_tok_s']:.0%} | {r['ttft_p50_ms']:.0f} | "
        f"{r['ttft_p99_ms']:.0f} | "
        f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} | {r['tokens_per_chunk']:.1f} | {r['engine_share']:.0%} | "
        f"{r['server_cores']:.2f} / {r['client_cores']:.2f} | {r['startup_s']:.0f} |", flush=True)


def targets(rows: list) -> dict:
  out = {}
  for r in rows:
    if r["model"] == "vanilla":
      v = r["tok_s"] / r["engine_tok_s"]
      out["vanilla_server_vs_engine"] = {"ratio": v, "pass": v >= TARGET_SERVER_VS_ENGINE}
    elif r["vs_vanilla"] == r["vs_vanilla"]:
      f = r["vs_vanilla"] / r["ideal"]
      out[r["model"]] = {"vs_vanilla": r["vs_vanilla"], "ideal": r["ideal"], "fraction_of_ideal": f,
                         "pass": f >= TARGET_VS_IDEAL}
  print(f"\ntargets (issue 34): MoR vs vanilla through the server >= {TARGET_VS_IDEAL} x ideal; vanilla server >= "
        f"{TARGET_SERVER_VS_ENGINE} x vanilla engine-only")
  for k, t in out.items():
    print(f"  {k}: " + ", ".join(f"{a} {b:.2f}" for a, b in t.items() if a != "pass") +
          f": {'pass' if t['pass'] else 'FAIL'}")
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  bm.add_flags(p)
  p.add_argument("--clients", type=int, default=16)
  p.add_argument("--requests", type=int, default=128)
  p.add_argument("--max_tokens", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=16, help="prompt tokens (a window of the validation text)")
  p.add_argument("--warmups", type=int, default=2, help=bm.WARMUPS_HELP)
  p.add_argument("--no_engine", action="store_true", help="skip the engine-only runs")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  from mor_jax.serve.server import FLAG_DEFAULTS  # pylint: disable=g-import-not-at-top
  names = bm.parse_models(args.models)
  workdirs = bm.ensure_models(names, args.train_steps, args.models_root)
  text = bm.validation_text()
  print(f"{args.clients} streaming clients (closed loop), {args.requests} requests of {args.prompt_len}-token "
        f"prompts x {args.max_tokens} new tokens (greedy, EOS ignored), default server flags "
        f"({FLAG_DEFAULTS['slots']} slots, step_tokens {FLAG_DEFAULTS['step_tokens']}), float32, trained models "
        f"({args.train_steps} steps)", flush=True)
  print("| model | R | mean rec/token | ideal | tok/s | vs vanilla | of ideal | engine tok/s | engine closed-loop "
        "tok/s | server / engine | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | tokens/chunk | time in engine "
        "| cores server / clients | start-up s |\n|" + " --- |" * 18, flush=True)
  rows, base = [], None
  for name in names:
    prompts = model_prompts(workdirs[name], args, text)
    s = serve_model(name, workdirs[name], prompts, args)
    e = ({"engine_tok_s": float("nan"), "engine_closed_tok_s": float("nan")} if args.no_engine
         else engine_only(workdirs[name], prompts, args))
    R = bm.recursions(name)
    base = s["tok_s"] if name == "vanilla" else base
    row = {"model": name, "recursions": R, "mean_recursions": s["mean_recursions"],
           "tok_s": s["tok_s"], "ideal": bm.ideal_speedup(R, s["mean_recursions"]),
           "vs_vanilla": s["tok_s"] / base if base else float("nan"), **s, **e}
    print_row(row)
    rows.append(row)
  tg = targets(rows)
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {"models": rows, "targets": tg, "args": vars(args)},
                 conditions={"weights": f"trained, {args.train_steps} steps", "slots": FLAG_DEFAULTS["slots"],
                             "step_tokens": FLAG_DEFAULTS["step_tokens"], "clients": args.clients,
                             "requests": args.requests, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
                             "dtype": "float32", "server_flags": "defaults (+ --port=0 --ignore_eos)"})
  return rows


if __name__ == "__main__":
  main()
