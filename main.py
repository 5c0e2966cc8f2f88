"""mor-jax command line.

  python main.py --config=configs/shakespeare_mor.py --workdir=/tmp/mor           # train (resumes if WORKDIR has checkpoints)
  python main.py --config=configs/smollm360_rec2.py --mode=info                    # parameters and FLOPs
  python main.py --config=configs/smollm360_rec2.py --mode=prepare                 # build corpus, tokenizer, shards
  python main.py --mode=generate --workdir=/tmp/mor --prompt="ROMEO:"               # sample from the latest checkpoint
  python main.py --mode=eval --workdir=/tmp/mor                                     # validation NLL, top-k and causal routing
  python main.py --mode=import --import_from=REF_OUTPUT_DIR --workdir=/tmp/imported # PyTorch-reference / HF checkpoint -> Orbax
  python main.py --mode=export_hf --workdir=/tmp/mor --export_to=/tmp/hf            # -> Hugging Face LlamaForCausalLM directory

Config fields can be overridden on the command line: --config.train.num_steps=100.
Everything below is importable: `mor_jax.train.train_and_evaluate(config, workdir)` does the same from a notebook.
"""

import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from mor_jax import runtime
from mor_jax.infer import cli as infer_cli

MODES = ("train", "eval", "generate", "info", "prepare", "import", "export_hf")

config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, TensorBoard events and the report.")
flags.DEFINE_enum("mode", "train", MODES, "What to do.")
flags.DEFINE_integer("eval_batches", None, "eval: validation batches to score (default: the whole split).")
flags.DEFINE_string("import_from", None, "import: a PyTorch-reference training output or Hugging Face Llama directory.")
flags.DEFINE_string("import_run_config", None, "import: the run's YAML (recursive/mor/kv_sharing settings), when the "
                    "directory holds several or none.")
flags.DEFINE_string("export_to", None, "export_hf: the Hugging Face directory to write.")
infer_cli.define_flags()  # --prompt, --interactive, --prompts_file, --step, --threshold, ... (generate; eval uses --step/--threshold)
FLAGS = flags.FLAGS


class _QuietLibraries(pylogging.Filter):
  """Drops Orbax's and TFDS's routine INFO lines (each save, each dataset open); warnings still show."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(
        name in record.pathname for name in ("orbax", "tensorflow_datasets"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  if config is None and FLAGS.mode not in ("generate", "eval", "import", "export_hf"):
    raise app.UsageError(f"--config is required for --mode={FLAGS.mode}.")
  if FLAGS.mode == "train":     # several processes (config.distributed, JAX_COORDINATOR_ADDRESS, SLURM): before any device use
    from mor_jax import distributed
    distributed.initialize(config)
    distributed.quiet_other_processes()   # logs and reports come from process 0
  if FLAGS.mode == "info":
    from mor_jax.model import accounting
    print(accounting.summary(config))
  elif FLAGS.mode == "prepare":
    from mor_jax import data
    print(data.prepare(config))
  elif FLAGS.mode == "train":
    if not FLAGS.workdir:
      raise app.UsageError("--workdir is required for --mode=train.")
    from mor_jax import train
    report = train.train_and_evaluate(config, FLAGS.workdir)
    print(f"{report['status']}: step {report['steps_completed']}/{report['num_steps']}; report in "
          f"{FLAGS.workdir}/report.md")
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
    main_eval(config, FLAGS.workdir, step=FLAGS.step, threshold=FLAGS.threshold, batches=FLAGS.eval_batches)
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
  else:
    raise app.UsageError(f"--mode={FLAGS.mode} is not implemented.")


if __name__ == "__main__":
  runtime.use_huge_pages()  # see mor_jax/runtime.py (page faults cost 20-30% of a CPU step otherwise)
  logging.set_verbosity(logging.INFO)
  sys.exit(app.run(main))
