"""The generate and serve options are declared once (options.GenerateOptions, serve.options.ServeOptions): the absl
flags main.py defines carry exactly those defaults and help texts, and a Python call with a keyword that is no
option fails in one line naming it (issue 37)."""

import dataclasses
import functools

import pytest
from absl import flags as absl_flags

from mor_jax import serve
from mor_jax.infer import cli
from mor_jax.infer import options
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.options import DecodeOptions, GenerateOptions
from mor_jax.serve.options import FLAG_DEFAULTS, ServeOptions


class FreshFlags:
  """absl's flags module, defining onto a new FlagValues (main.py's global FLAGS stays untouched)."""

  def __init__(self):
    self.FLAGS = absl_flags.FlagValues()

  def __getattr__(self, name):
    return functools.partial(getattr(absl_flags, name), flag_values=self.FLAGS)


def defined(*define_fns) -> absl_flags.FlagValues:
  fresh = FreshFlags()
  for define in define_fns:
    define(fresh)
  fresh.FLAGS(["main.py"])
  return fresh.FLAGS


@pytest.mark.parametrize("order", ["generate first", "serve first"])
def test_every_flag_default_and_help_is_the_options_declaration(order):
  fns = (cli.define_flags, serve.define_flags)
  values = defined(*(fns if order == "generate first" else fns[::-1]))
  names = {f.name for cls in (GenerateOptions, ServeOptions) for f in dataclasses.fields(cls)}
  assert set(values) == names                 # one flag per option; the shared ones defined once
  for cls in (GenerateOptions, ServeOptions):
    for f in dataclasses.fields(cls):
      flag = values[f.name]
      want = list(f.default) if f.metadata["kind"] == "multi_string" else f.default
      assert flag.default == want, f.name
      assert f.metadata["help"] in flag.help, f.name      # (absl adds an enum's choices, a list's "repeat ...")
    assert options.from_flags(cls, values) == cls()      # what run_from_flags passes without flags: the defaults


def test_flags_parse_into_the_options():
  values = defined(cli.define_flags, serve.define_flags)
  values(["main.py", "--stop=A", "--stop=B", "--temperature=0", "--dtype=bfloat16", "--port=0", "--noignore_eos"])
  gen = options.from_flags(GenerateOptions, values)
  assert gen == GenerateOptions(stop=("A", "B"), temperature=0.0, dtype="bfloat16")
  assert options.from_flags(ServeOptions, values) == ServeOptions(port=0, dtype="bfloat16")


def test_shared_options_and_derived_defaults():
  shared = {f.name for f in dataclasses.fields(DecodeOptions)}
  assert shared == {"threshold", "step", "kv_capacity", "dtype", "ignore_eos", "tokenizer"}
  assert FLAG_DEFAULTS == {f.name: f.default for f in dataclasses.fields(ServeOptions)}
  assert FLAG_DEFAULTS["slots"] == 16 and FLAG_DEFAULTS["step_tokens"] == 4    # benchmarks/serve_load.py reads these
  with pytest.raises(dataclasses.FrozenInstanceError):
    GenerateOptions().seed = 1


@pytest.mark.parametrize("call,typo,right", [
    (lambda wd: cli.main_generate(None, wd, prompt="hi", max_new_token=5), "max_new_token", "max_new_tokens"),
    (lambda wd: cli.main_generate(None, wd, prompt="hi", temprature=0.0), "temprature", "temperature"),
    (lambda wd: serve.main_serve(None, wd, prot=8001), "prot", "port"),
    (lambda wd: serve.main_serve(None, wd, slot=2), "slot", "slots"),
])
def test_a_mistyped_keyword_fails_in_one_line_naming_it(tmp_path, call, typo, right):
  with pytest.raises(InferenceError) as e:
    call(str(tmp_path / "no_such_workdir"))       # refused before the workdir is looked at
  msg = str(e.value)
  assert "\n" not in msg and f"'{typo}' is not an option (did you mean '{right}'?)" in msg, msg
  assert msg.startswith(("main_generate: ", "main_serve: ")) and f" {right}," in msg    # the known options listed


def test_options_object_and_keywords_combine(tmp_path):
  base = GenerateOptions(prompt="hi", temperature=float("nan"))
  with pytest.raises(InferenceError, match="--temperature must be a finite number"):
    cli.main_generate(None, str(tmp_path), base)
  with pytest.raises(InferenceError, match="no_such_workdir"):      # the keyword replaced the bad value
    cli.main_generate(None, str(tmp_path / "no_such_workdir"), base, temperature=0.0)
