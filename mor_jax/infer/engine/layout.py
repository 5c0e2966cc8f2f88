"""The engine's static shapes (EngineLayout: slots, cache regions, capacity bucket, sub-batches) and its state pytree.

A slot holds one token in flight, in one of the phases EMPTY, ENTER, BLOCK, EXIT, DONE (see the package
docstring).

KV caches (recursion-wise, as in `mor_jax.infer.cache`): one array per layer, of N = slots x kv heads rows (row
b*K + k: slot b, kv head k). The shared block's caches for all recursions live side by side along the entry axis,
one region per recursion (with recursive KV sharing one region, recursion 0's), then one spare entry that is never
valid: rows that write nothing write there, so that every write is an in-place update. The unique first and last
layers have one cache each (`cache.KVCache`, which keeps a spare entry too).

The caches grow with the work: `capacity` is the number of positions allocated now, a bucket (a power of two) that
covers the longest live sequence, at most `max_len` (the engine's context). A region holds min(its limit,
capacity) entries, its limit being the cache plan's capacity at `max_len` ('full': every position; 'routed' /
fractions: fewer), so growing never changes which tokens a region admits. `resize` moves a state to another
bucket.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.prompts import bucket_length

EMPTY, ENTER, BLOCK, EXIT, DONE = range(5)
PHASES = ("empty", "enter", "block", "exit", "done")
MIN_CAPACITY = 64
BLOCK_ATTENTION = ("auto", "masked", "gather")
# 'auto' gathers a row's region when the other regions hold at least twice its entries (3 or more equal regions:
# masked attention would do 3x the work of the gathered one) and it holds at least GATHER_SPAN entries (below, the
# copies cost more than the attention they save). Measured on trained MoR-2/3/4 models of hidden 192 at 16 slots on
# a 2-core CPU: benchmarks/results/block_attention.json (benchmarks/block_attention.py).
GATHER_SPAN = 256
BIG = np.iinfo(np.int32).max


def bucket(n: int, max_len: int) -> int:
  """The capacity bucket for `n` positions: the next power of two >= n (at least MIN_CAPACITY), at most max_len."""
  return bucket_length(int(n), int(max_len), MIN_CAPACITY)


@dataclasses.dataclass(frozen=True)
class EngineLayout:
  """Static shapes of one engine program (hashable: one compilation per layout)."""
  slots: int
  max_len: int                  # positions a sequence may ever occupy (prompt + generated - 1 fed tokens)
  capacity: int                 # positions allocated now (a bucket <= max_len)
  plan: cache_lib.CachePlan     # the plain path's cache plan at max_len (regions and their limits)
  region_of: tuple[int, ...]    # per recursion: the stage region its pass reads
  writes: tuple[bool, ...]      # per recursion: does its pass write its region (False: KV sharing, r >= 1)
  limits: tuple[int, ...]       # per region: the most entries it may ever hold (the plan's capacity)
  window: int                   # tokens one slot may produce per step (the step's read-back buffer)
  entry_rows: int
  exit_rows: int
  block_attention: str = "auto"  # BLOCK_ATTENTION (make_layout); `gather` resolves it at this capacity

  @property
  def caps(self) -> tuple[int, ...]:
    """Entries each region holds at this capacity."""
    return tuple(min(lim, self.capacity) for lim in self.limits)

  @property
  def offsets(self) -> tuple[int, ...]:
    """First entry of each region: regions in ascending size, so that a window of the largest region's size that
    starts at any region stays inside the cache."""
    caps = self.caps
    out, at = [0] * len(caps), 0
    for g in sorted(range(len(caps)), key=lambda g: (caps[g], g)):
      out[g], at = at, at + caps[g]
    return tuple(out)

  @property
  def span(self) -> int:
    """Entries of the largest region (the window a row gathers when `gather`)."""
    return max(self.caps)

  @property
  def width(self) -> int:
    """Entries per row of the shared block's cache: the regions side by side, then the spare entry."""
    return sum(self.caps) + 1

  @property
  def gather(self) -> bool:
    """Does the block's attention run on each row's own region, gathered (else on all regions, masked)?"""
    if self.block_attention != "auto":
      return self.block_attention == "gather"
    return self.width - 1 - self.span >= 2 * self.span and self.span >= GATHER_SPAN

  def at_capacity(self, capacity: int) -> "EngineLayout":
    return dataclasses.replace(self, capacity=int(capacity))

  def rows_free(self) -> "EngineLayout":
    """This layout without its sub-batch sizes: the key of the programs that do not depend on them."""
    return dataclasses.replace(self, entry_rows=0, exit_rows=0)


