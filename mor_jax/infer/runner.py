"""The generate command's work once its options are checked (mor_jax/infer/cli.py): restore the model and its
tokenizer, then one prompt, a prompts file in batches, or a prompt loop (with --chat: one conversation)."""

from __future__ import annotations

import functools
import json
import sys
import time

from mor_jax.infer import checkpoint as infer_ckpt
from mor_jax.infer import compilation
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.generate import Generator
from mor_jax.infer.options import GenerateOptions
from mor_jax.infer.prompts import chat_settings, render_chat, unescape
from mor_jax.infer.sampling import SamplingParams


def run(config, workdir: str, o: GenerateOptions, *, kv_capacity, ids, prompts, stop, out=None, err=None,
        stdin=None):
  """`ids`: the parsed --prompt_ids (None: text prompts); `prompts`: those of --prompts_file; `stop`: unescaped."""
  out, err = out or sys.stdout, err or sys.stderr
  sampling = SamplingParams(float(o.temperature), int(o.top_k), float(o.top_p))
  gen, tok_path = _load_generator(config, workdir, o, kv_capacity=kv_capacity, by_ids=ids is not None, err=err)
  wrap = _chat_wrapper(tok_path) if o.chat else None
  if ids is not None:
    return [_one_ids(gen, out, err, ids, seed=o.seed, max_new_tokens=o.max_new_tokens, sampling=sampling,
                     stop_at_eos=not o.ignore_eos)]
  one = functools.partial(_one, gen, out, err, dict(max_new_tokens=o.max_new_tokens, sampling=sampling, stop=stop,
                                                    stop_at_eos=not o.ignore_eos),
                          echo=not o.chat)
  if o.prompt is not None:
    return [one(wrap([_user(unescape(o.prompt))]) if o.chat else unescape(o.prompt), o.seed)]
  if o.prompts_file:
    return _run_file(gen, [wrap([_user(p)]) for p in prompts] if o.chat else prompts, o.output_file, out, err,
                     batch_size=o.batch_size, max_new_tokens=o.max_new_tokens, sampling=sampling, seed=o.seed,
                     stop=stop, stop_at_eos=not o.ignore_eos)
  return _interactive(_Conversation(one, wrap) if o.chat else one, o.seed, err, stdin)


def _user(text: str) -> dict:
  return {"role": "user", "content": text}


def _chat_wrapper(tok_path):
  """messages -> prompt text with the model's chat template (checked now: a model without one fails here)."""
  settings = chat_settings(tok_path)
  render_chat(settings, [_user("hi")])       # a template that does not render fails before the first prompt
  return functools.partial(render_chat, settings)


class _Conversation:
  """--chat --interactive: one conversation; each turn's prompt holds the earlier turns (':reset' clears them)."""

  def __init__(self, one, wrap):
    self.one, self.wrap, self.messages = one, wrap, []

  def __call__(self, text: str, seed: int):
    if text.strip() == ":reset":
      self.messages = []
      return None
    res = self.one(self.wrap(self.messages + [_user(text)]), seed)
    self.messages += [_user(text), {"role": "assistant", "content": res.text or ""}]
    return res


def _check_against_model(cfg, kv_capacity, threshold, err) -> None:
  """The flags that depend on the restored model: kv fractions per recursion; a threshold the router ignores."""
  if isinstance(kv_capacity, tuple) and len(kv_capacity) != cfg.recursions:
    raise InferenceError(f"--kv_capacity has {len(kv_capacity)} fractions but the model runs {cfg.recursions} "
                         f"recursions: give {cfg.recursions} (one per recursion), 'full' or 'routed'.")
  if threshold is not None and not (cfg.mor_enable and cfg.mor_type == "expert" and cfg.router_func == "sigmoid"):
    print("note: --threshold applies to expert-choice sigmoid routers only; this model does not read it.", file=err)


