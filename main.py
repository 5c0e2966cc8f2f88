"""mor-jax command line.

  python main.py --config=configs/shakespeare_mor.py --workdir=W           # train (resumes if W has checkpoints)
  python main.py --config=configs/smollm360_rec2.py --mode=info             # parameters, FLOPs, step memory
  python main.py --mode=info --workdir=W                                     # ... of a workdir's model
  python main.py --config=configs/smollm360_rec2.py --mode=prepare          # build corpus, tokenizer, shards
  python main.py --mode=generate --workdir=W --prompt="ROMEO:"               # sample from the latest checkpoint
  python main.py --mode=eval --workdir=W                                     # validation NLL, top-k and causal routing
  python main.py --mode=import --import_from=REF_OUTPUT_DIR --workdir=W      # PyTorch-reference / HF / GGUF -> Orbax
  python main.py --mode=export_hf --workdir=W --export_to=HF_DIR             # -> Hugging Face LlamaForCausalLM
  python main.py --mode=serve --workdir=W --port=8000                        # OpenAI-compatible HTTP server + page

Config fields can be overridden on the command line: --config.train.num_steps=100.
Everything below is importable: `mor_jax.train.train_and_evaluate(config, workdir)` does the same from a notebook.

Exit codes, the same for every mode (docs/run-safety.md; `EXIT_CODES` below is the one place that maps them):
  0    done (a training run is complete, or was already complete)
  75   --mode=train interrupted (SIGTERM/SIGINT) or paused (train.max_steps_per_run): a checkpoint was saved, run the
       same command again to continue (EX_TEMPFAIL)
  1    an error, in one line on stderr naming the flag, field or file and the fix (a `mor_jax.errors.MorJaxError`:
       bad flag or config, data, workdir locked or of another model, unreadable or incomplete checkpoints,
       non-finite loss, a checkpoint or result that could not be written, out of device memory; or an OSError)
  130  aborted by a second SIGINT (Ctrl-C twice): stopped at once, nothing saved after the last checkpoint (the
       report says 'aborted'); running the same command again resumes from that checkpoint
"""

from __future__ import annotations

import dataclasses
import logging as pylogging
import os
import re
import sys
from typing import Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mor_jax import runtime
from mor_jax.errors import MorJaxError
from mor_jax.infer import cli as infer_cli
from mor_jax import serve as serve_lib

EXIT_OK, EXIT_ERROR, EXIT_AGAIN, EXIT_ABORTED = 0, 1, 75, 130
# report status -> exit code of --mode=train
STATUS_EXIT = {"completed": EXIT_OK, "interrupted": EXIT_AGAIN, "paused": EXIT_AGAIN}
# error type -> exit code, the same for every mode
EXIT_CODES = ((MorJaxError, EXIT_ERROR), (OSError, EXIT_ERROR), (KeyboardInterrupt, EXIT_ABORTED))

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard events and the report.")
flags.DEFINE_string("mode", "train", "What to do: train | eval | generate | info | prepare | import | export_hf | "
                    "serve.")
flags.DEFINE_integer("eval_batches", None, "eval: validation batches to score (default: the whole split).")
flags.DEFINE_string("import_from", None, "import: a PyTorch-reference training output or Hugging Face Llama directory, "
                    "or a llama.cpp .gguf file of a Llama-architecture model (weights, tokenizer, chat template).")
flags.DEFINE_string("import_run_config", None, "import: the run's YAML (recursive/mor/kv_sharing settings), when the "
                    "directory holds several or none.")
flags.DEFINE_string("export_to", None, "export_hf: the Hugging Face directory to write.")
flags.DEFINE_bool("info_memory", True, "info: also compile (not run) the train step on this backend and print its "
                  "per-device memory; --noinfo_memory prints parameters and FLOPs only.")
infer_cli.define_flags()  # --prompt, --prompts_file, --step, --threshold, ... (generate; eval uses --step/--threshold)
serve_lib.define_flags()  # --host, --port, --slots, --max_queue, ... (serve; it reuses --tokenizer/--step/--threshold)
FLAGS = flags.FLAGS


class UsageProblem(MorJaxError):
  """A flag is missing or does not fit the mode."""


