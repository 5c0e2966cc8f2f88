"""Training throughput: tokens/s, TFLOP/s per device and MFU of the real train step (the GPU performance path).

  python benchmarks/train_throughput.py                                  # smollm360_rec2 + MoR variants
  python benchmarks/train_throughput.py --seq 2048 --batch 8 --variants rec2 --json /tmp/t.json
  python benchmarks/train_throughput.py --tiny                           # CPU: tiny dims, same code path

A step is what `main.py` trains: forward, backward of cross entropy + router
losses, clipping and AdamW (`mor_jax.train.train_step`), jitted over the
device mesh (`parallel.data` x `parallel.fsdp`), compiled ahead of time (XLA's
memory analysis is printed), the state donated, on a batch of
`--batch` sequences per device already on the devices. Defaults are the GPU
path: bf16 compute with fp32 master weights and optimizer state,
`attention_impl=auto` (cuDNN flash attention through
`jax.nn.dot_product_attention` on GPU; on CPU the benchmark defaults to
`dot_product`, i.e. XLA's implementation, so the same code path runs there),
`--remat none`. On CPU it also defaults to the configs' `:tiny` dimensions.

Variants (config `configs/smollm360_rec2.py` plus a parameter string):
rec2 (the reference run's model), mor_expert (expert-choice MoR, R=2),
mor_token (token-choice), mor_expert_kv (expert-choice + KV sharing).

Reported per variant: step time, tokens/s (all devices and per device),
model TFLOP/s per device (`mor_jax.model.accounting`: matmul FLOPs, causal
attention halved, 3x forward, rematerialisation not counted), MFU = that /
the device's peak dense bf16 FLOP/s (`mor_jax.train.metrics.PEAK_FLOPS`; unknown device kind: no
MFU), peak device memory (the allocator's peak where the backend reports
it, else XLA's memory analysis of the step) and compile time. `--json` writes
the rows (after each variant, so a cut-off run keeps what it measured).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mor_jax import runtime  # noqa: E402

if __name__ == "__main__" and "--no_hugepages" not in sys.argv:
  runtime.use_huge_pages()   # CPU only matters; harmless elsewhere

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mor_jax import config as C  # noqa: E402
from mor_jax.kernels import policy as policy_lib  # noqa: E402
from mor_jax.model import accounting  # noqa: E402
from mor_jax.train import metrics as metrics_lib  # noqa: E402
from mor_jax.model.transformer import param_axes  # noqa: E402
from mor_jax.tools.provenance import write_result  # noqa: E402
from mor_jax.train import parallel  # noqa: E402
from mor_jax.train.optimizer import make_optimizer  # noqa: E402
from mor_jax.train.state import abstract_state, init_state  # noqa: E402
from mor_jax.train.step import make_train_step  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"rec2": "", "mor_expert": "mor=expert", "mor_token": "mor=token", "mor_expert_kv": "mor=expert,kv_sharing"}
def load_config(path: str, arg: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def make_config(args, variant: str, n_devices: int):
  arg = ",".join(filter(None, [VARIANTS[variant], "tiny" if args.tiny else ""]))
  c = load_config(args.config, arg)
  c.execution.update(dtype=args.dtype, attention_impl=args.attention, remat_policy=args.remat)
  if args.scan is not None:
    c.model.scan_layers = args.scan == "on"
  if args.scan_unroll is not None:
    c.execution.scan_unroll = args.scan_unroll
  c.model.max_seq_len = max(int(c.model.max_seq_len), args.seq)
  c.data.seq_len = args.seq
  c.parallel.update(mode="pjit", data=-1, fsdp=args.fsdp)
  c.train.update(per_device_batch_size=args.batch, total_batch_size=args.batch * n_devices, grad_accum_steps=-1,
                 num_steps=10_000, warmup_steps=10)
  return C.validate(c, n_devices)


def device_peak_bytes(devices) -> int | None:
  peaks = []
  for d in devices:
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


def run_variant(args, variant: str) -> dict:
  devices = jax.devices()
  config = make_config(args, variant, len(devices))
  cfg = C.model_config(config)
  policy = policy_lib.resolve(config, jax.default_backend())
  tx, schedule = make_optimizer(config)
  dp = parallel.DataParallel("pjit", devices, fsdp=args.fsdp, param_axes=param_axes(cfg) if args.fsdp != 1 else None)
  abstract = abstract_state(cfg, tx, 0)
  state = dp.create_state(lambda: init_state(cfg, tx, 0))
  step = dp.ahead_of_time(dp.compile_train_step(make_train_step(cfg, tx, schedule, policy=policy),
                                                  dp.state_shardings(abstract)))
  rows = args.batch * len(devices)
  rng = np.random.default_rng(0)
  host = {"tokens": rng.integers(0, cfg.vocab_size, (rows // jax.process_count(), args.seq + 1), dtype=np.int32)}
  batch = dp.shard_train_batch(host, 1)
  t = time.perf_counter()
  step.compile(state, batch, "topk")
  compile_s = time.perf_counter() - t
  mem = dict(dp.compiled_memory.get("train_step[topk]", {}))
  for _ in range(args.warmup):
    state, m = step(state, batch, "topk")
  jax.block_until_ready((state, m))
  t = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, batch, "topk")
  jax.block_until_ready((state, m))
  step_s = (time.perf_counter() - t) / args.steps
  profile = profile_steps(args.profile, lambda s: step(s, batch, "topk"), state, variant) if args.profile else None
  fpt = float(accounting.flops_per_token(cfg, args.seq)["train"])
  tokens_per_s = rows * args.seq / step_s
  tflops_dev = tokens_per_s * fpt / len(devices) / 1e12
  kind = devices[0].device_kind
  peak = metrics_lib.peak_flops(kind)
  peak_bytes = device_peak_bytes(jax.local_devices())
  return {
      "variant": variant, "config": f"{os.path.relpath(args.config, REPO)}:{VARIANTS[variant]}",
      "device_kind": kind, "devices": len(devices), "processes": jax.process_count(),
      "mesh": {"data": dp.data_size, "fsdp": dp.fsdp_size}, "dtype": args.dtype,
      "attention_impl": args.attention, "attention": _attention_label(cfg, policy), "remat": args.remat,
      "scan_layers": cfg.scan_layers, "scan_unroll": policy.scan_unroll, "per_device_batch": args.batch,
      "seq_len": args.seq, "step_s": step_s, "tokens_per_s": tokens_per_s,
      "tokens_per_s_per_device": tokens_per_s / len(devices), "train_flops_per_token": fpt,
      "tflops_per_device": tflops_dev, "peak_tflops_per_device": peak / 1e12 if peak else None,
      "mfu": tflops_dev * 1e12 / peak if peak else None,
      "peak_memory_bytes": peak_bytes if peak_bytes is not None else mem.get("peak_memory"),
      "peak_memory_source": "allocator" if peak_bytes is not None else "xla_memory_analysis",
      "compiled_memory": mem, "compile_s": compile_s, "loss": float(m["loss"]),
      "params": int(sum(x.size for x in jax.tree.leaves(abstract.params))),
      **({"profile": profile} if profile else {}),
  }


def _kernel_kind(name: str) -> str:
  n = name.lower()
  if any(k in n for k in ("gemm", "cutlass", "nvjet", "cublas", "matmul", "xmma", "sm90_", "triton_dot")):
    return "matmul"
  if any(k in n for k in ("flash", "cudnn", "fmha", "sdpa", "attention")):
    return "attention"
  if any(k in n for k in ("memcpy", "memset", "copy")):
    return "copy"
  if "reduce" in n or "scatter" in n or "sort" in n:
    return "reduce/scatter/sort"
  return "elementwise/fusion"


def profile_steps(out_dir: str, run_step, state, variant: str, steps: int = 3) -> dict:
  """Traces `steps` steps with jax.profiler and summarises device time per kernel (where the step's time goes)."""
  import glob
  import gzip
  import collections  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  d = os.path.join(out_dir, variant)
  with jax.profiler.trace(d, create_perfetto_trace=True):
    for _ in range(steps):
      state, m = run_step(state)
    jax.block_until_ready((state, m))
  files = glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    return {"error": "no trace written"}
  trace = json.load(gzip.open(files[0]))
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  pname = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  dev = {pid for pid, n in pname.items() if "gpu" in n.lower() or "device" in n.lower() and "cpu" not in n.lower()}
  per = collections.Counter()
  count = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in dev and "dur" in e:
      per[e["name"]] += e["dur"]
      count[e["name"]] += 1
  total = sum(per.values())
  if not total:
    return {"error": "no device events", "processes": sorted(set(pname.values()))[:20]}
  kinds = collections.Counter()
  for n, us in per.items():
    kinds[_kernel_kind(n)] += us
  summary = {"device_ms_per_step": total / 1e3 / steps,
             "by_kind_pct": {k: round(100 * v / total, 1) for k, v in kinds.most_common()},
             "top": [{"kernel": n[:140], "ms_per_step": round(us / 1e3 / steps, 3), "calls_per_step": count[n] // steps,
                      "pct": round(100 * us / total, 1)} for n, us in per.most_common(30)]}
  print(f"  profile ({variant}): device time {summary['device_ms_per_step']:.1f} ms/step; by kind "
        + ", ".join(f"{k} {v}%" for k, v in summary["by_kind_pct"].items()), flush=True)
  for r in summary["top"][:20]:
    print(f"    {r['ms_per_step']:8.3f} ms {r['calls_per_step']:4d}x {r['pct']:5.1f}%  {r['kernel'][:110]}", flush=True)
  return summary


def _attention_label(cfg, policy) -> str:
  from mor_jax.model import fused_attention  # pylint: disable=g-import-not-at-top
  if policy.attention != "cudnn":
    return policy.attention
  return "dot_product/" + fused_attention.implementation(policy.compute_dtype, cfg.head_dim, True, "gpu")


def gib(n):
  return f"{n / 2 ** 30:.2f}" if n else "n/a"


def print_table(rows):
  print(f"{'variant':14s} {'attention':20s} {'B/dev':>5s} {'seq':>5s} {'step ms':>8s} {'tok/s':>10s} "
        f"{'tok/s/dev':>10s} {'TFLOP/s/dev':>11s} {'MFU':>6s} {'peak GiB':>8s} {'compile s':>9s}")
  for r in rows:
    if "error" in r:
      print(f"{r['variant']:14s} error: {r['error']}")
      continue
    mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "   n/a"
    print(f"{r['variant']:14s} {r['attention']:20s} {r['per_device_batch']:5d} {r['seq_len']:5d} "
          f"{r['step_s'] * 1e3:8.1f} {r['tokens_per_s']:10,.0f} {r['tokens_per_s_per_device']:10,.0f} "
          f"{r['tflops_per_device']:11.3g} {mfu} {gib(r['peak_memory_bytes']):>8s} {r['compile_s']:9.1f}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", default=os.path.join(REPO, "configs", "smollm360_rec2.py"))
  p.add_argument("--variants", default="rec2,mor_expert,mor_token", help=f"comma-separated, of {list(VARIANTS)}")
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--batch", type=int, default=None, help="sequences per device (default 16, tiny: 4)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--attention", default=None, choices=("auto", "custom", "dot_product"),
                 help="execution.attention_impl (default: auto on accelerators; dot_product on CPU, to run the GPU "
                 "path)")
  p.add_argument("--remat", default="none", choices=C.REMAT_POLICIES)
  p.add_argument("--scan", default=None, choices=("on", "off"), help="nn.scan over the shared block (config default)")
  p.add_argument("--scan_unroll", type=int, default=None, help="execution.scan_unroll (config default 0: auto)")
  p.add_argument("--fsdp", type=int, default=1, help="mesh fsdp axis size (-1: all devices)")
  p.add_argument("--tiny", action="store_true", help="the configs' :tiny dims (CPU); default on CPU")
  p.add_argument("--full", action="store_true", help="full-size model even on CPU (slow)")
  p.add_argument("--json", default="", help="write the rows here (updated after every variant)")
  p.add_argument("--no_hugepages", action="store_true")
  p.add_argument("--profile", default="", help="also trace 3 steps into this folder and print device time per kernel")
  args = p.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and not args.full:
    args.tiny = True
  if args.attention is None:
    args.attention = "dot_product" if on_cpu else "auto"
  if args.batch is None:
    args.batch = 4 if args.tiny else 16
  if args.tiny and args.seq > 256:
    args.seq = 256
  d = jax.devices()[0]
  peak = metrics_lib.peak_flops(d.device_kind)
  print(f"jax {jax.__version__}, {jax.device_count()} x {d.device_kind} ({d.platform}), {jax.process_count()} "
        f"process(es); peak bf16 {peak / 1e12 if peak else 'n/a'} "
        f"TFLOP/s per device; {'tiny dims (CPU: same code path) ' if args.tiny else ''}dtype {args.dtype}, "
        f"attention {args.attention}, remat {args.remat}, batch {args.batch}/device x seq {args.seq}, "
        f"mean of {args.steps} steps after {args.warmup} warm-up steps", flush=True)
  rows = []
  for variant in [v for v in args.variants.split(",") if v]:
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    try:
      rows.append(run_variant(args, variant))
    except Exception as e:  # pylint: disable=broad-except   (e.g. out of memory: keep the other rows)
      traceback.print_exc()
      rows.append({"variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   "per_device_batch": args.batch, "seq_len": args.seq})
      if not on_cpu and os.environ.get("MOR_JAX_FUSED_ATTENTION") != "xla" and "RESOURCE_EXHAUSTED" not in str(e):
        print(f"  {variant}: retrying with XLA's attention instead of cuDNN's", flush=True)
        os.environ["MOR_JAX_FUSED_ATTENTION"] = "xla"
        try:
          rows.append(run_variant(args, variant))
        except Exception as e2:  # pylint: disable=broad-except
          traceback.print_exc()
          rows.append({"variant": variant, "error": f"{type(e2).__name__}: {str(e2).splitlines()[0][:300]}",
                       "per_device_batch": args.batch, "seq_len": args.seq})
        del os.environ["MOR_JAX_FUSED_ATTENTION"]
    r = rows[-1]
    if "error" not in r:
      mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
      print(f"  {variant}: {r['tokens_per_s']:,.0f} tok/s, {r['tflops_per_device']:.3g} TFLOP/s/device, MFU {mfu}, "
            f"peak memory {gib(r['peak_memory_bytes'])} GiB, loss {r['loss']:.3f}", flush=True)
    if args.json:
      write_result(args.json, {"args": vars(args), "rows": rows},
                   conditions={"batch": f"{args.batch} x {args.seq}", "weights": "random"})
  print_table(rows)
  return rows


if __name__ == "__main__":
  main()
