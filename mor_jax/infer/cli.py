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
from Python: `main_generate(config, workdir, prompt="ROMEO:")` (the keywords
are the fields of `options.GenerateOptions`, where each flag's default and
help are declared once; a keyword that is none of them is refused).

Prompts on the command line and in the loop may contain the escapes \\n and
\\t. A prompts file holds one prompt per line (blank lines are skipped), or,
if it ends in .jsonl, one JSON string or {"prompt": ...} object per line.
Results go to `output_file` (or stdout) as JSON lines, in input order.
"""

from __future__ import annotations

from typing import TextIO

from absl import flags as absl_flags

from mor_jax.infer import options as options_lib
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.options import GenerateOptions
from mor_jax.infer.prompts import read_prompts_file, unescape


def define_flags(flags=None) -> None:
  """Defines the generate-mode flags on absl's FLAGS (call once, at import time of main.py)."""
  options_lib.define_flags(GenerateOptions, flags or absl_flags)


def run_from_flags(config, workdir):
  """Calls main_generate with the values of the flags define_flags() made."""
  return main_generate(config, workdir, options_lib.from_flags(GenerateOptions, absl_flags.FLAGS))


def check_flags(options: GenerateOptions):
  """Checks the generate options before anything heavy runs; raises InferenceError naming the flag and the fix.

  Returns the parsed kv capacity.
  """
  o = options
  options_lib.check_sampling(o.temperature, o.top_k, o.top_p, prefix="--")
  options_lib.check_number("max_new_tokens", o.max_new_tokens, isinstance(o.max_new_tokens, int) and
                           o.max_new_tokens >= 1, "an integer >= 1")
  options_lib.check_number("batch_size", o.batch_size, isinstance(o.batch_size, int) and o.batch_size >= 1,
                           "an integer >= 1")
  kv_capacity = options_lib.check_decode(o)
  if o.output_file:
    options_lib.check_output_file(o.output_file)
  return kv_capacity


def main_generate(config, workdir: str, options: GenerateOptions | None = None, *, stdout: TextIO | None = None,
                  stderr: TextIO | None = None, stdin: TextIO | None = None, **kw):
  """The generate command. `config` may be None (the checkpoint's own config is used); the options are `options`
  (default: GenerateOptions()) with the keywords `kw` replaced (names of GenerateOptions fields).

  Returns the list of Generation results (all prompts; the loop's too).
  """
  o = options_lib.from_keywords(GenerateOptions, kw, "main_generate", base=options)
  if not workdir:
    raise InferenceError("--workdir is required for --mode=generate (the training workdir or a checkpoint directory).")
  modes = sum([o.prompt is not None, bool(o.interactive), bool(o.prompts_file), o.prompt_ids is not None])
  if modes != 1:
    raise InferenceError("give exactly one of --prompt, --prompt_ids, --prompts_file or --interactive.")
  if o.chat and o.prompt_ids is not None:
    raise InferenceError("--chat needs text prompts (the chat template is text); use --prompt instead of --prompt_ids.")
  listed = isinstance(o.prompt_ids, (list, tuple))     # ids from Python; the flag gives "1,2,3"
  ids = options_lib.parse_prompt_ids(",".join(map(str, o.prompt_ids)) if listed else o.prompt_ids)
  stop = tuple(unescape(s) for s in (o.stop or ()))
  if ids is not None and stop:
    raise InferenceError("--stop needs a tokenizer (strings); leave it out with --prompt_ids.")
  # fail fast, before loading anything
  kv_capacity = check_flags(o)
  prompts = read_prompts_file(o.prompts_file) if o.prompts_file else None
  # JAX and the model code are imported only now: main.py defines the flags without them (it re-executes itself
  # for huge pages before JAX starts: mor_jax/runtime.py)
  from mor_jax.infer import runner  # pylint: disable=g-import-not-at-top
  return runner.run(config, workdir, o, kv_capacity=kv_capacity, ids=ids, prompts=prompts, stop=stop,
                    out=stdout, err=stderr, stdin=stdin)
