"""What the decode step's kernel choices are worth on this machine: weight layout, bfloat16 cache storage, and
XLA:CPU's product library.

  python benchmarks/decode_kernels.py [--rows=1,2,4,8,16,32,128] [--json=benchmarks/results/decode_kernels.json]
  python benchmarks/decode_kernels.py --sections=libraries --json=benchmarks/results/decode_libraries.json

1. Products: the decode products of SmolLM2-135M's 30 layers (hidden 576: q/k/v 576->960, o 576->576, gate/up
   576->3072, down 1536->576) and of the benchmark models' 14 layers (bench_models.py, hidden 192: 192->320,
   192->192, 192->1024, 512->192), random weights, on `rows` rows, float32 and bfloat16 (float32 accumulation),
   with the kernels stored [K, N] (x @ W) or [N, K] (a row per output, contracted on both minor axes); which is
   faster decides `weights.rows_out`.
2. bfloat16 KV-cache writes: one new entry per row into 30 layers of key and value caches (16 sequences x 3 kv heads,
   129 entries of 64), then attention over them, with the cache stored as bfloat16 and written through a uint16 view
   (two whole-array bit conversions per write on XLA:CPU) or stored as uint16 and read through a bitcast (what
   `cache.storage_dtype` does).
3. Libraries: the products of 1 (float32 and bfloat16, [K, N]) compiled as XLA chooses (YNNPACK's fusions) and
   with `compilation.NO_YNNPACK` (Eigen's products), at `--library_rows`; `compilation.decode_options` picks by
   dtype and rows, and the table shows its choice next to the faster one.
Times are the best of `--repeats` calls of one jitted program, in milliseconds (libraries: the median of
`--repeats` calls of each, alternating).
"""

from __future__ import annotations

import argparse
import functools
import time

MODELS = {   # (K, N) per product of one layer, layers
    "smollm2-135m": (((576, 960), (576, 576), (576, 3072), (1536, 576)), 30),
    "bench-hidden192": (((192, 320), (192, 192), (192, 1024), (512, 192)), 14),
}
LAYERS = 30     # cache_writes


def best_ms(f, *args, repeats: int) -> float:
  f(*args)
  out = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    __import__("jax").block_until_ready(f(*args))
    out = min(out, time.perf_counter() - t)
  return out * 1e3


