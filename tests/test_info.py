"""--mode=info: the model summary from --config, or from a workdir's stored config (--workdir without --config)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mor_jax import config as C
from mor_jax.checkpoint import CheckpointError
from mor_jax.checkpoint import params as ckpt_params
from mor_jax.interop import importer, layout, weights
from mor_jax.model import accounting
from tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_py(*args):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                        timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny middle_cycle R=2 expert-choice MoR model written as step 0 (its config stored with it)."""
  c = tiny_config("middle_cycle", 2, "expert", vocab=96)
  c.name = "tiny-info"
  c.train.update(total_batch_size=6, per_device_batch_size=3)      # a run's batch settings: not needed by info
  cfg = C.model_config(C.validate(c, num_devices=1))
  params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), weights.abstract_params(cfg))
  w = str(tmp_path_factory.mktemp("info") / "w")
  importer.write_checkpoint(c, layout.to_stacked_layout(cfg, params), w)
  return w, c, cfg


def test_workdir_summary_is_the_config_summary(workdir):
  w, c, cfg = workdir
  text = ckpt_params.workdir_summary(w)
  assert text.splitlines()[0] == f"checkpoint: step 0 of {os.path.join(w, 'checkpoints')}"
  assert text.split("\n", 1)[1] == accounting.summary(c)          # the same summary as --config gives
  total = accounting.param_counts(cfg)["total"]
  assert total == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(weights.abstract_params(cfg)))
  assert re.search(rf"\n  total +{total:,}\n", text) and "MoR: expert-choice" in text and "recursions 2" in text


def test_workdir_summary_errors_name_the_fix(workdir, tmp_path):
  w, _, _ = workdir
  with pytest.raises(CheckpointError, match=r"--step=7: no checkpoint of that step .*available steps: \[0\]"):
    ckpt_params.workdir_summary(w, step=7)
  with pytest.raises(CheckpointError, match="does not exist; pass a training workdir"):
    ckpt_params.workdir_summary(str(tmp_path / "missing"))
  with pytest.raises(CheckpointError, match="no checkpoint found under"):
    ckpt_params.workdir_summary(str(tmp_path))


def test_main_info_with_workdir_and_with_config(workdir, tmp_path):
  w, _, cfg = workdir
  out = main_py("--mode=info", f"--workdir={w}")
  assert out.returncode == 0, out.stderr[-2000:]
  assert f"{accounting.param_counts(cfg)['total']:,}" in out.stdout and "model: tiny-info" in out.stdout
  # the train step's memory per device, compiled (not run) on this backend for the stored run's micro-batch
  mem = dict(re.findall(r"\n  (parameters|optimizer state|temporaries|peak) +([\d.]+) MiB", out.stdout))
  assert set(mem) == {"parameters", "optimizer state", "temporaries", "peak"}, out.stdout
  mib = {k: float(v) for k, v in mem.items()}
  assert mib["parameters"] == round(4 * accounting.param_counts(cfg)["total"] / 2**20, 2)      # float32
  assert mib["peak"] >= mib["parameters"] + mib["optimizer state"] + mib["temporaries"] - 0.02  # 2-decimal rounding
  assert "micro-batch 3 x accumulation 1 x 4 devices" in out.stdout and "does not split over 4 devices" in out.stdout
  assert "device limit     not reported by the cpu backend" in out.stdout
  out = main_py("--mode=info", f"--workdir={tmp_path / 'missing'}")
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 1 and last.startswith("error: ") and "Traceback" not in out.stderr
  out = main_py("--mode=info")
  assert out.returncode != 0 and "--config is required for --mode=info (or --workdir=W" in out.stderr
  out = main_py("--config=configs/smollm135.py", "--mode=info", "--noinfo_memory")   # the --config form (no compile)
  assert out.returncode == 0 and "134,515,008" in out.stdout, out.stderr[-2000:]
  assert "train step memory" not in out.stdout
