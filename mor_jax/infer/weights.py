"""The decoders' view of a model's parameters, arranged once at load time for fast token-by-token steps.

`prepare_weights(cfg, variables, dtype="float32") -> DecodeWeights` turns the training layout (the shared block's
layers stacked on a leading axis, q/k/v and gate/up as separate kernels, a tied head read through the embedding)
into what a decode step reads best:

  - one entry per layer (a tuple), so a step indexes no stacked array: slicing a layer out of a stack inside a
    jitted loop copies its weights every step (XLA:CPU cannot hand a dynamic slice to a matmul);
  - q/k/v and gate/up concatenated into one kernel each (one matmul, no concatenation per step);
  - bfloat16 kernels of models of hidden size ROWS_OUT_FROM_HIDDEN and up stored [N, K], a row per output feature
    (the layout of torch's Linear; the head [V, D]: a tied head is the embedding table as it is), all others
    [K, N]: the layout XLA:CPU's products read faster for them (`rows_out`, `matmul`);
  - `dtype` float32 (exact) or bfloat16 (half the bytes read per token; norms, routers, softmax and logits stay
    float32).

The numbers are the model's own: the same products as `MoRLM.apply` (tests/test_infer_decode.py). Routers keep
their flax parameters and run through `routing.Router` (they are tiny).
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.options import DTYPES
from mor_jax.model import routing



@flax.struct.dataclass
class DecodeWeights:
  embed: jax.Array              # [V, D] the embedding table (float32: the lookup is exact)
  head: jax.Array               # [V, D] or [D, V] (`rows_out`)
  final_norm: jax.Array         # [D]
  block: tuple                  # per layer of the shared block: a layer dict (see _layer)
  first: dict | None            # the unique first / last layer (middle strategies)
  last: dict | None
  routers: dict                 # flax params of the routers ({'router_0': ..., } or {'router': ...}); {} if none
  router_bias: jax.Array | None  # token-choice loss-free balancing bias [R]

  @property
  def dtype(self):
    return self.head.dtype


ROWS_OUT_FROM_HIDDEN = 512


def rows_out(cfg: ModelConfig, dtype) -> bool:
  """Are the model's decode kernels in `dtype` stored [N, K] (a row per output) rather than [K, N]? bfloat16 from
  hidden size ROWS_OUT_FROM_HIDDEN on. Measured on a 2-core Xeon with AMX and AVX512-BF16, jax 0.10
  (benchmarks/decode_kernels.py, benchmarks/results/decode_kernels.json): with SmolLM2-135M's kernels (hidden 576)
  bfloat16 products are faster as [N, K] at every row count from 2 on; float32 ones are faster as [N, K] from 8
  rows on but slower at 2-4, and a whole 16-slot float32 engine tick gained only a few percent, so float32 keeps
  [K, N]; with the benchmark models' kernels (hidden 192) [K, N] is as fast or faster in both dtypes at most row
  counts."""
  return jnp.dtype(dtype) == jnp.bfloat16 and cfg.hidden_size >= ROWS_OUT_FROM_HIDDEN


def _layer(p: dict, dtype, nk: bool) -> dict:
  """One decoder layer's parameters as the decode step reads them (kernels [N, K] if nk, else [K, N])."""
  a, m = p["attn"], p["mlp"]

  def cat(*ks):
    w = jnp.concatenate([k["kernel"] for k in ks], axis=1)
    return (w.T if nk else w).astype(dtype)
  return {"in_norm": p["input_norm"]["scale"], "qkv": cat(a["q_proj"], a["k_proj"], a["v_proj"]),
          "o": cat(a["o_proj"]), "post_norm": p["post_attn_norm"]["scale"],
          "gate_up": cat(m["gate_proj"], m["up_proj"]), "down": cat(m["down_proj"])}


def _block_layers(block: dict) -> list[dict]:
  """The shared block's layers in order, from the scanned ({'layers': stacked}) or unrolled (layer_i) layout."""
  if "layers" in block:
    n = jax.tree.leaves(block["layers"])[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], block["layers"]) for i in range(n)]
  return [block[f"layer_{i}"] for i in range(len([k for k in block if k.startswith("layer_")]))]


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _prepare(cfg: ModelConfig, variables, dtype: str) -> DecodeWeights:
  p = variables["params"]
  dt = jnp.dtype(dtype)
  emb = p["embed"]["embedding"]
  nk = rows_out(cfg, dt)
  head = emb.T if cfg.tie_embeddings else p["lm_head"]["kernel"]      # [D, V]
  routers = {k: v for k, v in p.items() if k.startswith("router")}
  return DecodeWeights(embed=emb, head=(head.T if nk else head).astype(dt), final_norm=p["final_norm"]["scale"],
                       block=tuple(_layer(lp, dt, nk) for lp in _block_layers(p["block"])),
                       first=_layer(p["first"], dt, nk) if cfg.has_middle else None,
                       last=_layer(p["last"], dt, nk) if cfg.has_middle else None, routers=routers,
                       router_bias=routing.router_bias(cfg, variables))


def prepare_weights(cfg: ModelConfig, variables, dtype: str = "float32") -> DecodeWeights:
  """The decode layout of `variables` (see the module docstring); a DecodeWeights is returned as it is."""
  if isinstance(variables, DecodeWeights):
    return variables
  if dtype not in DTYPES:
    raise InferenceError(f"--dtype={dtype} is not supported for inference: give one of {', '.join(DTYPES)}.")
  return _prepare(cfg, variables, dtype)


def nbytes(w: DecodeWeights) -> int:
  return sum(int(a.nbytes) for a in jax.tree.leaves(w))


def embed(w: DecodeWeights, tokens):
  return jnp.take(w.embed, tokens, axis=0).astype(w.dtype)


def matmul(x, kernel, out_dtype=None, nk: bool = False):
  """x [..., K] times kernel ([N, K], a row per output, if nk, else [K, N]) -> [..., N], in the kernel's dtype,
  accumulated in float32, returned in `out_dtype` (default: the kernel's). Every decode product goes through here.

  A bfloat16 product with a float32 accumulator runs on XLA:CPU's fast kernels (AMX / AVX512-BF16; a bfloat16
  result type takes a much slower path), and a single bfloat16 row is padded to two (one row takes a slow path).
  (Measured on a 2-core Xeon with AMX and AVX512-BF16, jax 0.10.)"""
  out_dtype = kernel.dtype if out_dtype is None else out_dtype
  x = x.astype(kernel.dtype)
  product = lambda a: jax.lax.dot_general(a, kernel, (((a.ndim - 1,), (1 if nk else 0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
  lead = x.shape[:-1]
  if kernel.dtype == jnp.bfloat16 and math.prod(lead) == 1:
    out = product(jnp.pad(x.reshape(1, x.shape[-1]), ((0, 1), (0, 0))))[:1].reshape(lead + (-1,))
  else:
    out = product(x)
  return out.astype(out_dtype)


def logits(cfg: ModelConfig, w: DecodeWeights, h):
  """float32 logits of final-normed hidden states [..., D]."""
  return matmul(h, w.head, jnp.float32, rows_out(cfg, w.dtype))


def expert_router(cfg: ModelConfig, w: DecodeWeights, x, r):
  """Expert-choice router logit of recursion r, [...] float32."""
  return routing.Router(cfg, 1).apply({"params": w.routers[f"router_{r}"]}, x)[..., 0]


def token_router(cfg: ModelConfig, w: DecodeWeights, x):
  """Token-choice router logits [..., R] float32."""
  return routing.Router(cfg, cfg.recursions).apply({"params": w.routers["router"]}, x)