# ------------------------------------------------------------------ the modes
def run_train(config, workdir: str) -> int:
  """--mode=train: the run, one line for the user, and the exit code (see the module docstring)."""
  from mor_jax import distributed  # several processes (config.distributed, JAX_COORDINATOR_ADDRESS, SLURM):
  from mor_jax import train         # before any device use
  from mor_jax.interop import pretrained_init
  distributed.initialize(config)
  distributed.quiet_other_processes()   # logs and reports come from process 0
  config, init_params_fn = pretrained_init.resolve(config, workdir)   # config.init: the entry point's, not train's
  report = train.train_and_evaluate(config, workdir, init_params_fn=init_params_fn)
  code = STATUS_EXIT.get(report["status"], EXIT_ERROR)
  again = "; run the same command again to continue" if code == EXIT_AGAIN else ""
  print(f"{report['status']}: step {report['steps_completed']}/{report['num_steps']}{again}; report in "
        f"{os.path.join(workdir, 'report.md')}" + (f" ({report['message']})" if code == EXIT_ERROR else ""))
  return code


def run_info(config, workdir: str | None) -> int:
  """--mode=info: --config, or --workdir alone (the config stored with its newest / --step checkpoint)."""
  from mor_jax.checkpoint import params as ckpt_params
  from mor_jax.model import accounting
  from mor_jax.train import memory_info
  if config is None and not workdir:
    raise UsageProblem("--config is required for --mode=info (or --workdir=W: the config stored with its checkpoint).")
  print(accounting.summary(config) if config is not None else ckpt_params.workdir_summary(workdir, FLAGS.step))
  if FLAGS.info_memory:     # the train step compiled for this backend: the config's (or the stored run's) batch
    run_config = config if config is not None else ckpt_params.workdir_config(workdir, FLAGS.step)[1]
    print(memory_info.memory_summary(run_config), flush=True)
  return EXIT_OK


def run_prepare(config, workdir: str | None) -> int:
  from mor_jax import data
  from mor_jax.checkpoint import params as ckpt_params
  prepared = data.prepare(config)
  print(prepared)
  if workdir:                   # the workdir carries its model's tokenizer (WORKDIR/tokenizer/)
    ckpt_params.store_tokenizer(workdir, prepared.tokenizer_path)
  return EXIT_OK


def run_eval(config, workdir: str) -> int:
  from mor_jax.evaluate import main_eval
  main_eval(config, workdir, step=FLAGS.step, threshold=FLAGS.threshold, batches=FLAGS.eval_batches,
            tokenizer=FLAGS.tokenizer)
  return EXIT_OK


def run_import(config, workdir: str) -> int:
  from mor_jax.interop import gguf, importer
  if not FLAGS.import_from:
    raise UsageProblem("--mode=import needs --import_from=DIR (the checkpoint) and --workdir=OUT (to write).")
  if FLAGS.import_from.lower().endswith(".gguf"):
    gguf.import_gguf(FLAGS.import_from, workdir, config=config)
  else:
    importer.import_reference(FLAGS.import_from, workdir, config=config, run_config=FLAGS.import_run_config)
  return EXIT_OK


def run_export(config, workdir: str) -> int:
  from mor_jax.interop import exporter
  exporter.main_export(workdir, FLAGS.export_to, step=FLAGS.step, config=config)
  return EXIT_OK


def run_generate(config, workdir: str | None) -> int:
  infer_cli.run_from_flags(config, workdir)     # issue 34: its flags' defaults move into one place there
  return EXIT_OK


def run_serve(config, workdir: str | None) -> int:
  return serve_lib.run_from_flags(config, workdir) or EXIT_OK


@dataclasses.dataclass(frozen=True)
class Mode:
  run: Callable[..., int]        # (config or None, workdir or None) -> exit code
  needs_config: bool             # --config is required
  needs_workdir: bool            # --workdir is required
  model_config: bool = False     # a --config describes the workdir's model: checked (model fields) before the mode


MODES = {
    "train": Mode(run_train, needs_config=True, needs_workdir=True),
    "eval": Mode(run_eval, needs_config=False, needs_workdir=True, model_config=True),
    "generate": Mode(run_generate, needs_config=False, needs_workdir=False, model_config=True),   # (names --workdir)
    "info": Mode(run_info, needs_config=False, needs_workdir=False),           # --config or --workdir
    "prepare": Mode(run_prepare, needs_config=True, needs_workdir=False),
    "import": Mode(run_import, needs_config=False, needs_workdir=True),
    "export_hf": Mode(run_export, needs_config=False, needs_workdir=True, model_config=True),
    "serve": Mode(run_serve, needs_config=False, needs_workdir=False, model_config=True),   # (names --workdir)
}


