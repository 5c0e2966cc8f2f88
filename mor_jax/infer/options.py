"""The options of `--mode=generate` and `--mode=serve`, each declared once, and the checks they share.

A command's options are a frozen dataclass; each field carries the option's default and, in its metadata, the
absl flag kind and help text. From that one declaration come the absl flags (`define_flags`), the options of a
command-line run (`from_flags`) and those of a Python call (`from_keywords`: a mistyped keyword is an error that
names it). `DecodeOptions` holds the options both commands read (one flag each, whichever command defines it
first); `GenerateOptions` adds generate's, `ServeOptions` (mor_jax/serve/options.py) serve's.

No JAX here: main.py defines the flags at import time, and the checks run before anything is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
from typing import Sequence

from mor_jax.infer.errors import InferenceError

DTYPES = ("float32", "bfloat16")     # the dtypes decoding runs in (mor_jax/infer/weights.py)


def option(default, kind: str, help: str, *, choices: Sequence[str] = ()):  # noqa: A002 (absl's name)
  """A dataclass field that is also an absl flag: kind is string | bool | integer | float | multi_string | enum."""
  return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "choices": tuple(choices)})


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """The options generate and serve share (and eval reads --step, --threshold and --tokenizer)."""
  threshold: float | None = option(None, "float", "generate: expert-choice router threshold (default: "
                                   "config.mor.threshold).")
  step: int | None = option(None, "integer", "generate: checkpoint step to load (default: the latest).")
  kv_capacity: str | tuple = option("full", "string", "generate: KV cache size per recursion: full | routed | "
                                    "comma-separated fractions (see mor_jax/infer/cache.py).")
  dtype: str = option("float32", "enum", "generate/serve: dtype of the weights and KV caches while decoding "
                      "(bfloat16: half the bytes read per token; norms, routers, softmax and logits stay float32; "
                      "see docs/inference.md for its accuracy cost).", choices=DTYPES)
  ignore_eos: bool = option(False, "bool", "generate/serve: every request generates max_new_tokens / max_tokens "
                            "(EOS does not end it; for benchmarks and load tests).")
  tokenizer: str | None = option(None, "string", "generate/eval: the model's tokenizer (tokenizer.json or a Hugging "
                                 "Face tokenizer folder); default: the workdir's tokenizer/, then the stored config's.")


@dataclasses.dataclass(frozen=True)
class GenerateOptions(DecodeOptions):
  """`--mode=generate` (mor_jax/infer/cli.py)."""
  prompt: str | None = option(None, "string", "generate: one prompt (\\n and \\t escapes are expanded).")
  interactive: bool = option(False, "bool", "generate: read prompts in a loop (Ctrl-D or :quit ends).")
  prompts_file: str | None = option(None, "string", "generate: prompts, one per line (.jsonl: JSON per line).")
  output_file: str | None = option(None, "string", "generate: JSONL results for --prompts_file (default stdout).")
  max_new_tokens: int = option(256, "integer", "generate: tokens to generate per prompt at most.")
  temperature: float = option(0.8, "float", "generate: sampling temperature (0 = greedy).")
  top_k: int = option(0, "integer", "generate: sample from the k most likely tokens (0 = off).")
  top_p: float = option(1.0, "float", "generate: nucleus sampling mass (1.0 = off).")
  seed: int = option(0, "integer", "generate: sampling seed.")
  stop: Sequence[str] = option((), "multi_string", "generate: stop string (repeatable); the text ends before it.")
  batch_size: int = option(16, "integer", "generate: prompts per batch for --prompts_file.")
  prompt_ids: str | Sequence[int] | None = option(None, "string", "generate: a prompt as token ids (e.g. 1,2,3), "
                                                  "for a model without a tokenizer; prints the generated ids.")
  chat: bool = option(False, "bool", "generate: wrap prompts in the model's chat template (tokenizer_config.json), "
                      "print only the answer, stop at the end of the turn; --interactive keeps the conversation.")


SHARED = frozenset(f.name for f in dataclasses.fields(DecodeOptions))


def defaults(cls) -> dict:
  """{name: default} of an options class."""
  return {f.name: f.default for f in dataclasses.fields(cls)}


def define_flags(cls, flags) -> None:
  """Defines an absl flag per field of `cls` (a shared one only if no other command defined it yet)."""
  for f in dataclasses.fields(cls):
    if f.name in SHARED and f.name in flags.FLAGS:
      continue
    kind, text = f.metadata["kind"], f.metadata["help"]
    if kind == "enum":
      flags.DEFINE_enum(f.name, f.default, list(f.metadata["choices"]), text)
    elif kind == "multi_string":
      flags.DEFINE_multi_string(f.name, list(f.default), text)
    else:
      getattr(flags, f"DEFINE_{kind}")(f.name, f.default, text)


def from_flags(cls, values):
  """The options of a command-line run: `values` is absl's FLAGS after parsing."""
  kw = {f.name: values[f.name].value for f in dataclasses.fields(cls)}
  kw.update({f.name: tuple(kw[f.name] or ()) for f in dataclasses.fields(cls) if f.metadata["kind"] == "multi_string"})
  return cls(**kw)


