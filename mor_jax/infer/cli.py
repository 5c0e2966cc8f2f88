"""`--mode=generate`: restore a workdir's model and generate from a prompt, a prompt loop or a file.

  python main.py --mode=generate --workdir=W --prompt="ROMEO:"
  python main.py --mode=generate --workdir=W --interactive
  python main.py --mode=generate --workdir=W --prompts_file=p.txt --output_file=out.jsonl
  python main.py --mode=generate --workdir=W --prompt="ROMEO:" --tokenizer=assets/tokenizers/smollm
  python main.py --mode=generate --workdir=W --prompt_ids=1,2,3          # a model without a tokenizer: ids out
  python main.py --mode=generate --workdir=W --chat --prompt="What is the capital of France?"   # a chat model

--chat wraps each prompt in the model's chat template (the `chat_template` of the tokenizer_config.json next to its
tokenizer: WORKDIR/tokenizer/ after a GGUF or Hugging Face import) as one user turn, prints only the assistant's
answer, and stops at the end-of-turn token (the tokenizer's EOS, e.g. <|im_end|>). With --interactive the
conversation is kept: each answer becomes part of the next prompt (":reset" starts a new conversation).

The tokenizer is the workdir's copy (WORKDIR/tokenizer/, written by train, prepare and import), else the one
the stored config names; --tokenizer (a tokenizer.json or a Hugging Face tokenizer folder) supplies or
overrides it and must have the model's vocabulary size.

main.py wires it with two calls: `define_flags()` at import time and
`run_from_flags(config, workdir)` for the mode. Everything is also callable
from Python: `main_generate(config, workdir, prompt="ROMEO:")`.

Prompts on the command line and in the loop may contain the escapes \\n and
\\t. A prompts file holds one prompt per line (blank lines are skipped), or,
if it ends in .jsonl, one JSON string or {"prompt": ...} object per line.
Results go to `output_file` (or stdout) as JSON lines, in input order.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Sequence, TextIO

FLAG_DEFAULTS = dict(prompt=None, interactive=False, prompts_file=None, output_file=None, max_new_tokens=256,
                     temperature=0.8, top_k=0, top_p=1.0, seed=0, threshold=None, step=None, stop=(),
                     kv_capacity="full", batch_size=16, tokenizer=None, prompt_ids=None, chat=False, dtype="float32",
                     ignore_eos=False)


def define_flags(flags=None) -> None:
  """Defines the generate-mode flags on absl's FLAGS (call once, at import time of main.py)."""
  if flags is None:
    from absl import flags  # pylint: disable=g-import-not-at-top,redefined-outer-name
  d = FLAG_DEFAULTS
  flags.DEFINE_string("prompt", d["prompt"], "generate: one prompt (\\n and \\t escapes are expanded).")
  flags.DEFINE_bool("interactive", d["interactive"], "generate: read prompts in a loop (Ctrl-D or :quit ends).")
  flags.DEFINE_string("prompts_file", d["prompts_file"], "generate: prompts, one per line (.jsonl: JSON per line).")
  flags.DEFINE_string("output_file", d["output_file"], "generate: JSONL results for --prompts_file (default stdout).")
  flags.DEFINE_integer("max_new_tokens", d["max_new_tokens"], "generate: tokens to generate per prompt at most.")
  flags.DEFINE_float("temperature", d["temperature"], "generate: sampling temperature (0 = greedy).")
  flags.DEFINE_integer("top_k", d["top_k"], "generate: sample from the k most likely tokens (0 = off).")
  flags.DEFINE_float("top_p", d["top_p"], "generate: nucleus sampling mass (1.0 = off).")
  flags.DEFINE_integer("seed", d["seed"], "generate: sampling seed.")
  flags.DEFINE_float("threshold", d["threshold"], "generate: expert-choice router threshold (default: config.mor.threshold).")
  flags.DEFINE_integer("step", d["step"], "generate: checkpoint step to load (default: the latest).")
  flags.DEFINE_multi_string("stop", list(d["stop"]), "generate: stop string (repeatable); the text ends before it.")
  flags.DEFINE_string("kv_capacity", d["kv_capacity"], "generate: KV cache size per recursion: full | routed | "
                      "comma-separated fractions (see mor_jax/infer/cache.py).")
  flags.DEFINE_enum("dtype", d["dtype"], ["float32", "bfloat16"], "generate/serve: dtype of the weights and KV "
                    "caches while decoding (bfloat16: half the bytes read per token; norms, routers, softmax and "
                    "logits stay float32; see docs/inference.md for its accuracy cost).")
  flags.DEFINE_bool("ignore_eos", d["ignore_eos"], "generate/serve: every request generates max_new_tokens / "
                    "max_tokens (EOS does not end it; for benchmarks and load tests).")
  flags.DEFINE_integer("batch_size", d["batch_size"], "generate: prompts per batch for --prompts_file.")
  flags.DEFINE_string("tokenizer", d["tokenizer"], "generate/eval: the model's tokenizer (tokenizer.json or a Hugging "
                      "Face tokenizer folder); default: the workdir's tokenizer/, then the stored config's.")
  flags.DEFINE_string("prompt_ids", d["prompt_ids"], "generate: a prompt as token ids (e.g. 1,2,3), for a model "
                      "without a tokenizer; prints the generated ids.")
  flags.DEFINE_bool("chat", d["chat"], "generate: wrap prompts in the model's chat template (tokenizer_config.json), "
                    "print only the answer, stop at the end of the turn; --interactive keeps the conversation.")