def make_layout(cfg: ModelConfig, slots: int, max_len: int, kv_capacity="full", entry_rows: int | None = None,
                exit_rows: int | None = None, window: int = 16, capacity: int | None = None,
                block_attention: str = "auto") -> EngineLayout:
  """Shapes of an engine: its cache plan at `max_len` (the plain path's, `kv_capacity` 'full' / 'routed' /
  fractions) and the recursion regions of the shared block's cache; `capacity` (default: the smallest bucket).
  block_attention: 'masked' (each row attends over all regions side by side, masked to its own: no copies, R x the
  attention work), 'gather' (each row's region gathered first: one copy per layer, 1 x the work), 'auto' (gathered
  where the other regions hold at least twice a row's own and it holds at least GATHER_SPAN entries, else masked:
  decided per capacity, so an engine switches as its caches grow)."""
  if block_attention not in BLOCK_ATTENTION:
    raise InferenceError(f"block_attention={block_attention!r} is not one of {', '.join(BLOCK_ATTENTION)}.")
  plan = cache_lib.make_plan(cfg, max_len, kv_capacity)
  R = cfg.recursions
  one_block_per_recursion = len(plan.calls) == R and all(
      c.recursion == r and c.layers == (0, cfg.base_depth) for r, c in enumerate(plan.calls))
  if cfg.strategy in ("sequence", "middle_sequence") or not one_block_per_recursion:
    raise InferenceError("the depth-wise batching engine needs one shared block per recursion (strategies 'none', "
                         f"'cycle', 'middle_cycle'); strategy {cfg.strategy!r} runs different layers at each depth. "
                         "Use the plain Generator for it.")
  entry_rows = slots if not entry_rows else max(1, min(slots, int(entry_rows)))
  exit_rows = slots if not exit_rows else max(1, min(slots, int(exit_rows)))
  return EngineLayout(slots=int(slots), max_len=int(max_len), capacity=bucket(capacity or 1, max_len), plan=plan,
                      region_of=tuple(c.reads if c.cache is None else c.cache for c in plan.calls),
                      writes=tuple(c.cache is not None for c in plan.calls), limits=tuple(plan.stage_capacity),
                      window=max(1, int(window)), entry_rows=entry_rows, exit_rows=exit_rows,
                      block_attention=block_attention)


# ------------------------------------------------------------------ state
@flax.struct.dataclass
class EngineCache:
  stage_k: tuple           # per block layer [B * K, E, width] (keys transposed, as cache.KVCache's): recursion
                           # regions side by side, then a spare
  stage_v: tuple
  stage_index: jax.Array   # [B, width] int32 position of each entry
  stage_len: jax.Array     # [G, B] int32 entries filled per region
  first: cache_lib.KVCache | None   # one layer, capacity + 1 entries
  last: cache_lib.KVCache | None

  @property
  def nbytes(self) -> int:
    return sum(int(a.nbytes) for a in jax.tree.leaves(self))


@flax.struct.dataclass
class EngineState:
  cache: EngineCache
  phase: jax.Array     # [B] int32 (EMPTY, ENTER, BLOCK, EXIT, DONE)
  h: jax.Array         # [B, D] the token's hidden state (token-choice: its running block state)
  h0: jax.Array        # [B, D] token-choice: the stage input (the exit adds the gated state to it)
  depth: jax.Array     # [B] int32 recursion of the pending block pass
  apply: jax.Array     # [B] bool the pending pass updates the state (KV sharing: a write-only pass may not)
  target: jax.Array    # [B] int32 token-choice: the token's last recursion
  gate: jax.Array      # [B] float32 gate of the pending pass (expert), of the exit (token-choice)
  token: jax.Array     # [B] int32 the token in flight
  pos: jax.Array       # [B] int32 its position
  rec: jax.Array       # [B] int32 recursions it has run
  req: jax.Array       # [B] int32 request id (-1: none)
  count: jax.Array     # [B] int32 tokens generated for the request
  base: jax.Array      # [B] int32 `count` when the running step began
  limit: jax.Array     # [B] int32 tokens it may generate
  finish: jax.Array    # [B] int32 FINISH_REASONS index
  keys: jax.Array      # [B, 2] uint32 sampling key of the request
  temperature: jax.Array   # [B] float32 sampling parameters of the request (0: greedy)
  top_k: jax.Array         # [B] int32 (0: off)
  top_p: jax.Array         # [B] float32 (1: off)
  recent: jax.Array    # [B, window] int32 tokens generated in the running step (column count - base)
  recent_rec: jax.Array    # [B, window] int32 recursions behind each
  stats: dict          # int32 counters (see STATS)