def from_keywords(cls, kw: dict, command: str, base=None):
  """`base` (default: the defaults) with `kw` replaced; a keyword that is no option raises InferenceError naming it."""
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(kw) - set(names))
  if unknown:
    close = difflib.get_close_matches(unknown[0], names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    what = "is not an option" if len(unknown) == 1 else "are not options"
    raise InferenceError(f"{command}: {', '.join(map(repr, unknown))} {what}{hint}; its options are "
                         f"{', '.join(sorted(names))}.")
  return dataclasses.replace(cls() if base is None else base, **kw)


# ------------------------------------------------------------------ checks (one line naming the flag and the fix)
def check_number(flag: str, value, ok: bool, want: str) -> None:
  if not ok:
    raise InferenceError(f"--{flag}={value} is not valid: give {want}.")


def check_threshold(threshold) -> None:
  """--threshold (generate, serve and eval): None or a number in [0, 1]. Sigmoid router scores lie in (0, 1); tanh /
  none routers continue at score >= 0 and do not read it."""
  ok = threshold is None or (isinstance(threshold, (int, float)) and math.isfinite(threshold) and 0 <= threshold <= 1)
  check_number("threshold", threshold, ok, "a number in [0, 1] (an expert-choice sigmoid router's score threshold)")


def check_sampling(temperature, top_k, top_p, *, prefix: str = "") -> None:
  """Raises InferenceError naming the first bad value (`prefix` + name, e.g. '--temperature') and the fix."""
  if not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) or temperature < 0:
    raise InferenceError(f"{prefix}temperature must be a finite number >= 0 (0 = greedy), got {temperature}.")
  if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
    raise InferenceError(f"{prefix}top_k must be an integer >= 0 (0 = off), got {top_k}.")
  if not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:   # (NaN fails the comparison too)
    raise InferenceError(f"{prefix}top_p must be in (0, 1] (1 = off), got {top_p}.")


def parse_kv_capacity(value):
  """--kv_capacity: 'full', 'routed' or comma-separated fractions in (0, 1] (one per recursion)."""
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


def check_decode(options: DecodeOptions):
  """The shared options' checks; returns the parsed kv capacity."""
  step = options.step
  check_number("step", step, step is None or (isinstance(step, int) and step >= 0),
               "a checkpoint step >= 0 (or leave it out for the latest)")
  check_threshold(options.threshold)
  return parse_kv_capacity(options.kv_capacity)


def parse_prompt_ids(value) -> list[int] | None:
  """--prompt_ids: comma-separated token ids >= 0 (None: not given)."""
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


def check_output_file(path: str) -> None:
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise InferenceError(f"--output_file={path} is a directory; give a file path (e.g. "
                         f"{os.path.join(path, 'out.jsonl')}).")
  if not os.path.isdir(folder):
    raise InferenceError(f"--output_file={path}: the folder {folder} does not exist; create it first or write "
                         "elsewhere.")
  if not os.access(folder, os.W_OK):
    raise InferenceError(f"--output_file={path}: the folder {folder} is not writable; write elsewhere.")
