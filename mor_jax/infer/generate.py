"""Generation: prefill + token-by-token decoding in a jitted loop, sampling, stop conditions, streaming.

    gen = Generator(cfg, variables, tokenizer)
    outs = gen.generate(["ROMEO:", "JULIET: O"], max_new_tokens=64,
                        sampling=SamplingParams(temperature=0.8, top_k=40), seed=0)
    outs[0].text, outs[0].recursions, outs[0].finish_reason

Prompts of different lengths share one batch: they are right-padded, each
row keeps its own positions and cache fill, and padding writes nothing, so a
row generates exactly what it would generate alone. The prompt is prefilled
in one call; decoding runs `lax.while_loop` over up to `chunk_steps` tokens
per call (all of `max_new_tokens` when nothing is streamed), stopping early
once every row has finished. Between calls the host streams new text and
checks stop strings. Shapes are bucketed (prompt length: `prompts.prompt_length`)
so a few compilations serve many requests.

`recursions[i]` of a generation is the number of recursions the model ran
for the position whose logits produced generated token i (the depth spent
to generate it); `prompt_recursions` those of the prompt tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig
from mor_jax.infer import cache as cache_lib, compilation
from mor_jax.infer import prompts as prompts_lib
from mor_jax.infer import weights as weights_lib
from mor_jax.infer.decode import check_supported, forward_cached, logits_fn
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.sampling import (FINISH_REASONS, RUNNING, STOP, SamplingParams, finish_code, sample_logits,
                                    sampling_arrays)


@flax.struct.dataclass
class DecodeState:
  cache: dict
  token: jax.Array     # [B] int32: the last sampled token (fed next)
  pos: jax.Array       # [B] int32: its position
  done: jax.Array      # [B] bool
  finish: jax.Array    # [B] int32 index into FINISH_REASONS
  count: jax.Array     # [B] int32 tokens generated
  limit: jax.Array     # [B] int32 tokens this row may generate
  out: jax.Array       # [B, N] int32 generated tokens
  rec: jax.Array       # [B, N] int32 recursions behind each generated token
  keys: jax.Array      # [B, 2] uint32 per-row sampling keys
  step: jax.Array      # int32 columns of `out` filled


def _record(state: DecodeState, tok, rec, eos_id):
  """Writes the new token of each running row and updates done/finish."""
  running = ~state.done
  tok = jnp.where(running, tok, 0)
  out = state.out.at[:, state.step].set(tok)
  rec_out = state.rec.at[:, state.step].set(jnp.where(running, rec, 0))
  count = state.count + running.astype(jnp.int32)
  finish = jnp.where(running, finish_code(tok, count, state.limit, eos_id), state.finish)   # eos_id -1: none
  return state.replace(token=tok, out=out, rec=rec_out, count=count, finish=finish, done=finish != RUNNING,
                       step=state.step + 1)


def _prefill(cfg, plan, weights, tokens_BP, lengths_B, keys_B2, limit_B, threshold, sp, eos_id, n_out: int):
  B, P = tokens_BP.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  valid = pos < lengths_B[:, None]
  cache = cache_lib.init_cache(cfg, plan, B, weights.dtype)
  h, cache, info = forward_cached(cfg, plan, weights, cache, tokens_BP, pos, valid, threshold=threshold)
  last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  logits = logits_fn(cfg, weights, last)
  tok = sample_logits(jax.vmap(jax.random.fold_in)(keys_B2, jnp.zeros((B,), jnp.int32)), logits, sp)
  rec_last = jnp.take_along_axis(info["recursions"], (lengths_B - 1)[:, None], axis=1)[:, 0]
  state = DecodeState(cache=cache, token=tok, pos=lengths_B.astype(jnp.int32), done=jnp.zeros((B,), bool),
                      finish=jnp.zeros((B,), jnp.int32), count=jnp.zeros((B,), jnp.int32),
                      limit=limit_B.astype(jnp.int32), out=jnp.zeros((B, n_out), jnp.int32),
                      rec=jnp.zeros((B, n_out), jnp.int32), keys=keys_B2, step=jnp.int32(0))
  state = _record(state, tok, rec_last, eos_id)
  return state, jnp.where(valid, info["recursions"], 0)


def _decode(cfg, plan, weights, state: DecodeState, n_steps, threshold, sp, eos_id):
  n_out = state.out.shape[1]
  stop_at = jnp.minimum(state.step + n_steps, n_out)

  def cond(s):
    return (s.step < stop_at) & ~jnp.all(s.done)

  def body(s):
    running = ~s.done
    h, cache, info = forward_cached(cfg, plan, weights, s.cache, s.token[:, None], s.pos[:, None],
                                    running[:, None], threshold=threshold)
    logits = logits_fn(cfg, weights, h[:, 0])
    keys = jax.vmap(jax.random.fold_in)(s.keys, jnp.broadcast_to(s.step, s.done.shape))
    tok = sample_logits(keys, logits, sp)
    s = s.replace(cache=cache, pos=s.pos + running.astype(jnp.int32))
    return _record(s, tok, info["recursions"][:, 0], eos_id)

  return jax.lax.while_loop(cond, body, state)


def _programs(cfg: ModelConfig, plan: cache_lib.CachePlan, dtype: str, batch: int, prompt_len: int):
  """Jitted prefill and decode for one model and cache plan, compiled with the XLA options the batch shape's
  products take (`compilation.decode_options`; threshold, sampling parameters and EOS id are traced values)."""
  options = lambda rows: tuple(sorted(compilation.decode_options(dtype, rows).items()))
  return _jitted(cfg, plan, options(batch * prompt_len), options(batch))


@functools.lru_cache(maxsize=64)
def _jitted(cfg: ModelConfig, plan: cache_lib.CachePlan, prefill_options: tuple, decode_options: tuple):
  """One pair of jitted programs per model, plan and option set (shapes of the batch retrace as usual)."""
  prefill = jax.jit(functools.partial(_prefill, cfg, plan), static_argnames=("n_out",),
                    compiler_options=dict(prefill_options) or None)
  decode = jax.jit(functools.partial(_decode, cfg, plan), donate_argnums=(1,),
                   compiler_options=dict(decode_options) or None)
  return prefill, decode


@dataclasses.dataclass
class Generation:
  """One prompt's result."""
  prompt_tokens: list[int]
  tokens: list[int]                 # generated ids (an EOS that ended the row included)
  recursions: list[int]             # per generated token (see the module docstring)
  prompt_recursions: list[int]
  finish_reason: str                # eos | length | stop
  text: str | None = None           # decoded continuation (without EOS, cut before a stop string)
  prompt: str | None = None

  @property
  def mean_recursions(self) -> float:
    return float(np.mean(self.recursions)) if self.recursions else 0.0

  def to_json(self) -> dict:
    return {"prompt": self.prompt, "text": self.text, "finish_reason": self.finish_reason,
            "prompt_tokens": len(self.prompt_tokens), "generated_tokens": len(self.tokens), "tokens": self.tokens,
            "recursions": self.recursions, "mean_recursions": round(self.mean_recursions, 4)}


