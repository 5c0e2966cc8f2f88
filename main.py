"""mor-jax command line.

  python main.py --config=configs/shakespeare_mor.py --workdir=/tmp/mor           # train (resumes if WORKDIR has checkpoints)
  python main.py --config=configs/smollm360_rec2.py --mode=info                    # parameters, FLOPs, step memory
  python main.py --mode=info --workdir=/tmp/imported                                # ... of a workdir's model
  python main.py --config=configs/smollm360_rec2.py --mode=prepare                 # build corpus, tokenizer, shards
  python main.py --mode=generate --workdir=/tmp/mor --prompt="ROMEO:"               # sample from the latest checkpoint
  python main.py --mode=eval --workdir=/tmp/mor                                     # validation NLL, top-k and causal routing
  python main.py --mode=import --import_from=REF_OUTPUT_DIR --workdir=/tmp/imported # PyTorch-reference / HF checkpoint -> Orbax
  python main.py --mode=export_hf --workdir=/tmp/mor --export_to=/tmp/hf            # -> Hugging Face LlamaForCausalLM directory
  python main.py --mode=serve --workdir=/tmp/mor --port=8000                       # OpenAI-compatible HTTP server + web page

Config fields can be overridden on the command line: --config.train.num_steps=100.
Everything below is importable: `mor_jax.train.train_and_evaluate(config, workdir)` does the same from a notebook.

Exit codes of --mode=train (docs/run-safety.md):
  0   the run is complete (or was already complete)
  75  interrupted (SIGTERM/SIGINT) or paused (train.max_steps_per_run): a checkpoint was saved, run the same
      command again to continue (EX_TEMPFAIL)
  1   an error: bad config, workdir locked by another run, checkpoints of another model or unreadable,
      non-finite loss, a checkpoint that could not be written (disk full), the training data ran out,
      out of device memory (no micro-batch fits the budget, or RESOURCE_EXHAUSTED while running)
"""

import logging as pylogging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mor_jax import runtime
from mor_jax.infer import cli as infer_cli
from mor_jax import serve as serve_lib

MODES = ("train", "eval", "generate", "info", "prepare", "import", "export_hf", "serve")
EXIT_OK, EXIT_ERROR, EXIT_AGAIN = 0, 1, 75
# report status -> exit code of --mode=train
STATUS_EXIT = {"completed": EXIT_OK, "interrupted": EXIT_AGAIN, "paused": EXIT_AGAIN}

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard events and the report.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("eval_batches", None, "eval: validation batches to score (default: the whole split).")
flags.DEFINE_string("import_from", None, "import: a PyTorch-reference training output or Hugging Face Llama directory, "
                    "or a llama.cpp .gguf file of a Llama-architecture model (weights, tokenizer, chat template).")
flags.DEFINE_string("import_run_config", None, "import: the run's YAML (recursive/mor/kv_sharing settings), when the "
                    "directory holds several or none.")
flags.DEFINE_string("export_to", None, "export_hf: the Hugging Face directory to write.")
flags.DEFINE_bool("info_memory", True, "info: also compile (not run) the train step on this backend and print its "
                  "per-device memory; --noinfo_memory prints parameters and FLOPs only.")
infer_cli.define_flags()  # --prompt, --interactive, --prompts_file, --step, --threshold, ... (generate; eval uses --step/--threshold)
serve_lib.define_flags()  # --host, --port, --slots, --max_queue, ... (serve; it reuses --tokenizer/--step/--threshold)
FLAGS = flags.FLAGS


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


