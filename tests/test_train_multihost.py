"""Two processes on JAX's distributed runtime (CPU, gloo) train exactly like one process with 4 devices.

The workers (tests/multihost_worker.py) each have 2 simulated devices and
train with FSDP (mesh data=2 x fsdp=2); they checkpoint after step 2 and
resume for steps 3-4. The reference runs the same config and global batches
here, on the 4 devices of conftest, with pure data parallelism and
uninterrupted (while the workers run).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

import multihost_worker as W
from mor_jax import distributed
from mor_jax.config import ConfigError
from mor_jax.train import Checkpointer, read_metrics, train_and_evaluate

pytestmark = pytest.mark.usefixtures("fast_compilation")
HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(workdir, tmp_path, meanwhile):
  """Starts both workers, runs `meanwhile()` here, waits for the workers; returns (their results, its result)."""
  port = free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
  env["PYTHONUNBUFFERED"] = "1"
  procs, outs = [], []
  for pid in range(2):
    out = str(tmp_path / f"worker{pid}.json")
    log = open(tmp_path / f"worker{pid}.log", "w")
    procs.append((subprocess.Popen([sys.executable, os.path.join(HERE, "multihost_worker.py"), str(port), str(pid),
                                    str(workdir), out], env=env, stdout=log, stderr=subprocess.STDOUT), log))
    outs.append(out)
  try:
    here = meanwhile()
    for p, _ in procs:
      p.wait(timeout=480)
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
      log.close()
  for pid, (p, _) in enumerate(procs):
    if p.returncode != 0:
      tail = open(tmp_path / f"worker{pid}.log").read()[-4000:]
      pytest.fail(f"worker {pid} exited with {p.returncode}:\n{tail}")
  return [json.load(open(o)) for o in outs], here


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  workdir = tmp_path / "multihost"
  ref_dir = tmp_path / "reference"
  results, ref = launch(workdir, tmp_path, lambda: train_and_evaluate(
      W.make_config(), str(ref_dir), train_iterator=W.train_data(), eval_iterator_fn=W.eval_data))
  assert ref["status"] == "completed" and ref["devices"]["count"] == 4 and ref["devices"]["processes"] == 1

  for pid, r in enumerate(results):
    assert (r["process_index"], r["process_count"], r["device_count"], r["local_device_count"]) == (pid, 2, 4, 2)
    (p1, p2) = r["phases"]
    assert p1["report"]["status"] == "paused" and p1["report"]["steps_completed"] == 2
    assert p2["report"]["status"] == "completed" and p2["report"]["resumed_from_step"] == 2
    assert p2["report"]["steps_completed"] == W.STEPS
    assert p2["report"]["devices"]["mesh"] == {"data": 2, "fsdp": 2} and p2["report"]["devices"]["processes"] == 2
    # each process fed its own half of every micro-batch (accumulation 2 x 4 rows)
    assert p1["rows"] == ([0, 1, 4, 5] if pid == 0 else [2, 3, 6, 7]) and p2["rows"] == p1["rows"]
  # FSDP halves the per-device size of the sharded parameters and optimizer moments
  m1 = ref["memory"]["state_per_device"]
  m2 = results[0]["phases"][1]["report"]["memory"]["state_per_device"]
  assert m2["params"] < 0.6 * m1["params"] and m2["opt_state"] < 0.6 * m1["opt_state"]
  assert results[0]["phases"][1]["report"]["memory"]["compiled"]      # AOT memory analysis recorded

  # metrics come from process 0 only, and equal the single-process run's
  got, want = read_metrics(str(workdir)), read_metrics(str(ref_dir))
  assert [g["step"] for g in got] == [w["step"] for w in want] == [1, 2, 3, 4]
  np.testing.assert_allclose([g["loss"] for g in got], [w["loss"] for w in want], rtol=1e-6)
  np.testing.assert_allclose([g["grad_norm"] for g in got], [w["grad_norm"] for w in want], rtol=1e-5)
  np.testing.assert_allclose([g["val_loss"] for g in got if "val_loss" in g],
                             [w["val_loss"] for w in want if "val_loss" in w], rtol=1e-6)
  assert results[0]["phases"][1]["report"]["loss"]["final"] == results[1]["phases"][1]["report"]["loss"]["final"]

  # the checkpoint holds every process's own data-iterator state
  ck = Checkpointer(str(workdir / "checkpoints"))
  try:
    assert ck.all_steps() == [2, 4]
    data = ck._manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]  # noqa: SLF001
  finally:
    ck.close()
  assert data["processes"] == [{"index": 2, "process": 0}, {"index": 2, "process": 1}]


def test_settings_from_config_and_environment():
  c = W.make_config(1, 1234, 1)
  s = distributed.resolve(c, env={})
  assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("127.0.0.1:1234", 2, 1, "config")
  assert s.kwargs()["cluster_detection_method"] == "deactivate"
  plain = W.make_config()
  assert distributed.resolve(plain, env={}) is None                       # nothing asks for several processes
  env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:999", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
  s = distributed.resolve(plain, env=env)
  assert (s.coordinator_address, s.num_processes, s.process_id, s.source) == ("10.0.0.1:999", 4, 3, "env")
  slurm = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "5", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "gpu[017-020]", "SLURM_STEP_TASKS_PER_NODE": "4(x4)"}
  s = distributed.resolve(plain, env=slurm)
  port = 4242 % 4096 + 65535 - 4096 + 1
  assert (s.coordinator_address, s.num_processes, s.process_id) == (f"gpu017:{port}", 16, 5)
  assert s.local_device_ids == (1,)                                       # 4 tasks per node: one GPU each
  one_per_node = dict(slurm, SLURM_NTASKS="4", SLURM_PROCID="2", SLURM_STEP_TASKS_PER_NODE="1(x4)")
  assert distributed.resolve(plain, env=one_per_node).local_device_ids is None   # all of the node's GPUs
  assert distributed.resolve(plain, env=dict(slurm, SLURM_NTASKS="1")) is None   # a single task
  off = W.make_config(1, 1234, 1)
  off.distributed.enable = "off"
  assert distributed.resolve(off, env=env) is None
  bad = W.make_config(1, 1234, 1)
  bad.distributed.process_id = 2
  with pytest.raises(ConfigError, match="distributed.process_id"):
    distributed.resolve(bad, env={})