class Generator:
  """Batched generation with a restored model (see the module docstring).

  threshold: expert-choice router threshold (default: the model config's).
  kv_capacity: 'full' (exact causal routing), 'routed' (recursion r's cache
  holds ceil(c_r * max_len) entries; tokens beyond it skip r) or fractions.
  add_bos: prepend the tokenizer's BOS to each prompt (as training did with
  data.add_bos). dtype: of the weights and caches while decoding (float32, or
  bfloat16: half the bytes per token; weights.py). `variables` may also be
  prepared decode weights (weights.prepare_weights).
  """

  def __init__(self, cfg: ModelConfig, variables, tokenizer=None, *, threshold: float | None = None,
               kv_capacity="full", add_bos: bool = False, dtype: str = "float32"):
    check_supported(cfg)
    self.cfg, self.tokenizer = cfg, tokenizer
    self.weights = weights_lib.prepare_weights(cfg, variables, dtype)
    self.threshold = float(cfg.threshold if threshold is None else threshold)
    self.kv_capacity = kv_capacity if isinstance(kv_capacity, str) else tuple(kv_capacity)
    self.add_bos = add_bos
    prompts_lib.check_tokenizer(cfg.vocab_size, tokenizer, add_bos)
    self.last_plan: cache_lib.CachePlan | None = None
    self.last_state: DecodeState | None = None

  # ------------------------------------------------------------------ inputs
  def encode(self, prompts: Sequence) -> list[list[int]]:
    """Token ids for each prompt (str needs the tokenizer; a list of ints is taken as is), checked."""
    return prompts_lib.encode_prompts(prompts, vocab_size=self.cfg.vocab_size, tokenizer=self.tokenizer,
                                      add_bos=self.add_bos, context=self.cfg.max_seq_len)

  # ------------------------------------------------------------------ generation
  def generate(self, prompts: Sequence, *, max_new_tokens: int = 128, sampling: SamplingParams = SamplingParams(),
               seed: int = 0, stop: Sequence[str] = (), stop_at_eos: bool = True,
               on_text: Callable[[int, str], None] | None = None, on_tokens: Callable[[int, list], None] | None = None,
               chunk_steps: int | None = None, max_len: int | None = None, row_ids: Sequence[int] | None = None
               ) -> list[Generation]:
    """Generates for every prompt (one batch). See the module docstring.

    stop: strings that end a row's text (the text is cut before them);
    on_text(row, new_text) / on_tokens(row, new_ids) stream output after
    every `chunk_steps` decoded tokens (default 8 when streaming or stop
    strings are set, else everything in one call). seed and row_ids (default
    0..B-1) fix the sampling keys, so a prompt draws the same tokens in any
    batch if it keeps its row id. max_len overrides the cache length.
    """
    if max_new_tokens < 1:
      raise InferenceError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    stop = tuple(s for s in stop if s)
    if stop and self.tokenizer is None:
      raise InferenceError("stop strings need a tokenizer.")
    cfg, ctx = self.cfg, self.cfg.max_seq_len
    ids = self.encode(prompts)
    B = len(ids)
    lengths = np.array([len(t) for t in ids], np.int32)
    limits = np.minimum(max_new_tokens, ctx - lengths).astype(np.int32)
    P = prompts_lib.prompt_length(int(lengths.max()), ctx)
    n_out = min(max_new_tokens, ctx - 1)      # output columns: fixed by the request, not the prompts (one compilation)
    S = int(max_len) if max_len else min(ctx, P + n_out)
    if S < int((lengths + limits).max()) - 1 or S < P:
      raise InferenceError(f"max_len {S} is too short for prompts of {lengths.max()} tokens + {n_out} new ones.")
    tokens = np.zeros((B, P), np.int32)
    for b, t in enumerate(ids):
      tokens[b, :len(t)] = t
    row_ids = np.arange(B) if row_ids is None else np.asarray(row_ids)
    base = jax.random.PRNGKey(seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(row_ids, jnp.int32))
    eos_id = self.tokenizer.eos_id if (stop_at_eos and self.tokenizer is not None) else None
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    sp = sampling_arrays(sampling)
    plan = cache_lib.make_plan(cfg, S, self.kv_capacity)
    prefill, decode = _programs(cfg, plan, str(self.weights.dtype), B, P)
    streaming = on_text is not None or on_tokens is not None or bool(stop)
    if chunk_steps is None:
      chunk_steps = 8 if streaming else int(limits.max())
    thr = jnp.float32(self.threshold)

    state, prompt_rec = prefill(self.weights, jnp.asarray(tokens), jnp.asarray(lengths), keys,
                                jnp.asarray(limits), thr, sp, eos, n_out=n_out)
    stream = _Stream(B, self.tokenizer, stop, on_text, on_tokens, eos_id)
    while True:
      if streaming:
        state = stream.update(state)
      if bool(jnp.all(state.done)):
        break
      state = decode(self.weights, state, jnp.int32(chunk_steps), thr, sp, eos)
    self.last_plan, self.last_state = plan, state
    out, rec, count, finish, prompt_rec = jax.device_get((state.out, state.rec, state.count, state.finish, prompt_rec))
    results = []
    for b in range(B):
      n = int(count[b])
      toks = [int(x) for x in out[b, :n]]
      text, stopped = stream.final_text(b, toks)
      results.append(Generation(prompt_tokens=ids[b], tokens=toks, recursions=[int(x) for x in rec[b, :n]],
                                prompt_recursions=[int(x) for x in prompt_rec[b, :lengths[b]]],
                                finish_reason="stop" if stopped else FINISH_REASONS[int(finish[b])],
                                text=text, prompt=prompts[b] if isinstance(prompts[b], str) else None))
    return results

  def kv_stats(self) -> dict:
    """Cache statistics of the last generate() call (allocated/used bytes, entries per recursion)."""
    if self.last_state is None:
      raise InferenceError("nothing generated yet.")
    return cache_lib.cache_stats(self.last_state.cache, self.last_plan)