def _product(x, w, layout: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if layout == "KN":
    return jnp.dot(x, w, preferred_element_type=jnp.float32)
  return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _layers(x, ws, layout: str):
  """A model's layers of decode products (the attention and norms left out) in x's dtype."""
  import jax  # pylint: disable=g-import-not-at-top
  dt, D = x.dtype, x.shape[1]
  for wq, wo, wgu, wd in ws:
    q = _product(x, wq, layout)
    x = x + _product(q[:, :D].astype(dt), wo, layout).astype(dt)
    gu = _product(x, wgu, layout)
    F = gu.shape[1] // 2
    x = x + _product((jax.nn.silu(gu[:, :F]) * gu[:, F:]).astype(dt), wd, layout).astype(dt)
  return x


def products(rows: list[int], repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  fs = {lay: jax.jit(functools.partial(_layers, layout=lay)) for lay in ("KN", "NK")}
  out = []
  for model, (shapes, layers) in MODELS.items():
    for dtype in ("float32", "bfloat16"):
      dt = jnp.dtype(dtype)
      ws = {"KN": [[jnp.asarray(rng.normal(0, 0.02, s), dt) for s in shapes] for _ in range(layers)]}
      ws["NK"] = [[w.T.copy() for w in layer] for layer in ws["KN"]]
      for m in rows:
        x = jnp.ones((m, shapes[0][0]), dt)
        ms = {lay: min(best_ms(fs[lay], x, ws[lay], repeats=repeats) for _ in range(2)) for lay in fs}
        out.append({"model": model, "hidden": shapes[0][0], "layers": layers, "dtype": dtype, "rows": m,
                    "kn_ms": ms["KN"], "nk_ms": ms["NK"], "nk_vs_kn": ms["NK"] / ms["KN"]})
        print(f"| {model} | {dtype} | {m} | {ms['KN']:.2f} | {ms['NK']:.2f} | {ms['NK'] / ms['KN']:.2f} |", flush=True)
  return out


def libraries(rows: list[int], repeats: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import compilation  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  f = functools.partial(_layers, layout="KN")
  fs = {"ynnpack": jax.jit(f), "eigen": jax.jit(f, compiler_options=compilation.NO_YNNPACK)}
  out = []
  for model, (shapes, layers) in MODELS.items():
    for dtype in ("float32", "bfloat16"):
      dt = jnp.dtype(dtype)
      ws = [[jnp.asarray(rng.normal(0, 0.02, s), dt) for s in shapes] for _ in range(layers)]
      for m in rows:
        x = jnp.ones((m, shapes[0][0]), dt)
        ts = {k: [] for k in fs}
        for g in fs.values():
          jax.block_until_ready(g(x, ws))
        for _ in range(repeats):
          for k, g in fs.items():
            t = time.perf_counter()
            jax.block_until_ready(g(x, ws))
            ts[k].append((time.perf_counter() - t) * 1e3)
        ms = {k: float(np.median(v)) for k, v in ts.items()}
        chosen = "eigen" if compilation.decode_options(dtype, m) else "ynnpack"
        faster = min(ms, key=ms.get)
        out.append({"model": model, "dtype": dtype, "rows": m, "ynnpack_ms": ms["ynnpack"], "eigen_ms": ms["eigen"],
                    "eigen_vs_ynnpack": ms["eigen"] / ms["ynnpack"], "chosen": chosen, "faster": faster})
        print(f"| {model} | {dtype} | {m} | {ms['ynnpack']:.2f} | {ms['eigen']:.2f} | "
              f"{ms['eigen'] / ms['ynnpack']:.2f} | {chosen} | {faster} |", flush=True)
  return out


B, K, G, E, S = 16, 3, 3, 64, 129      # cache_writes: sequences, kv heads, queries per kv head, head dim, entries


def _cache_step(stored_u16: bool, ks, vs, q, new, slot):
  """One new entry per row into each layer's caches, then attention over them (30 layers)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from mor_jax.model.attention import attend_cache  # pylint: disable=g-import-not-at-top
  N = B * K
  bits = lambda a: jax.lax.bitcast_convert_type(a, jnp.uint16)
  unbits = lambda a: jax.lax.bitcast_convert_type(a, jnp.bfloat16)
  rows, at = jnp.arange(N), jnp.repeat(slot, K)
  mask = jnp.broadcast_to(jnp.arange(S)[None, None] <= slot[:, None, None], (B, 1, S))
  x, nks, nvs = q, [], []
  for k, v in zip(ks, vs):
    nn = new.reshape(N, E).astype(jnp.bfloat16)
    if stored_u16:
      k, v = cache_lib.write_entries(k, (rows, slice(None), at), nn), cache_lib.write_entries(v, (rows, at), nn)
      kr, vr = cache_lib.entries(k), cache_lib.entries(v)
    else:   # bfloat16 storage, written through a uint16 view
      k = unbits(bits(k).at[rows, :, at].set(bits(nn), mode="promise_in_bounds"))
      v = unbits(bits(v).at[rows, at].set(bits(nn), mode="promise_in_bounds"))
      kr, vr = k, v
    x = x + attend_cache(x, kr, vr, mask) * 0.01
    nks.append(k)
    nvs.append(v)
  return tuple(nks), tuple(nvs), x


def _time_cache(stored_u16: bool, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dt = jnp.uint16 if stored_u16 else jnp.bfloat16
  state = {"ks": tuple(jnp.zeros((B * K, E, S), dt) for _ in range(LAYERS)),
           "vs": tuple(jnp.zeros((B * K, S, E), dt) for _ in range(LAYERS))}
  q, new, slot = jnp.ones((B, 1, K * G, E), jnp.bfloat16), jnp.ones((B, K, E), jnp.float32), jnp.full((B,), 40)
  f = jax.jit(functools.partial(_cache_step, stored_u16), donate_argnums=(0, 1))

  def call():
    state["ks"], state["vs"], x = f(state["ks"], state["vs"], q, new, slot)
    return x
  return best_ms(call, repeats=repeats)


def cache_writes(repeats: int) -> dict:
  out = {"bfloat16_view": _time_cache(False, repeats), "uint16_storage": _time_cache(True, repeats)}
  out["uint16_vs_view"] = out["uint16_storage"] / out["bfloat16_view"]
  print(f"| cache writes + attention, 30 layers, {B} x {K} rows x {S} entries | bfloat16 view "
        f"{out['bfloat16_view']:.2f} ms | uint16 storage {out['uint16_storage']:.2f} ms | "
        f"{out['uint16_vs_view']:.2f} |", flush=True)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default="1,2,4,8,16,32,128")
  p.add_argument("--library_rows", default="1,2,4,8,16,32,128,256")
  p.add_argument("--sections", default="layouts,cache,libraries", help="which of layouts,cache,libraries to run")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  sections, out = args.sections.split(","), {}
  if "layouts" in sections:
    print("| products of | dtype | rows | [K, N] ms | [N, K] ms | [N, K] / [K, N] |\n|" + " --- |" * 6, flush=True)
    out["products"] = products([int(r) for r in args.rows.split(",")], args.repeats)
  if "cache" in sections:
    out["cache_writes"] = cache_writes(args.repeats)
  if "libraries" in sections:
    print("| products of | dtype | rows | YNNPACK ms | Eigen ms | Eigen / YNNPACK | decode_options | faster |\n|"
          + " --- |" * 8, flush=True)
    out["libraries"] = libraries([int(r) for r in args.library_rows.split(",")], args.repeats)
  if args.json:
    from mor_jax.tools.provenance import write_result  # pylint: disable=g-import-not-at-top
    write_result(args.json, {**out, "args": vars(args)},
                 conditions={"weights": "random", "timing": "ms per call of one jitted program (see the docstring)"})
  return out


if __name__ == "__main__":
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
