"""Key/value caches for decoding: one per unique layer and per (recursion, shared layer).

A `KVCache` holds the keys (RoPE already applied) and values of one stack of
layers that always run together (the unique first layer, the unique last
layer, or the shared block at one recursion), for every sequence of the batch:

    k       L arrays [B*K, E, S+1]  one per layer of the stack, row b*K + k: sequence b, kv head k;
                                    S = capacity (entries); keys transposed (model/attention.attend_cache)
    v       L arrays [B*K, S+1, E]
    index   [B, S+1] int32          original sequence position of each entry
    length  [B] int32               entries filled so far (entries 0..length-1 are valid)

One array per layer (not one stacked array) so that a decode step updates each in place and reads it without
slicing it out of a stack (a copy per layer and step). Entry S is a spare that is never valid: tokens that write
nothing write there, so every write is a plain in-place update (a write that may be dropped makes XLA keep, and
copy, the whole old cache).

Entries are stored compactly: the n-th token of a sequence that enters a
recursion goes to entry n of that recursion's cache, whatever its position,
and `index` keeps its position for the causal mask. So a recursion that only
a third of the tokens reach needs a third of the entries (`capacity`), and
its memory reflects routing. Shapes are static; a token that finds its cache
full is not admitted to that recursion (`reserve` says which were).

`CachePlan` says which caches a model needs and how large they are:
  - vanilla: one cache for its L layers;
  - cycle / middle_cycle: one per recursion (base_depth layers each); with
    recursive KV sharing only recursion 0's, which deeper recursions read;
  - sequence / middle_sequence: one per (layer, repeat) (1 layer each);
  - middle_*: plus one for the first and one for the last layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.model.layers import causal_mask


def storage_dtype(dtype):
  """What a KV cache of `dtype` values is stored as: bfloat16 as its 16-bit patterns (uint16), others as they are.
  XLA:CPU writes entries into a uint16 array in place, where it writes a bfloat16 array through a float32 copy of
  all of it (or, through a uint16 view, two whole-array bit conversions). Reads see the values through `entries`.
  Measured by benchmarks/decode_kernels.py (benchmarks/results/decode_kernels.json)."""
  return jnp.dtype(jnp.uint16) if jnp.dtype(dtype) == jnp.bfloat16 else jnp.dtype(dtype)


def entries(a):
  """The values of a stored cache array (bfloat16 for uint16 storage, bit for bit)."""
  return jax.lax.bitcast_convert_type(a, jnp.bfloat16) if a.dtype == jnp.uint16 else a


def write_entries(cache, idx, new):
  """`cache.at[idx].set(new)` on a stored cache array (`storage_dtype`), in place (indices promised in bounds); the
  new values are rounded to the cache's value dtype."""
  if cache.dtype == jnp.uint16:
    new = jax.lax.bitcast_convert_type(new.astype(jnp.bfloat16), jnp.uint16)
  return cache.at[idx].set(new.astype(cache.dtype), mode="promise_in_bounds")


@flax.struct.dataclass
class KVCache:
  k: tuple           # per layer [B * K, E, S + 1]
  v: tuple           # per layer [B * K, S + 1, E]
  index: jax.Array   # [B, S] int32
  length: jax.Array  # [B] int32

  @property
  def capacity(self) -> int:
    return self.index.shape[1] - 1

  @property
  def num_layers(self) -> int:
    return len(self.k)

  @property
  def valid(self):
    """[B, S] bool: entries that hold a token."""
    return jnp.arange(self.capacity + 1, dtype=jnp.int32)[None, :] < self.length[:, None]

  def reserve(self, enter_BT):
    """Entries for the tokens in `enter_BT`, in order: (slot_BT, admitted_BT).

    slot = length + (rank of the token among the entering ones); tokens that
    do not enter, or for which no entry is left, get slot S (the spare entry:
    never valid) and admitted False.
    """
    S = self.capacity
    slot = self.length[:, None] + jnp.cumsum(enter_BT.astype(jnp.int32), axis=1) - 1
    admitted = enter_BT & (slot < S)
    return jnp.where(admitted, slot, S), admitted

  def record(self, slot_BT, pos_BT, admitted_BT) -> "KVCache":
    """Stores the positions of the admitted tokens and advances `length` (k, v are written by the layers)."""
    b = jnp.arange(slot_BT.shape[0])[:, None]
    index = self.index.at[b, slot_BT].set(pos_BT.astype(jnp.int32), mode="clip")
    return self.replace(index=index, length=self.length + admitted_BT.sum(axis=1, dtype=jnp.int32))

  def mask(self, q_pos_BT):
    """[B, T, S+1]: entry s is visible to a query at position q (valid and not in its future)."""
    return causal_mask(q_pos_BT.astype(jnp.int32), self.index, k_valid_BS=self.valid)

  @property
  def kv_nbytes(self) -> int:
    return sum(int(a.nbytes) for a in self.k + self.v)

  @property
  def nbytes(self) -> int:
    return self.kv_nbytes + int(self.index.nbytes + self.length.nbytes)

  @property
  def bytes_per_entry(self) -> int:
    """Key + value bytes of one token in this cache (all its layers)."""
    N, E, _ = self.k[0].shape
    K = N // self.length.shape[0]
    return int(2 * self.num_layers * K * E * self.k[0].dtype.itemsize)


@dataclasses.dataclass(frozen=True)
class StageCall:
  """One application of (part of) the shared block in the recursion stage.

  layers: [start, stop) of the block's stacked layers; recursion: the
  recursion it belongs to (routing decides per recursion); cache: which
  stage cache it writes and reads, or None when it reads `reads` (KV sharing).
  """
  layers: tuple[int, int]
  recursion: int
  cache: int | None
  reads: int


