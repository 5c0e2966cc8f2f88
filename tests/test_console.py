"""The default job's console at the default verbosity (issue 24): no library noise (JAX's libtpu probe, TFDS's
"Downloading and preparing", matplotlib's font cache), log lines never on the progress bar's line, and a run
name that follows the model."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the default job, shrunk: a tiny model, 3 steps, an evaluation every 2, a fresh data dir (the corpus, BPE and
# shards are built as on first use)
SMALL = ("--config.train.num_steps=3", "--config.train.warmup_steps=1", "--config.model.hidden_size=32",
         "--config.model.intermediate_size=64", "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
         "--config.data.seq_len=32", "--config.train.eval_every_steps=2", "--config.train.eval_sequences=8")
LOG_PREFIX = re.compile(r"[IWEF]\d{4} \d\d:\d\d:\d\d")


def run_default_job(tmp_path, *extra):
  env = dict(os.environ, MPLCONFIGDIR=str(tmp_path / "mpl"), XLA_FLAGS="")   # a fresh matplotlib font cache
  env.pop("JAX_PLATFORMS", None)                                             # JAX probes its backends as usual
  cmd = [sys.executable, "main.py", "--config=configs/shakespeare_mor.py", f"--workdir={tmp_path / 'w'}",
         f"--config.data.data_dir={tmp_path / 'data'}", *SMALL, *extra]
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout + p.stderr


def test_default_job_console_is_clean(tmp_path):
  out = run_default_job(tmp_path)
  assert "completed: step 3/3" in out and "building dataset mor_shakespeare" in out
  for noise in ("libtpu", "Unable to initialize backend", "Downloading and preparing", "Unknown size",
                "fontManager"):
    assert noise not in out, noise
  assert os.listdir(tmp_path / "mpl")                      # the font cache was built (quietly)
  for name in ("routing.png", "routing_sample.html", "routing_sample.png"):   # the default job draws its routing
    assert os.path.isfile(tmp_path / "w" / name), name
  # a terminal starts a line again at \r: every piece between \r / \n holds a bar or a log line, never both
  pieces = re.split(r"[\r\n]", out)
  bars = [p for p in pieces if "step/s" in p]
  logs = [p for p in pieces if LOG_PREFIX.search(p)]
  assert bars and any("validation loss" in p for p in logs)
  glued = [p for p in pieces if "step/s" in p and LOG_PREFIX.search(p)]
  assert not glued, glued
  assert all(p.startswith("shakespeare-mor-expert-r2:") for p in bars if p.strip())
  # the bar's clock starts after the first (compiling) step: no rate or ETA is shown for it
  assert any("1/3 [00:00<?, ?step/s" in p for p in bars), bars


def test_eval_bar_has_a_total(tmp_path):
  """--mode=eval over the whole validation split: the bar knows its total (data.count_batches), and it is exact."""
  run_default_job(tmp_path)
  env = dict(os.environ, MPLCONFIGDIR=str(tmp_path / "mpl"))
  p = subprocess.run([sys.executable, "main.py", "--mode=eval", f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  n = int(re.search(r"validation split, (\d+) batches", p.stdout).group(1))
  pieces = [x for x in re.split(r"[\r\n]", p.stderr) if x.startswith("eval:")]
  assert pieces and n > 1
  assert all(f"/{n} [" in x for x in pieces), pieces      # a total on every frame of the bar
  assert f"{n}/{n} [" in pieces[-1]                       # and it ends exactly there
