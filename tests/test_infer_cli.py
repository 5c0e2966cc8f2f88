"""--mode=generate refuses bad input before it loads anything: one line naming the flag and the fix, exit status 1,
no traceback (issue 22 item 9)."""

import os
import subprocess
import sys

import pytest

from mor_jax.infer import cli
from mor_jax.infer import options
from mor_jax.infer.errors import InferenceError
from mor_jax.infer.options import GenerateOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def generate(tmp_path, **flags):
  """main_generate on a workdir that does not exist: a flag error must come first (before any restore)."""
  flags.setdefault("prompt", "hi")
  return cli.main_generate(None, str(tmp_path / "no_such_workdir"), **flags)


@pytest.mark.parametrize("flags,match", [
    (dict(temperature=float("nan")), r"--temperature must be a finite number >= 0 .*got nan"),
    (dict(temperature=-1.0), r"--temperature must be .*>= 0 .*got -1.0"),
    (dict(threshold=2.5), r"--threshold=2.5 .*\[0, 1\]"),
    (dict(threshold=float("nan")), r"--threshold=nan"),
    (dict(top_p=0.0), r"--top_p must be in \(0, 1\] .*got 0.0"),
    (dict(top_p=1.5), r"--top_p must be in \(0, 1\] .*got 1.5"),
    (dict(top_k=-1), r"--top_k must be an integer >= 0 .*got -1"),
    (dict(max_new_tokens=-3), r"--max_new_tokens=-3 .*>= 1"),
    (dict(max_new_tokens=0), r"--max_new_tokens=0"),
    (dict(batch_size=0), r"--batch_size=0"),
    (dict(kv_capacity="abc"), r"--kv_capacity=abc .*'full', 'routed' or comma-separated fractions"),
    (dict(kv_capacity="1,0,0.5"), r"--kv_capacity=1,0,0.5 .*\(0, 1\]"),
])
def test_bad_values_are_refused_naming_the_flag(tmp_path, flags, match):
  with pytest.raises(InferenceError, match=match):
    generate(tmp_path, **flags)


def test_prompts_and_output_files_are_checked_before_loading(tmp_path):
  binary = tmp_path / "prompts.bin"
  binary.write_bytes(bytes(range(256)) * 4)
  with pytest.raises(InferenceError, match=r"--prompts_file=.*prompts.bin is not UTF-8 text"):
    generate(tmp_path, prompt=None, prompts_file=str(binary))
  nul = tmp_path / "nul.txt"
  nul.write_bytes(b"ROMEO:\x00\x00\n")
  with pytest.raises(InferenceError, match="NUL bytes"):
    generate(tmp_path, prompt=None, prompts_file=str(nul))
  with pytest.raises(InferenceError, match=r"--prompts_file=.* is a directory"):
    generate(tmp_path, prompt=None, prompts_file=str(tmp_path))
  with pytest.raises(InferenceError, match=r"--prompts_file=.*missing.txt does not exist"):
    generate(tmp_path, prompt=None, prompts_file=str(tmp_path / "missing.txt"))
  good = tmp_path / "p.txt"
  good.write_text("ROMEO:\n\nJULIET:\n", encoding="utf-8")
  with pytest.raises(InferenceError, match=r"--output_file=.*the folder .*nope does not exist"):
    generate(tmp_path, prompt=None, prompts_file=str(good), output_file=str(tmp_path / "nope" / "out.jsonl"))
  with pytest.raises(InferenceError, match=r"--output_file=.* is a directory"):
    generate(tmp_path, prompt=None, prompts_file=str(good), output_file=str(tmp_path))
  # with good flags the next error is the workdir's (the checks above came first)
  with pytest.raises(InferenceError, match="no_such_workdir"):
    generate(tmp_path, prompt=None, prompts_file=str(good), output_file=str(tmp_path / "out.jsonl"))


def test_valid_values_pass():
  assert cli.check_flags(GenerateOptions()) == "full"
  good = GenerateOptions(kv_capacity="1,0.5,0.25", threshold=0.0, temperature=0.0, top_p=1.0, top_k=5)
  assert cli.check_flags(good) == (1.0, 0.5, 0.25)
  assert options.parse_kv_capacity("routed") == "routed"


@pytest.mark.parametrize("flag,match", [("--temperature=nan", "--temperature must be a finite number"),
                                        ("--kv_capacity=abc", "--kv_capacity=abc")])
def test_command_line_exits_1_with_one_line(tmp_path, flag, match):
  p = subprocess.run([sys.executable, "main.py", "--mode=generate", f"--workdir={tmp_path}", "--prompt=hi", flag],
                     cwd=ROOT, capture_output=True, text=True, timeout=300,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
  assert "Traceback" not in p.stderr
  last = p.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and match in last, p.stderr[-2000:]


def test_eval_refuses_a_bad_threshold_before_restoring(tmp_path):
  from mor_jax.evaluate import main_eval
  with pytest.raises(InferenceError, match=r"--threshold=2.5 .*\[0, 1\]"):
    main_eval(None, str(tmp_path / "no_such_workdir"), threshold=2.5)


def test_the_rate_without_compilation_takes_out_tracing_too():
  """The timing line's 'compilation' is JAX's whole preparation of a program: a function whose tracing takes
  0.3 s adds at least 0.3 s (XLA compilation alone would count milliseconds), and a second call adds nothing."""
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mor_jax.infer import compilation  # pylint: disable=g-import-not-at-top

  @jax.jit
  def slow_to_trace(x):
    time.sleep(0.3)
    return x * 2.0 + 1.0

  x = jnp.arange(7.0)
  jax.block_until_ready(x)
  c0 = compilation.compiled_seconds()
  slow_to_trace(x).block_until_ready()
  c1 = compilation.compiled_seconds()
  slow_to_trace(x).block_until_ready()
  assert c1 - c0 >= 0.3
  assert compilation.compiled_seconds() == c1
  assert compilation.rate_note(64, 4.0, 2.0) == "16.0 tokens/s incl. 2.0s compilation; 32.0 tokens/s without it"
  assert compilation.rate_note(64, 4.0, 0.0) == "16.0 tokens/s"