@dataclasses.dataclass(frozen=True)
class CachePlan:
  """The caches of one model for sequences of up to `max_len` tokens."""
  max_len: int
  calls: tuple[StageCall, ...]
  stage_layers: tuple[int, ...]      # layers of each stage cache
  stage_capacity: tuple[int, ...]    # entries of each stage cache
  has_middle: bool

  @property
  def num_stage_caches(self) -> int:
    return len(self.stage_layers)


def _capacity_fractions(cfg: ModelConfig, capacity) -> tuple[float, ...]:
  """Per-recursion fraction of `max_len` that each recursion's cache holds."""
  R = cfg.recursions
  if capacity is None or capacity == "full":
    return (1.0,) * R
  if capacity == "routed":
    if cfg.mor_enable and cfg.mor_type == "expert":
      return tuple(cfg.selected_fractions)
    if cfg.mor_enable and cfg.mor_type == "token":
      return (1.0,) + (min(1.0, cfg.token_buffer_fraction),) * (R - 1)
    return (1.0,) * R
  if isinstance(capacity, str):
    raise ValueError(f"kv capacity must be 'full', 'routed' or {R} fractions, got {capacity!r}")
  fr = tuple(float(x) for x in capacity)
  if len(fr) != R or any(not 0 < x <= 1 for x in fr):
    raise ValueError(f"kv capacity needs {R} fractions in (0, 1] (one per recursion), got {fr}")
  return fr


def make_plan(cfg: ModelConfig, max_len: int, capacity: str | Sequence[float] | None = "full") -> CachePlan:
  """Which caches `cfg` needs for `max_len` positions.

  capacity: 'full' (every recursion can hold every token: decoding is exact),
  'routed' (recursion r holds ceil(c_r * max_len) entries, c_r the model's
  capacity factors; tokens beyond that are not admitted to r), or one
  fraction per recursion.
  """
  R, depth = cfg.recursions, cfg.base_depth
  fr = _capacity_fractions(cfg, capacity)
  cap = lambda r: max(1, min(max_len, int(math.ceil(fr[r] * max_len - 1e-9))))
  calls, layers, caps = [], [], []
  if cfg.strategy in ("sequence", "middle_sequence"):
    for l in range(depth):
      for r in range(R):
        calls.append(StageCall((l, l + 1), r, len(layers), len(layers)))
        layers.append(1)
        caps.append(cap(r))
  else:
    for r in range(R):
      if cfg.kv_sharing and r > 0:
        calls.append(StageCall((0, depth), r, None, 0))
        continue
      calls.append(StageCall((0, depth), r, len(layers), len(layers)))
      layers.append(depth)
      caps.append(max_len if cfg.kv_sharing else cap(r))  # a shared cache holds every token
  return CachePlan(max_len=int(max_len), calls=tuple(calls), stage_layers=tuple(layers), stage_capacity=tuple(caps),
                   has_middle=cfg.has_middle)


def empty_cache(cfg: ModelConfig, num_layers: int, batch: int, capacity: int, dtype=jnp.float32) -> KVCache:
  N, S, E = batch * cfg.num_kv_heads, capacity + 1, cfg.head_dim   # + the spare entry
  zeros = lambda shape: tuple(jnp.zeros(shape, storage_dtype(dtype)) for _ in range(num_layers))
  return KVCache(k=zeros((N, E, S)), v=zeros((N, S, E)), index=jnp.full((batch, S), np.iinfo(np.int32).max, jnp.int32),
                 length=jnp.zeros((batch,), jnp.int32))


def init_cache(cfg: ModelConfig, plan: CachePlan, batch: int, dtype=jnp.float32) -> dict:
  """Empty caches: {'first': KVCache | None, 'stage': (KVCache, ...), 'last': KVCache | None}; `dtype` of the keys
  and values: the decode weights' (weights.DecodeWeights.dtype), stored as `storage_dtype(dtype)`."""
  cache = {"stage": tuple(empty_cache(cfg, n, batch, c, dtype) for n, c in zip(plan.stage_layers,
                                                                                 plan.stage_capacity))}
  if plan.has_middle:
    cache["first"] = empty_cache(cfg, 1, batch, plan.max_len, dtype)
    cache["last"] = empty_cache(cfg, 1, batch, plan.max_len, dtype)
  return cache


def all_caches(cache: dict) -> list[tuple[str, KVCache]]:
  out = []
  if "first" in cache:
    out.append(("first", cache["first"]))
  out += [(f"stage{i}", c) for i, c in enumerate(cache["stage"])]
  if "last" in cache:
    out.append(("last", cache["last"]))
  return out


def cache_stats(cache: dict, plan: CachePlan) -> dict:
  """Allocated and used KV bytes, and entries per recursion (per sequence), as numpy/python values."""
  allocated = sum(c.nbytes for _, c in all_caches(cache))
  kv_alloc = sum(c.kv_nbytes for _, c in all_caches(cache))
  used = sum(int(np.asarray(c.length).sum()) * c.bytes_per_entry for _, c in all_caches(cache))
  R = max(call.recursion for call in plan.calls) + 1
  per_rec = np.zeros((R,) + cache["stage"][0].length.shape, np.int64)
  for call in plan.calls:
    if call.cache is not None and call.layers[0] == 0:   # count each recursion once (first layer's cache)
      per_rec[call.recursion] = np.asarray(cache["stage"][call.cache].length)
  return {"allocated_bytes": int(allocated), "kv_allocated_bytes": int(kv_alloc), "kv_used_bytes": int(used),
          "entries_per_recursion": per_rec}