STATS = ("ticks", "live_rows", "block_rows", "applied_rows", "entry_rows", "exit_rows", "entry_waits", "exit_waits",
         "mixed_depth_ticks", "mixed_exit_ticks", "tokens")


def live(phase):
  return (phase == ENTER) | (phase == BLOCK) | (phase == EXIT)


def _zeros_kv(cfg: ModelConfig, rows: int, entries: int, layers: int, dtype, keys: bool) -> tuple:
  shape = (rows, cfg.head_dim, entries) if keys else (rows, entries, cfg.head_dim)
  return tuple(jnp.zeros(shape, cache_lib.storage_dtype(dtype)) for _ in range(layers))


def init_cache(cfg: ModelConfig, lay: EngineLayout, dtype) -> EngineCache:
  return EngineCache(stage_k=_zeros_kv(cfg, lay.slots * cfg.num_kv_heads, lay.width, cfg.base_depth, dtype, True),
                     stage_v=_zeros_kv(cfg, lay.slots * cfg.num_kv_heads, lay.width, cfg.base_depth, dtype, False),
                     stage_index=jnp.full((lay.slots, lay.width), BIG, jnp.int32),
                     stage_len=jnp.zeros((len(lay.limits), lay.slots), jnp.int32),
                     first=cache_lib.empty_cache(cfg, 1, lay.slots, lay.capacity, dtype) if cfg.has_middle else None,
                     last=cache_lib.empty_cache(cfg, 1, lay.slots, lay.capacity, dtype) if cfg.has_middle else None)


def init_state(cfg: ModelConfig, lay: EngineLayout, dtype=jnp.float32) -> EngineState:
  """Empty caches and free slots. (Run it under jax.jit: the programs donate the state, and jit gives every leaf
  its own buffer.)"""
  B, D = lay.slots, cfg.hidden_size
  zi = jnp.zeros((B,), jnp.int32)
  return EngineState(cache=init_cache(cfg, lay, dtype), phase=zi, h=jnp.zeros((B, D), dtype),
                     h0=jnp.zeros((B, D), dtype), depth=zi, apply=jnp.zeros((B,), bool), target=zi,
                     gate=jnp.zeros((B,), jnp.float32), token=zi, pos=zi, rec=zi, req=jnp.full((B,), -1, jnp.int32),
                     count=zi, base=zi, limit=zi, finish=zi, keys=jnp.zeros((B, 2), jnp.uint32),
                     temperature=jnp.zeros((B,), jnp.float32), top_k=zi, top_p=jnp.ones((B,), jnp.float32),
                     recent=jnp.zeros((B, lay.window), jnp.int32), recent_rec=jnp.zeros((B, lay.window), jnp.int32),
                     stats={k: jnp.int32(0) for k in STATS})


def _pad_to(a, axis: int, size: int, fill):
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, size - a.shape[axis])
  return jnp.pad(a, pad, constant_values=fill)


def _move_entries(a, old: EngineLayout, new: EngineLayout, fill, axis: int = 1):
  """An array of stage entries (along `axis`) in the new layout's regions (entries beyond a region's new size are
  dropped: `resize` only shrinks below what no row uses); then the spare entry."""
  parts = [_pad_to(jax.lax.slice_in_dim(a, o, o + min(c_old, c_new), axis=axis), axis, c_new, fill)
           for o, c_old, c_new in zip(old.offsets, old.caps, new.caps)]
  order = sorted(range(len(parts)), key=lambda g: new.offsets[g])
  out = jnp.concatenate([parts[g] for g in order], axis=axis)
  return _pad_to(out, axis, out.shape[axis] + 1, fill)