def run_mode(name: str, config, workdir: str | None) -> int:
  """Runs one mode of the registry; every error becomes its exit code and one line on stderr (`EXIT_CODES`)."""
  try:
    mode = MODES.get(name)
    if mode is None:
      raise UsageProblem(f"--mode={name} is not a mode; choose one of {', '.join(MODES)}.")
    if mode.needs_config and config is None:
      raise UsageProblem(f"--config is required for --mode={name}.")
    if mode.needs_workdir and not workdir:
      raise UsageProblem(f"--workdir is required for --mode={name}.")
    if mode.model_config and config is not None:      # a bad override: one line before the mode loads anything
      from mor_jax.checkpoint import params as ckpt_params
      ckpt_params.inference_config(config)
    return mode.run(config, workdir)
  except BaseException as e:  # pylint: disable=broad-except
    code = next((c for kind, c in EXIT_CODES if isinstance(e, kind)), None)
    if code is None:
      raise
    print(error_line(e), file=sys.stderr)
    return code


def error_line(e: BaseException) -> str:
  if isinstance(e, KeyboardInterrupt):
    return ("aborted: a second SIGINT stopped the run at once; nothing was saved after the last checkpoint, "
            "running the same command again resumes from it.")
  if isinstance(e, OSError) and not isinstance(e, MorJaxError):
    return f"error: {type(e).__name__}: {e}"
  return f"error: {e}".splitlines()[0]


# ------------------------------------------------------------------ before absl
class _QuietLibraries(pylogging.Filter):
  """Drops Orbax's, TFDS's and matplotlib's routine INFO lines (each save, each dataset open, "generated new
  fontManager") and JAX's INFO note about each backend it probes and does not find ("Unable to initialize
  backend 'tpu': ... libtpu.so" on every machine without a TPU); warnings still show, without Orbax's tracebacks
  (a failed save is reported in one line by mor_jax.checkpoint). With --verbosity=1 (debug) everything shows."""

  def filter(self, record):
    library = any(name in record.pathname for name in ("orbax", "tensorflow_datasets", "matplotlib"))
    if library and record.exc_info:
      record.exc_info, record.exc_text = None, None
    if record.levelno >= pylogging.WARNING or logging.get_verbosity() >= logging.DEBUG:
      return True
    probe = "xla_bridge" in record.pathname and str(record.msg).startswith("Unable to initialize backend")
    return not (library or probe)


def check_config_path(argv: list[str]) -> str | None:
  """The one-line error for a --config file that does not exist (absl would say 'Failed loading config file')."""
  for i, arg in enumerate(argv):
    if arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith("--config="):
      value = arg.split("=", 1)[1]
    else:
      continue
    path = value.split(":", 1)[0]
    if not os.path.isfile(path):
      what = "is a directory" if os.path.isdir(path) else "does not exist"
      return f"error: --config: {path} {what}; pass a config file such as configs/shakespeare_mor.py."
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, each error in one line: a bad flag value (--config.train.num_steps=abc), or a mistyped
  config override (--config.train.num_stpes=5) with absl's "Did you mean" kept, instead of ml_collections'
  traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    print(f"error: {e}".splitlines()[0], file=sys.stderr)
    sys.exit(EXIT_ERROR)
  except (AttributeError, KeyError) as e:
    text = str(e).strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r'Did you mean "(\w+)"', text)
    flag = next((a.split("=", 1)[0] for a in argv if a.startswith("--config.") and key and
                 re.search(rf"\.{re.escape(key.group(1))}(=|$)", a.split("=", 1)[0])), "--config.<field>")
    fix = f'; did you mean "{flag.rsplit(".", 1)[0]}.{hint.group(1)}"?' if hint else "; see mor_jax/config/schema.py."
    print(f"error: {flag}: no such config field{fix}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  return run_mode(FLAGS.mode, FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  if (config_error := check_config_path(sys.argv[1:])) is not None:
    sys.exit(config_error)
  runtime.use_huge_pages()  # see mor_jax/runtime.py (page faults cost 20-30% of a CPU step otherwise)
  logging.set_verbosity(logging.INFO)
  sys.exit(app.run(main, flags_parser=parse_flags))
