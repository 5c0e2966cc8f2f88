"""Prefill and decode throughput, recursions per token and KV-cache memory: vanilla vs recursive vs MoR.

  python benchmarks/decode.py [--batches=1,16] [--prompt_len=64] [--new_tokens=64] [--hidden=256]
      [--models=vanilla,rec2,rec3,mor2,mor3,mor3kv] [--workdir=W] [--json=out.json]

Models of equal depth (8 layer applications for a token that takes every
recursion, random weights, float32): vanilla (8 unique layers), recursive
middle_cycle R=2 / R=3 (no routing), MoR expert-choice R=2 / R=3 with causal
threshold routing (threshold 0.5; untrained routers pass about half of the
tokens at each recursion) and MoR R=3 with recursive KV sharing. `--workdir`
adds a trained checkpoint's model.

For each model and batch size: prefill tokens/s (the prompt, one call) and
decode tokens/s (greedy, one jitted while_loop over all new tokens, no EOS),
after a warm-up call (compilation excluded); mean recursions per token; and
KV-cache bytes per token relative to vanilla:
  used     entries written / tokens (caches sized to hold every token: exact causal routing),
  routed   memory allocated with --kv_capacity=routed (recursion r holds ceil(c_r * max_len) entries),
           the layout whose stage memory is (R+1)/(2R) of an unshared stack.
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MODELS = {
    "vanilla": dict(strategy="none", R=1),
    "rec2": dict(strategy="middle_cycle", R=2),
    "rec3": dict(strategy="middle_cycle", R=3),
    "mor2": dict(strategy="middle_cycle", R=2, mor=True),
    "mor3": dict(strategy="middle_cycle", R=3, mor=True),
    "mor3kv": dict(strategy="middle_cycle", R=3, mor=True, kv=True),
}
LABELS = {"vanilla": "vanilla L=8", "rec2": "recursive R=2", "rec3": "recursive R=3", "mor2": "MoR expert R=2",
          "mor3": "MoR expert R=3", "mor3kv": "MoR expert R=3 + KV share"}


def model_config(args, spec):
  from mor_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.defaults()
  c.model.update(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn, num_layers=8,
                 num_heads=args.heads, num_kv_heads=args.kv_heads, max_seq_len=args.prompt_len + args.new_tokens)
  c.data.seq_len = args.prompt_len
  c.recursion.update(strategy=spec["strategy"], num_recursions=spec["R"])
  if spec.get("mor"):
    c.mor.update(enable=True, type="expert")
    c.kv_sharing.enable = bool(spec.get("kv"))
  del c["train"]
  return config_lib.model_config(config_lib.validate(c))


def random_variables(cfg, seed=0):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import init_variables  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: init_variables(cfg, jax.random.PRNGKey(0)))

  def draw(path, a):
    if str(getattr(path[-1], "key", "")) == "scale":
      return jnp.ones(a.shape, a.dtype)
    return jnp.asarray(rng.normal(0, cfg.init_std, a.shape), a.dtype)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def _timed(fn, *args, repeats=2, **kw):
  import jax  # pylint: disable=g-import-not-at-top
  out = jax.block_until_ready(fn(*args, **kw))     # warm-up (compiles)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kw))
    best = min(best, time.perf_counter() - t)
  return out, best


def measure(args, cfg, variables, batch):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.generate import _programs  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.sampling import SamplingParams, sampling_arrays  # pylint: disable=g-import-not-at-top
  P, N = args.prompt_len, args.new_tokens
  S = P + N
  plan = cache_lib.make_plan(cfg, S, "full")
  prefill, decode = _programs(cfg, plan, "float32", batch, P)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (batch, P)), jnp.int32)
  lengths = jnp.full((batch,), P, jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  limits = jnp.full((batch,), N, jnp.int32)
  thr, sp, eos = jnp.float32(args.threshold), sampling_arrays(SamplingParams(temperature=0.0)), jnp.int32(-1)
  (state, prompt_rec), t_prefill = _timed(prefill, variables, tokens, lengths, keys, limits, thr, sp, eos, n_out=N)
  # decode donates its state: give each call a fresh copy of the prefilled state
  fresh = lambda: jax.tree.map(jnp.copy, state)
  jax.block_until_ready(decode(variables, fresh(), jnp.int32(N), thr, sp, eos))
  t_decode = float("inf")
  for _ in range(2):
    s = fresh()
    jax.block_until_ready(s)
    t = time.perf_counter()
    final = jax.block_until_ready(decode(variables, s, jnp.int32(N), thr, sp, eos))
    t_decode = min(t_decode, time.perf_counter() - t)
  decoded = N - 1                           # the first new token comes from the prefill
  assert int(final.count.min()) == N
  stats = cache_lib.cache_stats(final.cache, plan)
  fed = batch * (P + N - 1)                 # tokens whose keys/values entered the caches
  rec = np.concatenate([np.asarray(prompt_rec).ravel(), np.asarray(final.rec)[:, 1:].ravel()])
  routed = cache_lib.make_plan(cfg, S, "routed")
  routed_bytes = _plan_kv_bytes(cfg, routed, batch)
  unshared_stage = cfg.base_depth * cfg.recursions * S      # one cache per layer application
  return {"prefill_tok_s": batch * P / t_prefill, "decode_tok_s": batch * decoded / t_decode,
          "prefill_s": t_prefill, "decode_s": t_decode, "mean_recursions": float(rec.mean()),
          "kv_used_bytes_per_token": stats["kv_used_bytes"] / fed,
          "kv_full_alloc_bytes_per_token": stats["kv_allocated_bytes"] / (batch * S),
          "kv_routed_alloc_bytes_per_token": routed_bytes / (batch * S),
          "stage_routed_alloc_vs_unshared": sum(l * c for l, c in zip(routed.stage_layers, routed.stage_capacity))
                                            / unshared_stage}


def _plan_kv_bytes(cfg, plan, batch):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mor_jax.kernels.policy import for_decoding  # pylint: disable=g-import-not-at-top
  per_entry_layer = 2 * cfg.num_kv_heads * cfg.head_dim * np.dtype(for_decoding().compute_dtype).itemsize
  n = sum(l * c for l, c in zip(plan.stage_layers, plan.stage_capacity))
  if plan.has_middle:
    n += 2 * plan.max_len
  return int(n * per_entry_layer * batch)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batches", default="1,16")
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--ffn", type=int, default=704)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=2048)
  p.add_argument("--threshold", type=float, default=0.5)
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--workdir", default="", help="also benchmark the model of this training workdir")
  p.add_argument("--json", default="", help="write the results here")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top

  runs = []
  for name in args.models.split(","):
    cfg = model_config(args, MODELS[name])
    runs.append((LABELS[name], cfg, random_variables(cfg)))
  if args.workdir:
    from mor_jax.infer import restore  # pylint: disable=g-import-not-at-top
    r = restore(args.workdir)
    cfg = dataclasses.replace(r.cfg, max_seq_len=max(r.cfg.max_seq_len, args.prompt_len + args.new_tokens))
    runs.append((f"trained: {r.config.get('name', 'workdir')} step {r.step}", cfg, r.variables))

  print(f"device: {jax.devices()[0].device_kind} x1; hidden {args.hidden}, prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens (greedy), float32, threshold {args.threshold}")
  results, vanilla = [], {}
  print("| model | batch | prefill tok/s | decode tok/s | recursions/token | KV B/token used | used vs vanilla "
        "| routed alloc vs vanilla | routed stage alloc vs unshared |")
  print("|" + " --- |" * 9)
  for label, cfg, variables in runs:
    for batch in [int(b) for b in args.batches.split(",")]:
      m = measure(args, cfg, variables, batch)
      if label.startswith("vanilla"):
        vanilla[batch] = m
      base = vanilla.get(batch)
      rel_used = m["kv_used_bytes_per_token"] / base["kv_used_bytes_per_token"] if base else float("nan")
      rel_routed = (m["kv_routed_alloc_bytes_per_token"] / base["kv_routed_alloc_bytes_per_token"]
                    if base else float("nan"))
      rec = f"{m['mean_recursions']:.2f} / {cfg.recursions}"
      print(f"| {label} | {batch} | {m['prefill_tok_s']:,.0f} | {m['decode_tok_s']:,.0f} | {rec} | "
            f"{m['kv_used_bytes_per_token']:,.0f} | {rel_used:.3f} | {rel_routed:.3f} | "
            f"{m['stage_routed_alloc_vs_unshared']:.3f} |", flush=True)
      results.append({"model": label, "batch": batch, "recursions": cfg.recursions, **m,
                      "kv_used_vs_vanilla": rel_used, "kv_routed_alloc_vs_vanilla": rel_routed})
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {"args": vars(args), "rows": results},
                 conditions={"weights": "random" + (" and a trained workdir" if args.workdir else ""),
                             "batches": args.batches, "dtype": "float32", "threshold": args.threshold})
  return results


if __name__ == "__main__":
  main()