def run_training(config, workdir: str) -> int:
  """--mode=train: the run, one line for the user, and the exit code (see the module docstring)."""
  from mor_jax import checkpoint
  from mor_jax import config as config_lib
  from mor_jax import train
  from mor_jax.data import DataError
  try:
    report = train.train_and_evaluate(config, workdir)
  except (checkpoint.CheckpointError, config_lib.ConfigError, DataError, train.NonFiniteLossError,
          train.DeviceMemoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_ERROR
  except OSError as e:           # e.g. the workdir cannot be written
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return EXIT_ERROR
  code = STATUS_EXIT.get(report["status"], EXIT_ERROR)
  again = "; run the same command again to continue" if code == EXIT_AGAIN else ""
  print(f"{report['status']}: step {report['steps_completed']}/{report['num_steps']}{again}; report in "
        f"{os.path.join(workdir, 'report.md')}" + (f" ({report['message']})" if code == EXIT_ERROR else ""))
  return code


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  if config is None and FLAGS.mode not in ("generate", "eval", "import", "export_hf", "serve") and not (
      FLAGS.mode == "info" and FLAGS.workdir):
    raise app.UsageError(f"--config is required for --mode={FLAGS.mode}" +
                         (" (or --workdir=W: the config stored with its checkpoint)." if FLAGS.mode == "info" else "."))
  if FLAGS.mode == "train":     # several processes (config.distributed, JAX_COORDINATOR_ADDRESS, SLURM): before any device use
    from mor_jax import distributed
    distributed.initialize(config)
    distributed.quiet_other_processes()   # logs and reports come from process 0
  if FLAGS.mode == "info":      # --config, or --workdir alone: the config stored with its (newest / --step) checkpoint
    from mor_jax.model import accounting
    from mor_jax.train import fit, memory_info
    try:
      print(accounting.summary(config) if config is not None else accounting.workdir_summary(FLAGS.workdir, FLAGS.step))
      if FLAGS.info_memory:     # the train step compiled for this backend: the config's (or the stored run's) batch
        run_config = config if config is not None else accounting.workdir_config(FLAGS.workdir, FLAGS.step)[1]
        print(memory_info.memory_summary(run_config), flush=True)
    except (ValueError, fit.DeviceMemoryError) as e:   # CheckpointError, ConfigError: names what is wrong and the fix
      sys.exit(f"error: {e}")
  elif FLAGS.mode == "prepare":
    from mor_jax import data
    prepared = data.prepare(config)
    print(prepared)
    if FLAGS.workdir:            # the workdir carries its model's tokenizer (WORKDIR/tokenizer/)
      from mor_jax.checkpoint import params as ckpt_params
      ckpt_params.store_tokenizer(FLAGS.workdir, prepared.tokenizer_path)
  elif FLAGS.mode == "train":
    if not FLAGS.workdir:
      raise app.UsageError("--workdir is required for --mode=train.")
    return run_training(config, FLAGS.workdir)
  elif FLAGS.mode == "generate":
    from mor_jax.infer.decode import InferenceError
    try:
      infer_cli.run_from_flags(config, FLAGS.workdir)
    except InferenceError as e:
      sys.exit(f"error: {e}")
  elif FLAGS.mode == "eval":
    if not FLAGS.workdir:
      raise app.UsageError("--workdir is required for --mode=eval.")
    from mor_jax.evaluate import main_eval
    try:
      main_eval(config, FLAGS.workdir, step=FLAGS.step, threshold=FLAGS.threshold, batches=FLAGS.eval_batches,
                tokenizer=FLAGS.tokenizer)
    except ValueError as e:      # InferenceError, ConfigError: the message names the flag or field and the fix
      sys.exit(f"error: {e}")
  elif FLAGS.mode == "import":
    if not FLAGS.import_from or not FLAGS.workdir:
      raise app.UsageError("--mode=import needs --import_from=DIR (the checkpoint) and --workdir=OUT (to write).")
    from mor_jax.interop import importer
    try:
      importer.import_reference(FLAGS.import_from, FLAGS.workdir, config=config, run_config=FLAGS.import_run_config)
    except ValueError as e:      # InteropError, ConfigError: the message says what is wrong and what to do
      sys.exit(f"error: {e}")
  elif FLAGS.mode == "export_hf":
    from mor_jax.interop import exporter
    try:
      exporter.main_export(FLAGS.workdir, FLAGS.export_to, step=FLAGS.step, config=config)
    except ValueError as e:      # InteropError, InferenceError
      sys.exit(f"error: {e}")
  elif FLAGS.mode == "serve":
    from mor_jax.infer.decode import InferenceError
    try:
      return serve_lib.run_from_flags(config, FLAGS.workdir)
    except InferenceError as e:  # the message names the flag or field and the fix
      sys.exit(f"error: {e}")
  else:
    raise app.UsageError(f"--mode={FLAGS.mode} is not implemented.")


if __name__ == "__main__":
  if (config_error := check_config_path(sys.argv[1:])) is not None:
    sys.exit(config_error)
  runtime.use_huge_pages()  # see mor_jax/runtime.py (page faults cost 20-30% of a CPU step otherwise)
  logging.set_verbosity(logging.INFO)
  sys.exit(app.run(main))