def _load_generator(config, workdir, o: GenerateOptions, *, kv_capacity, by_ids: bool, err):
  """Restores the model and its tokenizer (none for --prompt_ids unless --tokenizer is given)."""
  compilation.enable_compilation_cache()
  t0 = time.time()
  restored = infer_ckpt.restore(workdir, step=o.step, config=config)
  tok = None
  if o.tokenizer or not by_ids:
    tok = infer_ckpt.load_tokenizer(restored.config, restored.cfg, directory=restored.directory,
                                    override=o.tokenizer)
  _check_against_model(restored.cfg, kv_capacity, o.threshold, err)
  gen = Generator(restored.cfg, restored.variables, tok, threshold=o.threshold, kv_capacity=kv_capacity,
                  add_bos=bool(restored.config.data.add_bos) and not by_ids, dtype=o.dtype)
  print(f"[{infer_ckpt.describe(restored)}; loaded in {time.time() - t0:.1f}s]", file=err, flush=True)
  return gen, infer_ckpt.tokenizer_source(restored.config, directory=restored.directory, override=o.tokenizer)


def _one_ids(gen, out, err, ids, *, seed: int, **kw):
  """--prompt_ids: the generated ids on `out`, one comma-separated line (the text too when a tokenizer is given)."""
  res = gen.generate([list(ids)], seed=seed, **kw)[0]
  print(",".join(str(i) for i in res.tokens), file=out, flush=True)
  if gen.tokenizer is not None:
    print(repr(res.text), file=err, flush=True)
  print(f"[{len(res.tokens)} tokens; finish: {res.finish_reason}; mean recursions per token "
        f"{res.mean_recursions:.2f} of {gen.cfg.recursions}]", file=err, flush=True)
  return res


def _one(gen, out, err, kw: dict, text: str, seed: int, echo: bool = True):
  """One prompt, streamed to `out` (after the prompt itself when `echo`); timing and depth on `err`."""
  gen.encode([text])   # errors (empty, too long) before anything is printed
  if echo:
    print(text, end="", file=out, flush=True)
  t, c = time.time(), compilation.compiled_seconds()
  res = gen.generate([text], seed=seed, on_text=lambda _, s: print(s, end="", file=out, flush=True), **kw)[0]
  dt = time.time() - t
  print("", file=out, flush=True)
  rate = compilation.rate_note(len(res.tokens), dt, compilation.compiled_seconds() - c)
  print(f"[{len(res.tokens)} tokens in {dt:.2f}s ({rate}); finish: {res.finish_reason}; mean recursions per token "
        f"{res.mean_recursions:.2f} of {gen.cfg.recursions}]", file=err, flush=True)
  return res


def _run_file(gen, prompts, output_file, out, err, *, batch_size: int, seed: int, **kw):
  """--prompts_file: batches of prompts, JSON lines in input order to `output_file` (or stdout)."""
  results = []
  sink = open(output_file, "w", encoding="utf-8") if output_file else out
  try:
    for i in range(0, len(prompts), batch_size):
      chunk = prompts[i:i + batch_size]
      res = gen.generate(chunk, seed=seed, row_ids=range(i, i + len(chunk)), **kw)
      for j, r in enumerate(res):
        sink.write(json.dumps({"index": i + j, **r.to_json()}, ensure_ascii=False) + "\n")
      sink.flush()
      results += res
      print(f"[{i + len(chunk)}/{len(prompts)} prompts]", file=err, flush=True)
  finally:
    if output_file:
      sink.close()
  return results


def _read_line(use_input: bool, stdin, err) -> str:
  """The next line of the prompt loop ('' at the end of the input)."""
  if use_input:
    try:
      return input(">>> ") + "\n"
    except EOFError:
      return ""
  print(">>> ", end="", file=err, flush=True)
  return stdin.readline()


def _interactive(one, seed: int, err, stdin):
  """--interactive: a prompt loop (the seed advances per turn); errors are reported and the loop goes on."""
  use_input = stdin is None and sys.stdin.isatty()   # a terminal: line editing via input()
  stdin = stdin or sys.stdin
  print("Enter a prompt (\\n for a new line); :quit or Ctrl-D ends, Ctrl-C stops a generation.", file=err, flush=True)
  results, turn = [], 0
  while True:
    line = _read_line(use_input, stdin, err)
    if not line or line.strip() in (":quit", ":q", ":exit"):
      print("", file=err)
      break
    try:
      res = one(unescape(line.rstrip("\n")), seed + turn)
      if res is not None:
        results.append(res)
    except InferenceError as e:
      print(f"error: {e}", file=err, flush=True)
    except KeyboardInterrupt:
      print("\n[stopped]", file=err, flush=True)
    turn += 1
  return results