def _move_kv(kv: cache_lib.KVCache, capacity: int) -> cache_lib.KVCache:
  def fit(a, fill, axis=1):
    a = jax.lax.slice_in_dim(a, 0, min(a.shape[axis] - 1, capacity), axis=axis)
    return _pad_to(a, axis, capacity + 1, fill)
  return kv.replace(k=tuple(fit(a, 0, 2) for a in kv.k), v=tuple(fit(a, 0) for a in kv.v), index=fit(kv.index, BIG))


def resize(old: EngineLayout, new: EngineLayout, st: EngineState) -> EngineState:
  """The state moved to another capacity bucket (entries kept in place; run under jax.jit with the state donated)."""
  c = st.cache
  move = lambda a, fill=0, axis=1: _move_entries(a, old, new, fill, axis)
  cache = c.replace(stage_k=tuple(move(a, 0, 2) for a in c.stage_k), stage_v=tuple(move(a) for a in c.stage_v),
                    stage_index=move(c.stage_index, BIG),
                    first=None if c.first is None else _move_kv(c.first, new.capacity),
                    last=None if c.last is None else _move_kv(c.last, new.capacity))
  return st.replace(cache=cache)


def _slots_of(st: EngineState, K: int, fn):
  """`fn(array, axis, size)` applied to every per-slot array of the state (the slot axis and its length per slot:
  1 for per-slot arrays, K for the caches' rows); the statistics stay as they are."""
  c = st.cache
  per_row = lambda a: fn(a, 0, K)
  per_slot = lambda a: fn(a, 0, 1)

  def kv(x):
    return None if x is None else x.replace(k=tuple(map(per_row, x.k)), v=tuple(map(per_row, x.v)),
                                            index=per_slot(x.index), length=per_slot(x.length))
  cache = c.replace(stage_k=tuple(map(per_row, c.stage_k)), stage_v=tuple(map(per_row, c.stage_v)),
                    stage_index=per_slot(c.stage_index), stage_len=fn(c.stage_len, 1, 1), first=kv(c.first),
                    last=kv(c.last))
  rest = {f.name: per_slot(getattr(st, f.name)) for f in dataclasses.fields(st) if f.name not in ("cache", "stats")}
  return st.replace(cache=cache, **rest)


class _Axis:
  """Where a state array keeps its slots: `axis`, `per` entries per slot (a leaf of `_slot_axes`)."""

  def __init__(self, axis: int, per: int):
    self.axis, self.per = axis, per


def _slot_axes(st: EngineState, K: int) -> EngineState:
  """The state's structure with an `_Axis` for every per-slot array (None for the statistics)."""
  spec = _slots_of(st, K, lambda a, axis, per: _Axis(axis, per))
  return spec.replace(stats=jax.tree.map(lambda _: None, st.stats))


def take_slots(st: EngineState, n: int, K: int) -> EngineState:
  """The state of slots 0..n-1 alone (copies: a step on few live slots runs on them only)."""
  return _slots_of(st, K, lambda a, axis, per: jax.lax.slice_in_dim(a, 0, n * per, axis=axis))


def put_slots(st: EngineState, part: EngineState, K: int) -> EngineState:
  """`st` with slots 0..n-1 replaced by `part`'s (in place when `st` is donated); the statistics are `part`'s."""
  def put(spec, a, p):
    return p if spec is None else jax.lax.dynamic_update_slice_in_dim(a, p.astype(a.dtype), 0, axis=spec.axis)
  return jax.tree.map(put, _slot_axes(st, K), st, part, is_leaf=lambda x: x is None or isinstance(x, _Axis))


def kv_bytes(cfg: ModelConfig, lay: EngineLayout, dtype=jnp.float32) -> int:
  """Bytes of the engine's KV caches (keys, values, positions, fill counts) at the layout's capacity, without
  allocating them."""
  st = jax.eval_shape(lambda: init_cache(cfg, lay, dtype))
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(st))


def expected_recursions(cfg: ModelConfig) -> float:
  """Recursions per token the routing is trained for (expert: sum of capacities; else all of them)."""
  if cfg.mor_enable and cfg.mor_type == "expert":
    return float(sum(cfg.selected_fractions))
  if cfg.mor_enable:
    return (cfg.recursions + 1) / 2
  return float(cfg.recursions)
