"""Continuous depth-wise batching: a MoR decode engine with sequence slots and a request queue.

    eng = Engine(cfg, variables, tokenizer, slots=32, max_new_tokens=128)
    outs = eng.generate(prompts, max_new_tokens=[...], sampling=SamplingParams(temperature=0.0))
    # or: ids = [eng.submit(p, max_new_tokens=n) for p, n in ...]; results = eng.run()

Why it is fast (spec section 6): the shared block has the same parameters at
every recursion, so one batched call of the block can advance token states
that sit at *different* recursion depths, from different sequences. The engine
keeps `slots` sequences in flight. Every slot holds exactly one token in
flight, in one of these phases:

    ENTER  a freshly sampled token: embedding, unique first layer, router 0
    BLOCK  the token has entered recursion `depth` and waits for its block pass
    EXIT   the token is done recursing: unique last layer, final norm, head, sampling
    DONE / EMPTY   the slot is free (DONE: its finished request is not collected yet)

One *tick* (a jitted, static-shaped function of an explicit state pytree) does
(1) the entry phase for up to `entry_rows` ENTER slots, (2) one pass of the
shared block over all `slots` rows at once, each row at its own depth, reading
and writing its own recursion's KV cache, followed by the router of the next
recursion (continue, or exit), and (3) the exit phase for up to `exit_rows`
EXIT slots, whose sampled token re-enters at the next tick. A token that runs k
recursions occupies its slot for k ticks; a token that exits early frees its
row for the slot's next token at once instead of idling behind deeper tokens.
When `entry_rows` / `exit_rows` are below `slots`, the first layer, last layer
and head run on a compacted sub-batch (about slots / mean recursions rows
leave per tick), which is where most of the saving over a per-step decoder
comes from; ENTER / EXIT slots that do not fit wait a tick (rotating priority).

A step runs ticks in a `lax.while_loop` until enough slots are free to be worth refilling (`refill_min`), the
step's token budget is spent, a slot filled its read-back window, a token reached the allocated capacity, or
everything is done; a thin Python scheduler then reads back only the step's new tokens, collects finished
requests, prefills waiting ones (the plain path's `forward_cached`, batched: the rows that arrived, padded to a
power of two, prompt length bucketed) and inserts their caches into the free slots, and resumes.

KV caches (recursion-wise, as in `mor_jax.infer.cache`): one array per layer; the shared block's caches for all
recursions side by side along the entry axis (one region per recursion, the plan's capacities 'full' or 'routed';
with recursive KV sharing one region, recursion 0's, which deeper recursions read without writing); a row attends
to its own region through a mask. The unique first and last layers have one cache each. Caches are allocated for
the live requests, not the model's context: their capacity is a power-of-two bucket that grows (and shrinks) with
the longest live sequence, up to `max_len`. Every write is in place (rows that write nothing write a spare entry).

Routing is the causal inference routing of `forward_cached` (threshold for
expert-choice, the router's depth for token-choice; non-routed recursive and
vanilla models run every recursion), so for the same requests greedy outputs
equal the plain generation path's (`Generator`) token for token. Sampling
uses the same per-request keys (`fold_in(PRNGKey(seed), row_id)`, then the
index of the generated token), so seeded sampling matches too.

Supported: vanilla (strategy 'none') and the cycle / middle_cycle strategies
(expert-choice, token-choice, KV sharing, or no routing). The sequence
strategies run different layers at each depth (no shared block to batch
across depths) and are rejected.

Layout: `layout.py` (static shapes, the state pytree), `tick.py` (the jitted tick and its phases),
`admit.py` (prefill into free slots), `scheduler.py` (the request queue, the step-wise session API `start` /
`submit` / `step` / `cancel` / `finish` a server drives, `Engine`).
"""

from mor_jax.infer.engine.layout import (BLOCK, DONE, EMPTY, ENTER, EXIT, PHASES, STATS, EngineCache, EngineLayout,
                                         EngineState, bucket, expected_recursions, init_state, kv_bytes, make_layout,
                                         resize)
from mor_jax.infer.engine.admit import insert, prefill
from mor_jax.infer.engine.scheduler import Engine
from mor_jax.infer.engine.session import Progress, Request
from mor_jax.infer.engine.tick import SKIP_EMPTY_PHASES, run_ticks, tick

__all__ = ["BLOCK", "DONE", "EMPTY", "ENTER", "EXIT", "PHASES", "SKIP_EMPTY_PHASES", "STATS", "Engine", "EngineCache",
           "EngineLayout", "EngineState", "Progress", "Request", "bucket", "expected_recursions",
           "init_state", "insert", "kv_bytes", "make_layout", "prefill", "resize", "run_ticks", "tick"]
