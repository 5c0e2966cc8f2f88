"""The engine's static shapes (EngineLayout: slots, cache regions, sub-batches) and its state pytree.

A slot holds one token in flight, in one of the phases EMPTY, ENTER, BLOCK, EXIT, DONE (see the package
docstring). KV caches (recursion-wise, as in `mor_jax.infer.cache`): the shared block's caches for all
recursions live in one array [base_depth, slots, C, K, E]; the recursion regions (the plan's capacities) are
laid side by side along C. The unique first and last layers have one cache each.
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
from mor_jax.kernels.policy import for_decoding

EMPTY, ENTER, BLOCK, EXIT, DONE = range(5)
PHASES = ("empty", "enter", "block", "exit", "done")


@dataclasses.dataclass(frozen=True)
class EngineLayout:
  """Static shapes of one engine (hashable: one compilation per layout)."""
  slots: int
  max_len: int                  # positions a sequence may occupy (prompt + generated - 1 fed tokens)
  max_new: int                  # output columns per slot
  plan: cache_lib.CachePlan     # the plain path's cache plan (prefill uses it; its capacities size the regions)
  region_of: tuple[int, ...]    # per recursion: the stage region its pass reads
  writes: tuple[bool, ...]      # per recursion: does its pass write its region (False: KV sharing, r >= 1)
  offsets: tuple[int, ...]      # per region: first entry along C
  capacity: tuple[int, ...]     # per region: entries
  width: int                    # C: all regions side by side
  window: int                   # entries a row gathers (the largest region)
  entry_rows: int
  exit_rows: int


def make_layout(cfg: ModelConfig, slots: int, max_len: int, max_new: int, kv_capacity="full",
                entry_rows: int | None = None, exit_rows: int | None = None) -> EngineLayout:
  """Shapes of an engine: its cache plan (the plain path's, `kv_capacity` 'full' / 'routed' / fractions) and the
  recursion regions of the shared block's cache laid side by side."""
  plan = cache_lib.make_plan(cfg, max_len, kv_capacity)
  R = cfg.recursions
  one_block_per_recursion = len(plan.calls) == R and all(
      c.recursion == r and c.layers == (0, cfg.base_depth) for r, c in enumerate(plan.calls))
  if cfg.strategy in ("sequence", "middle_sequence") or not one_block_per_recursion:
    raise InferenceError("the depth-wise batching engine needs one shared block per recursion (strategies 'none', "
                         f"'cycle', 'middle_cycle'); strategy {cfg.strategy!r} runs different layers at each depth. "
                         "Use the plain Generator for it.")
  region_of = tuple(c.reads if c.cache is None else c.cache for c in plan.calls)
  writes = tuple(c.cache is not None for c in plan.calls)
  caps = plan.stage_capacity
  # regions in ascending capacity: the window (largest capacity) that starts at any region stays inside C
  order = sorted(range(len(caps)), key=lambda g: (caps[g], g))
  offsets, at = [0] * len(caps), 0
  for g in order:
    offsets[g], at = at, at + caps[g]
  entry_rows = slots if not entry_rows else max(1, min(slots, int(entry_rows)))
  exit_rows = slots if not exit_rows else max(1, min(slots, int(exit_rows)))
  return EngineLayout(slots=int(slots), max_len=int(max_len), max_new=int(max_new), plan=plan, region_of=region_of,
                      writes=writes, offsets=tuple(offsets), capacity=tuple(caps), width=at, window=max(caps),
                      entry_rows=entry_rows, exit_rows=exit_rows)


# ------------------------------------------------------------------ state
@flax.struct.dataclass
class EngineCache:
  stage_k: jax.Array       # [n, B, C, K, E]   n = base_depth; recursion regions side by side along C
  stage_v: jax.Array
  stage_index: jax.Array   # [B, C] int32 position of each entry
  stage_len: jax.Array     # [G, B] int32 entries filled per region
  first: cache_lib.KVCache | None
  last: cache_lib.KVCache | None

  @property
  def nbytes(self) -> int:
    n = sum(int(a.nbytes) for a in (self.stage_k, self.stage_v, self.stage_index, self.stage_len))
    return n + sum(c.nbytes for c in (self.first, self.last) if c is not None)


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
  limit: jax.Array     # [B] int32 tokens it may generate
  finish: jax.Array    # [B] int32 FINISH_REASONS index
  keys: jax.Array      # [B, 2] uint32 sampling key of the request
  temperature: jax.Array   # [B] float32 sampling parameters of the request (0: greedy)
  top_k: jax.Array         # [B] int32 (0: off)
  top_p: jax.Array         # [B] float32 (1: off)
  out: jax.Array       # [B, N] int32 generated tokens
  out_rec: jax.Array   # [B, N] int32 recursions behind each
  stats: dict          # int32 counters (see STATS)


STATS = ("ticks", "block_rows", "applied_rows", "entry_rows", "exit_rows", "entry_waits", "exit_waits",
         "mixed_depth_ticks", "mixed_exit_ticks", "tokens")


def live(phase):
  return (phase == ENTER) | (phase == BLOCK) | (phase == EXIT)


def init_state(cfg: ModelConfig, lay: EngineLayout) -> EngineState:
  """Empty caches and free slots. (Run it under jax.jit: the programs donate the state, and jit gives every leaf
  its own buffer.)"""
  B, D = lay.slots, cfg.hidden_size
  n, K, E, dt = cfg.base_depth, cfg.num_kv_heads, cfg.head_dim, for_decoding().compute_dtype
  big = np.iinfo(np.int32).max
  cache = EngineCache(
      stage_k=jnp.zeros((n, B, lay.width, K, E), dt), stage_v=jnp.zeros((n, B, lay.width, K, E), dt),
      stage_index=jnp.full((B, lay.width), big, jnp.int32), stage_len=jnp.zeros((len(lay.capacity), B), jnp.int32),
      first=cache_lib.empty_cache(cfg, 1, B, lay.max_len) if cfg.has_middle else None,
      last=cache_lib.empty_cache(cfg, 1, B, lay.max_len) if cfg.has_middle else None)
  zi = jnp.zeros((B,), jnp.int32)
  return EngineState(cache=cache, phase=zi, h=jnp.zeros((B, D), dt), h0=jnp.zeros((B, D), dt), depth=zi,
                     apply=jnp.zeros((B,), bool), target=zi, gate=jnp.zeros((B,), jnp.float32), token=zi, pos=zi,
                     rec=zi, req=jnp.full((B,), -1, jnp.int32), count=zi, limit=zi, finish=zi,
                     keys=jnp.zeros((B, 2), jnp.uint32), temperature=jnp.zeros((B,), jnp.float32), top_k=zi,
                     top_p=jnp.ones((B,), jnp.float32), out=jnp.zeros((B, lay.max_new), jnp.int32),
                     out_rec=jnp.zeros((B, lay.max_new), jnp.int32), stats={k: jnp.int32(0) for k in STATS})


def kv_bytes(cfg: ModelConfig, lay: EngineLayout) -> int:
  """Bytes of the engine's KV caches (keys, values, positions, fill counts) without allocating them."""
  st = jax.eval_shape(lambda: init_state(cfg, lay).cache)
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(st))



def expected_recursions(cfg: ModelConfig) -> float:
  """Recursions per token the routing is trained for (expert: sum of capacities; else all of them)."""
  if cfg.mor_enable and cfg.mor_type == "expert":
    return float(sum(cfg.selected_fractions))
  if cfg.mor_enable:
    return (cfg.recursions + 1) / 2
  return float(cfg.recursions)
