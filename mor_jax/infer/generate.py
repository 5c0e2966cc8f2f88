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
checks stop strings. Shapes are bucketed (prompt length to a power of two)
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
from mor_jax.infer import cache as cache_lib
from mor_jax.infer.decode import InferenceError, check_supported, forward_cached, logits_fn

FINISH_REASONS = ("running", "eos", "length", "stop")
_RUNNING, _EOS, _LENGTH, _STOP = range(4)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 -> greedy (argmax); top_k 0 and top_p 1.0 -> off."""
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise InferenceError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
    if self.top_k < 0:
      raise InferenceError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
    if not 0 < self.top_p <= 1:
      raise InferenceError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}.")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sampling_arrays(sp: SamplingParams) -> dict:
  """The sampling parameters as arrays: one compiled program serves every setting."""
  return {"temperature": jnp.float32(sp.temperature), "top_k": jnp.int32(sp.top_k), "top_p": jnp.float32(sp.top_p)}


def sample_logits(keys_B2, logits_BV, sp):
  """One token per row: argmax when temperature is 0, else a draw from softmax(logits / temperature)
  restricted to the top_k tokens (0: all) and to the smallest set of them whose mass reaches top_p.

  `sp` is a SamplingParams or `sampling_arrays(...)` (traced values are fine).
  """
  if isinstance(sp, SamplingParams):
    sp = sampling_arrays(sp)
  temperature, top_k, top_p = sp["temperature"], sp["top_k"], sp["top_p"]
  logits = logits_BV.astype(jnp.float32)
  V = logits.shape[-1]

  def filtered(l):
    srt = jnp.sort(l, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    srt = jnp.where(jnp.arange(V)[None, :] < k, srt, -jnp.inf)
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs          # mass of the tokens ranked above
    keep = (before < top_p) & (srt > -jnp.inf)           # top-k, then the smallest prefix reaching top_p
    keep = keep.at[:, 0].set(True)
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(l < cutoff, -jnp.inf, l)

  def draw(_):
    l = logits / jnp.maximum(temperature, 1e-6)
    l = jax.lax.cond((top_k > 0) | (top_p < 1.0), filtered, lambda x: x, l)
    return jax.vmap(jax.random.categorical)(keys_B2, l).astype(jnp.int32)

  greedy = lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(temperature > 0, draw, greedy, None)


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
  finish = state.finish
  finish = jnp.where(running & (tok == eos_id), _EOS, finish)   # eos_id -1: none
  finish = jnp.where(running & (finish == _RUNNING) & (count >= state.limit), _LENGTH, finish)
  return state.replace(token=tok, out=out, rec=rec_out, count=count, finish=finish, done=finish != _RUNNING,
                       step=state.step + 1)


def _prefill(cfg, plan, variables, tokens_BP, lengths_B, keys_B2, limit_B, threshold, sp, eos_id, n_out: int):
  B, P = tokens_BP.shape
  pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  valid = pos < lengths_B[:, None]
  cache = cache_lib.init_cache(cfg, plan, B)
  h, cache, info = forward_cached(cfg, plan, variables, cache, tokens_BP, pos, valid, threshold=threshold)
  last = jnp.take_along_axis(h, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  logits = logits_fn(cfg, variables, last)
  tok = sample_logits(jax.vmap(jax.random.fold_in)(keys_B2, jnp.zeros((B,), jnp.int32)), logits, sp)
  rec_last = jnp.take_along_axis(info["recursions"], (lengths_B - 1)[:, None], axis=1)[:, 0]
  state = DecodeState(cache=cache, token=tok, pos=lengths_B.astype(jnp.int32), done=jnp.zeros((B,), bool),
                      finish=jnp.zeros((B,), jnp.int32), count=jnp.zeros((B,), jnp.int32),
                      limit=limit_B.astype(jnp.int32), out=jnp.zeros((B, n_out), jnp.int32),
                      rec=jnp.zeros((B, n_out), jnp.int32), keys=keys_B2, step=jnp.int32(0))
  state = _record(state, tok, rec_last, eos_id)
  return state, jnp.where(valid, info["recursions"], 0)


def _decode(cfg, plan, variables, state: DecodeState, n_steps, threshold, sp, eos_id):
  n_out = state.out.shape[1]
  stop_at = jnp.minimum(state.step + n_steps, n_out)

  def cond(s):
    return (s.step < stop_at) & ~jnp.all(s.done)

  def body(s):
    running = ~s.done
    h, cache, info = forward_cached(cfg, plan, variables, s.cache, s.token[:, None], s.pos[:, None],
                                    running[:, None], threshold=threshold)
    logits = logits_fn(cfg, variables, h[:, 0])
    keys = jax.vmap(jax.random.fold_in)(s.keys, jnp.broadcast_to(s.step, s.done.shape))
    tok = sample_logits(keys, logits, sp)
    s = s.replace(cache=cache, pos=s.pos + running.astype(jnp.int32))
    return _record(s, tok, info["recursions"][:, 0], eos_id)

  return jax.lax.while_loop(cond, body, state)


@functools.lru_cache(maxsize=64)
def _programs(cfg: ModelConfig, plan: cache_lib.CachePlan):
  """Jitted prefill and decode for one model and cache plan (shapes of the batch retrace as usual;
  threshold, sampling parameters and EOS id are traced values)."""
  prefill = jax.jit(functools.partial(_prefill, cfg, plan), static_argnames=("n_out",))
  decode = jax.jit(functools.partial(_decode, cfg, plan), donate_argnums=(1,))
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


def _bucket(n: int, cap: int, minimum: int = 16) -> int:
  b = minimum
  while b < n:
    b *= 2
  return min(b, cap)


class Generator:
  """Batched generation with a restored model (see the module docstring).

  threshold: expert-choice router threshold (default: the model config's).
  kv_capacity: 'full' (exact causal routing), 'routed' (recursion r's cache
  holds ceil(c_r * max_len) entries; tokens beyond it skip r) or fractions.
  add_bos: prepend the tokenizer's BOS to each prompt (as training did with
  data.add_bos).
  """

  def __init__(self, cfg: ModelConfig, variables, tokenizer=None, *, threshold: float | None = None,
               kv_capacity="full", add_bos: bool = False):
    check_supported(cfg)
    self.cfg, self.variables, self.tokenizer = cfg, variables, tokenizer
    self.threshold = float(cfg.threshold if threshold is None else threshold)
    self.kv_capacity = kv_capacity if isinstance(kv_capacity, str) else tuple(kv_capacity)
    self.add_bos = add_bos
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
      raise InferenceError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                           f"{cfg.vocab_size}: they do not belong together. Use the tokenizer the model was "
                           "trained with (config.data.tokenizer_path / the prepared dataset).")
    if add_bos and (tokenizer is None or tokenizer.bos_id is None):
      raise InferenceError("add_bos needs a tokenizer with a BOS token.")
    self.last_plan: cache_lib.CachePlan | None = None
    self.last_state: DecodeState | None = None

  # ------------------------------------------------------------------ inputs
  def encode(self, prompts: Sequence) -> list[list[int]]:
    """Token ids for each prompt (str needs the tokenizer; a list of ints is taken as is), checked."""
    ctx = self.cfg.max_seq_len
    ids = []
    for i, p in enumerate(prompts):
      if isinstance(p, str):
        if self.tokenizer is None:
          raise InferenceError("text prompts need a tokenizer; pass token ids or a tokenizer.")
        t = self.tokenizer.encode(p)
      else:
        t = [int(x) for x in p]
      if not t:
        raise InferenceError(f"prompt {i} is empty: the model needs at least one token to condition on.")
      if self.add_bos:
        t = [self.tokenizer.bos_id] + t
      if len(t) >= ctx:
        raise InferenceError(f"prompt {i} has {len(t)} tokens but the model's context is {ctx} tokens "
                             f"(model.max_seq_len), leaving no room to generate. Shorten it to at most {ctx - 1}.")
      bad = [x for x in t if not 0 <= x < self.cfg.vocab_size]
      if bad:
        raise InferenceError(f"prompt {i} has token ids outside the model's vocabulary [0, {self.cfg.vocab_size}): "
                             f"{bad[:5]}; tokenizer and model do not match.")
      ids.append(t)
    if not ids:
      raise InferenceError("no prompts given.")
    return ids

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
    P = _bucket(int(lengths.max()), ctx)
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
    prefill, decode = _programs(cfg, plan)
    streaming = on_text is not None or on_tokens is not None or bool(stop)
    if chunk_steps is None:
      chunk_steps = 8 if streaming else int(limits.max())
    thr = jnp.float32(self.threshold)

    state, prompt_rec = prefill(self.variables, jnp.asarray(tokens), jnp.asarray(lengths), keys,
                                jnp.asarray(limits), thr, sp, eos, n_out=n_out)
    emitted_tok = [0] * B
    emitted_txt = [0] * B
    texts: list[str | None] = [None] * B
    stopped = [False] * B
    hold = max((len(s) for s in stop), default=1) - 1
    while True:
      if streaming:
        out, count, done = jax.device_get((state.out, state.count, state.done))
        new_done = []
        for b in range(B):
          n = int(count[b])
          if on_tokens is not None and n > emitted_tok[b]:
            on_tokens(b, [int(x) for x in out[b, emitted_tok[b]:n]])
          emitted_tok[b] = n
          if self.tokenizer is None or (on_text is None and not stop):
            continue
          text = self.tokenizer.decode(out[b, :n])
          finished = bool(done[b])
          cut = _find_stop(text, stop, emitted_txt[b] - hold)
          if cut is not None:
            text, finished, stopped[b] = text[:cut], True, True
            if not done[b]:
              new_done.append(b)
          texts[b] = text
          end = len(text) if finished else max(emitted_txt[b], len(text) - hold)
          while end > emitted_txt[b] and not finished and text[end - 1] == "\ufffd":
            end -= 1   # an incomplete multi-byte character: wait for its next token
          if on_text is not None and end > emitted_txt[b]:
            on_text(b, text[emitted_txt[b]:end])
          emitted_txt[b] = max(emitted_txt[b], end)
        if new_done:
          idx = jnp.asarray(new_done)
          state = state.replace(done=state.done.at[idx].set(True), finish=state.finish.at[idx].set(_STOP))
      if bool(jnp.all(state.done)):
        break
      state = decode(self.variables, state, jnp.int32(chunk_steps), thr, sp, eos)
    self.last_plan, self.last_state = plan, state

    out, rec, count, finish, prompt_rec = jax.device_get((state.out, state.rec, state.count, state.finish, prompt_rec))
    results = []
    for b in range(B):
      n = int(count[b])
      toks = [int(x) for x in out[b, :n]]
      text = None
      if self.tokenizer is not None:
        text = texts[b] if texts[b] is not None and stopped[b] else self.tokenizer.decode(toks)
        if not stopped[b]:
          cut = _find_stop(text, stop, 0)
          if cut is not None:
            text, stopped[b] = text[:cut], True
      reason = "stop" if stopped[b] else FINISH_REASONS[int(finish[b])]
      results.append(Generation(prompt_tokens=ids[b], tokens=toks, recursions=[int(x) for x in rec[b, :n]],
                                prompt_recursions=[int(x) for x in prompt_rec[b, :lengths[b]]], finish_reason=reason,
                                text=text, prompt=prompts[b] if isinstance(prompts[b], str) else None))
    return results

  def kv_stats(self) -> dict:
    """Cache statistics of the last generate() call (allocated/used bytes, entries per recursion)."""
    if self.last_state is None:
      raise InferenceError("nothing generated yet.")
    return cache_lib.cache_stats(self.last_state.cache, self.last_plan)


def _find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
  """Index of the earliest stop string in text[start:] (as an index into text), or None."""
  best = None
  for s in stop:
    i = text.find(s, max(0, start))
    if i >= 0 and (best is None or i < best):
      best = i
  return best


def main_generate(config, workdir, **flags):
  """The --mode=generate command; see mor_jax.infer.cli.main_generate."""
  from mor_jax.infer.cli import main_generate as run  # pylint: disable=g-import-not-at-top
  return run(config, workdir, **flags)