class _Stream:
  """Host side of streaming: new tokens / text to the callbacks, stop strings (a row that hits one is done)."""

  def __init__(self, B: int, tokenizer, stop: Sequence[str], on_text, on_tokens, eos_id: int | None = None):
    self.tokenizer, self.stop, self.on_text, self.on_tokens = tokenizer, stop, on_text, on_tokens
    self.eos_id = eos_id
    self.emitted_tok, self.emitted_txt = [0] * B, [0] * B
    self.texts: list[str | None] = [None] * B
    self.stopped = [False] * B
    self.hold = max((len(s) for s in stop), default=1) - 1   # text held back: it may be the start of a stop string

  def update(self, state: DecodeState) -> DecodeState:
    out, count, done = jax.device_get((state.out, state.count, state.done))
    new_done = [b for b in range(len(self.texts)) if self._row(b, out[b], int(count[b]), bool(done[b]))]
    if new_done:
      idx = jnp.asarray(new_done)
      state = state.replace(done=state.done.at[idx].set(True), finish=state.finish.at[idx].set(STOP))
    return state

  def _row(self, b: int, out, n: int, done: bool) -> bool:
    """Streams row b's new output; True if a stop string ended the still-running row."""
    if self.on_tokens is not None and n > self.emitted_tok[b]:
      self.on_tokens(b, [int(x) for x in out[self.emitted_tok[b]:n]])
    self.emitted_tok[b] = n
    if self.tokenizer is None or (self.on_text is None and not self.stop):
      return False
    text = self._decode(out[:n])
    finished, newly = done, False
    cut = find_stop(text, self.stop, self.emitted_txt[b] - self.hold)
    if cut is not None:
      text, finished, self.stopped[b], newly = text[:cut], True, True, not done
    self.texts[b] = text
    end = len(text) if finished else max(self.emitted_txt[b], len(text) - self.hold)
    while end > self.emitted_txt[b] and not finished and text[end - 1] == "\ufffd":
      end -= 1   # an incomplete multi-byte character: wait for its next token
    if self.on_text is not None and end > self.emitted_txt[b]:
      self.on_text(b, text[self.emitted_txt[b]:end])
    self.emitted_txt[b] = max(self.emitted_txt[b], end)
    return newly

  def _decode(self, toks) -> str:
    """The text of `toks` without the end-of-turn token (a tokenizer that does not mark EOS special keeps it)."""
    return self.tokenizer.decode([t for t in toks if t != self.eos_id])

  def final_text(self, b: int, toks: list[int]) -> tuple[str | None, bool]:
    """(row b's text cut before a stop string, did a stop string end it)."""
    if self.tokenizer is None:
      return None, self.stopped[b]
    if self.stopped[b] and self.texts[b] is not None:
      return self.texts[b], True
    text = self._decode(toks)
    cut = find_stop(text, self.stop, 0)
    if cut is not None:
      return text[:cut], True
    return text, self.stopped[b]


def find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
  """Index of the earliest stop string in text[start:] (as an index into text), or None (serve/text.py too)."""
  best = None
  for s in stop:
    i = text.find(s, max(0, start))
    if i >= 0 and (best is None or i < best):
      best = i
  return best