def run_from_flags(config, workdir):
  """Calls main_generate with the values of the flags define_flags() made."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  F = flags.FLAGS
  return main_generate(config, workdir, **{k: F[k].value for k in FLAG_DEFAULTS})


def parse_kv_capacity(value):
  """--kv_capacity: 'full', 'routed' or comma-separated fractions in (0, 1] (one per recursion)."""
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  if not isinstance(value, str):
    return value
  if value in ("full", "routed"):
    return value
  try:
    fractions = tuple(float(x) for x in value.split(","))
  except ValueError:
    fractions = ()
  if not fractions or not all(0 < x <= 1 for x in fractions):
    raise InferenceError(f"--kv_capacity={value} is not valid: give 'full', 'routed' or comma-separated fractions "
                         "in (0, 1], one per recursion (e.g. --kv_capacity=1,0.5,0.25).")
  return fractions


def _check_number(flag: str, value, ok: bool, want: str) -> None:
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  if not ok:
    raise InferenceError(f"--{flag}={value} is not valid: give {want}.")


def check_threshold(threshold) -> None:
  """--threshold (generate and eval): None or a number in [0, 1]. Sigmoid router scores lie in (0, 1); tanh / none
  routers continue at score >= 0 and do not read it."""
  import math  # pylint: disable=g-import-not-at-top
  ok = threshold is None or (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 <= threshold <= 1)
  _check_number("threshold", threshold, ok, "a number in [0, 1] (an expert-choice sigmoid router's score threshold)")


def parse_prompt_ids(value) -> list[int] | None:
  """--prompt_ids: comma-separated token ids >= 0 (None: not given)."""
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  if value is None:
    return None
  try:
    ids = [int(x) for x in str(value).split(",") if x.strip()]
  except ValueError:
    ids = []
  if not ids or min(ids) < 0:
    raise InferenceError(f"--prompt_ids={value} is not valid: give comma-separated token ids >= 0 (e.g. "
                         "--prompt_ids=1,2,3).")
  return ids


def check_flags(*, prompts_file=None, output_file=None, max_new_tokens=256, temperature=0.8, top_k=0, top_p=1.0,
                threshold=None, step=None, kv_capacity="full", batch_size=16, **unused):
  """Checks the generate flags before anything heavy runs; raises InferenceError naming the flag and the fix.

  Returns the parsed kv capacity.
  """
  from mor_jax.infer.sampling import check_sampling  # pylint: disable=g-import-not-at-top
  check_sampling(temperature, top_k, top_p, prefix="--")
  _check_number("max_new_tokens", max_new_tokens, isinstance(max_new_tokens, int) and max_new_tokens >= 1,
                "an integer >= 1")
  _check_number("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1, "an integer >= 1")
  _check_number("step", step, step is None or (isinstance(step, int) and step >= 0),
                "a checkpoint step >= 0 (or leave it out for the latest)")
  check_threshold(threshold)
  if output_file:
    _check_output_file(output_file)
  return parse_kv_capacity(kv_capacity)


def _check_output_file(path: str) -> None:
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise InferenceError(f"--output_file={path} is a directory; give a file path (e.g. {os.path.join(path, 'out.jsonl')}).")
  if not os.path.isdir(folder):
    raise InferenceError(f"--output_file={path}: the folder {folder} does not exist; create it first or write "
                         "elsewhere.")
  if not os.access(folder, os.W_OK):
    raise InferenceError(f"--output_file={path}: the folder {folder} is not writable; write elsewhere.")


def _enable_compilation_cache() -> None:
  """Persistent XLA cache: a second generate call starts without recompiling (MOR_JAX_COMPILE_CACHE='' turns it off)."""
  import jax  # pylint: disable=g-import-not-at-top
  path = os.environ.get("MOR_JAX_COMPILE_CACHE", os.path.expanduser("~/.cache/mor_jax/xla"))
  if not path:
    return
  try:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  except Exception:  # pylint: disable=broad-except
    pass


def _check_against_model(cfg, kv_capacity, threshold, err) -> None:
  """The flags that depend on the restored model: kv fractions per recursion; a threshold the router ignores."""
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  if isinstance(kv_capacity, tuple) and len(kv_capacity) != cfg.recursions:
    raise InferenceError(f"--kv_capacity has {len(kv_capacity)} fractions but the model runs {cfg.recursions} "
                         f"recursions: give {cfg.recursions} (one per recursion), 'full' or 'routed'.")
  if threshold is not None and not (cfg.mor_enable and cfg.mor_type == "expert" and cfg.router_func == "sigmoid"):
    print("note: --threshold applies to expert-choice sigmoid routers only; this model does not read it.", file=err)


def main_generate(config, workdir: str, *, prompt: str | None = None, interactive: bool = False,
                  prompts_file: str | None = None, output_file: str | None = None, max_new_tokens: int = 256,
                  temperature: float = 0.8, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                  threshold: float | None = None, step: int | None = None, stop: Sequence[str] = (),
                  kv_capacity="full", batch_size: int = 16, tokenizer: str | None = None,
                  prompt_ids: str | Sequence[int] | None = None, chat: bool = False, dtype: str = "float32",
                  ignore_eos: bool = False,
                  stdout: TextIO | None = None,
                  stderr: TextIO | None = None, stdin: TextIO | None = None):
  """The generate command. `config` may be None (the checkpoint's own config is used).

  Returns the list of Generation results (all prompts; the loop's too).
  """
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.prompts import read_prompts_file, unescape  # pylint: disable=g-import-not-at-top
  out, err = stdout or sys.stdout, stderr or sys.stderr
  if not workdir:
    raise InferenceError("--workdir is required for --mode=generate (the training workdir or a checkpoint directory).")
  modes = sum([prompt is not None, bool(interactive), bool(prompts_file), prompt_ids is not None])
  if modes != 1:
    raise InferenceError("give exactly one of --prompt, --prompt_ids, --prompts_file or --interactive.")
  if chat and prompt_ids is not None:
    raise InferenceError("--chat needs text prompts (the chat template is text); use --prompt instead of --prompt_ids.")
  ids = parse_prompt_ids(",".join(map(str, prompt_ids)) if isinstance(prompt_ids, (list, tuple)) else prompt_ids)
  # fail fast, before loading anything
  kv_capacity = check_flags(output_file=output_file, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, threshold=threshold, step=step, kv_capacity=kv_capacity,
                            batch_size=batch_size)
  prompts = read_prompts_file(prompts_file) if prompts_file else None
  stop = tuple(unescape(s) for s in (stop or ()))
  from mor_jax.infer.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  sampling = SamplingParams(float(temperature), int(top_k), float(top_p))
  gen, tok_path = _load_generator(config, workdir, step=step, tokenizer=tokenizer, by_ids=ids is not None,
                                  threshold=threshold, kv_capacity=kv_capacity, dtype=dtype, err=err)
  wrap = _chat_wrapper(tok_path) if chat else None
  if ids is not None:
    if stop:
      raise InferenceError("--stop needs a tokenizer (strings); leave it out with --prompt_ids.")
    return [_one_ids(gen, out, err, ids, seed=seed, max_new_tokens=max_new_tokens, sampling=sampling)]
  one = functools.partial(_one, gen, out, err, dict(max_new_tokens=max_new_tokens, sampling=sampling, stop=stop,
                                                    stop_at_eos=not ignore_eos),
                          echo=not chat)
  if prompt is not None:
    return [one(wrap([_user(unescape(prompt))]) if chat else unescape(prompt), seed)]
  if prompts_file:
    return _run_file(gen, [wrap([_user(p)]) for p in prompts] if chat else prompts, output_file, out, err,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop=stop)
  return _interactive(_Conversation(one, wrap) if chat else one, seed, err, stdin)


def _user(text: str) -> dict:
  return {"role": "user", "content": text}


def _chat_wrapper(tok_path):
  """messages -> prompt text with the model's chat template (checked now: a model without one fails here)."""
  from mor_jax.infer.prompts import chat_settings, render_chat  # pylint: disable=g-import-not-at-top
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


def _load_generator(config, workdir, *, step, tokenizer, by_ids, threshold, kv_capacity, err, dtype="float32"):
  """Restores the model and its tokenizer (none for --prompt_ids unless --tokenizer is given)."""
  from mor_jax.infer import checkpoint as infer_ckpt  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.generate import Generator  # pylint: disable=g-import-not-at-top
  _enable_compilation_cache()
  t0 = time.time()
  restored = infer_ckpt.restore(workdir, step=step, config=config)
  tok = None
  if tokenizer or not by_ids:
    tok = infer_ckpt.load_tokenizer(restored.config, restored.cfg, directory=restored.directory, override=tokenizer)
  _check_against_model(restored.cfg, kv_capacity, threshold, err)
  gen = Generator(restored.cfg, restored.variables, tok, threshold=threshold, kv_capacity=kv_capacity,
                  add_bos=bool(restored.config.data.get("add_bos", False)) and not by_ids, dtype=dtype)
  print(f"[{infer_ckpt.describe(restored)}; loaded in {time.time() - t0:.1f}s]", file=err, flush=True)
  return gen, infer_ckpt.tokenizer_source(restored.config, directory=restored.directory, override=tokenizer)


def _one_ids(gen, out, err, ids, *, seed: int, **kw):
  """--prompt_ids: the generated ids on `out`, one comma-separated line (the text too when a tokenizer is given)."""
  res = gen.generate([list(ids)], seed=seed, **kw)[0]
  print(",".join(str(i) for i in res.tokens), file=out, flush=True)
  if gen.tokenizer is not None:
    print(repr(res.text), file=err, flush=True)
  print(f"[{len(res.tokens)} tokens; finish: {res.finish_reason}; mean recursions per token "
        f"{res.mean_recursions:.2f} of {gen.cfg.recursions}]", file=err, flush=True)
  return res


_COMPILED = {"seconds": 0.0}          # XLA compilation time of this process (persistent-cache hits add nothing)


@functools.cache
def _track_compilation() -> None:
  import jax  # pylint: disable=g-import-not-at-top

  def listener(event, seconds, **unused):
    if event == "/jax/core/compile/backend_compile_duration":
      _COMPILED["seconds"] += seconds
  jax.monitoring.register_event_duration_secs_listener(listener)


def rate_note(tokens: int, seconds: float, compiled: float) -> str:
  """'N tokens/s', and when XLA compiled during the call, the rate with and without the compilation time."""
  rate = f"{tokens / max(seconds, 1e-9):.1f} tokens/s"
  if compiled <= 0:
    return rate
  steady = max(seconds - compiled, 1e-9)
  return f"{rate} incl. {compiled:.1f}s compilation; {tokens / steady:.1f} tokens/s without it"


def _one(gen, out, err, kw: dict, text: str, seed: int, echo: bool = True):
  """One prompt, streamed to `out` (after the prompt itself when `echo`); timing and depth on `err`."""
  gen.encode([text])   # errors (empty, too long) before anything is printed
  if echo:
    print(text, end="", file=out, flush=True)
  _track_compilation()
  t, c = time.time(), _COMPILED["seconds"]
  res = gen.generate([text], seed=seed, on_text=lambda _, s: print(s, end="", file=out, flush=True), **kw)[0]
  dt = time.time() - t
  print("", file=out, flush=True)
  print(f"[{len(res.tokens)} tokens in {dt:.2f}s ({rate_note(len(res.tokens), dt, _COMPILED['seconds'] - c)}); "
        f"finish: {res.finish_reason}; mean recursions per token {res.mean_recursions:.2f} of "
        f"{gen.cfg.recursions}]", file=err, flush=True)
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


def _interactive(one, seed: int, err, stdin):
  """--interactive: a prompt loop (the seed advances per turn); errors are reported and the loop goes on."""
  from mor_jax.infer.errors import InferenceError  # pylint: disable=g-import-not-at-top
  from mor_jax.infer.prompts import unescape  # pylint: disable=g-import-not-at-top
  use_input = stdin is None and sys.stdin.isatty()   # a terminal: line editing via input()
  stdin = stdin or sys.stdin
  print("Enter a prompt (\\n for a new line); :quit or Ctrl-D ends, Ctrl-C stops a generation.", file=err, flush=True)
  results, turn = [], 0
  while True:
    if use_input:
      try:
        line = input(">>> ") + "\n"
      except EOFError:
        line = ""
    else:
      print(">>> ", end="", file=err, flush=True)
      line = stdin.readline()
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
