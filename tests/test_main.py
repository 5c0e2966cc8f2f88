"""Faults at the command line (issue 37): each ends in one line on stderr (besides absl's log lines), the exit code
docs/run-safety.md documents ("Exit codes") and, where the command refuses, nothing in the workdir changed."""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from mor_jax import checkpoint as ckpt_lib
from mor_jax.train import read_metrics
from test_run_safety import ROOT, snapshot

CORPUS = " ".join(f"line {i}: the quick brown fox jumps over the lazy dog and the cat." for i in range(100))
TINY_MAIN = """
from mor_jax import config as C

def get_config():
  c = C.defaults()
  c.name = "tiny-main"
  c.model.update(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=64)
  c.data.update(corpus="local", path={path!r}, data_dir={data!r}, seq_len=16, val_files=("0.txt",))
  c.train.update(num_steps=4, total_batch_size=8, per_device_batch_size=2, warmup_steps=1, log_every_steps=1,
                 eval_every_steps=0, eval_sequences=8, save_every_steps=2, progress_bar=False)
  return c
"""


def _env():
  return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")


def main_py(*args, timeout=300):
  return subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *args], capture_output=True, text=True,
                        timeout=timeout, env=_env(), cwd=ROOT)


def test_exit_codes_of_main(tmp_path):
  (tmp_path / "corpus").mkdir()
  for i in range(10):                                          # one document per file: 1 for validation
    (tmp_path / "corpus" / f"{i}.txt").write_text(CORPUS)
  cfg = tmp_path / "tiny_main.py"
  cfg.write_text(TINY_MAIN.format(path=str(tmp_path / "corpus"), data=str(tmp_path / "data")))
  wd = str(tmp_path / "w")
  p = main_py("--config=configs/nope.py", f"--workdir={wd}")
  assert p.returncode == 1 and "configs/nope.py does not exist" in p.stderr and "config_config" not in p.stderr
  with ckpt_lib.WorkdirLock(wd):
    p = main_py(f"--config={cfg}", f"--workdir={wd}")
  assert p.returncode == 1 and f"pid {os.getpid()}" in p.stderr
  assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))
  p = main_py(f"--config={cfg}", f"--workdir={wd}", "--config.train.max_steps_per_run=2")
  assert p.returncode == 75, p.stderr[-2000:]
  assert "paused: step 2/4; run the same command again" in p.stdout
  p = main_py(f"--config={cfg}", f"--workdir={wd}")
  assert p.returncode == 0 and "completed: step 4/4" in p.stdout, p.stderr[-2000:]
  p = main_py(f"--config={cfg}", f"--workdir={wd}", "--config.model.hidden_size=64")
  assert p.returncode == 1 and "model.hidden_size: checkpoint 32 vs config 64" in p.stderr
  p = main_py(f"--config={cfg}", f"--workdir={wd}", "--config.train.num_steps=6")      # extending: refused
  assert p.returncode == 1 and "train.num_steps: checkpoint 4 vs config 6" in p.stderr, p.stderr[-2000:]
  assert "--config.train.allow_changes=train.num_steps" in p.stderr and "train.num_steps: 4 -> 6" in p.stderr
  p = main_py(f"--config={cfg}", f"--workdir={wd}")
  assert p.returncode == 0 and [r["step"] for r in read_metrics(wd)] == [1, 2, 3, 4]
  before = snapshot(wd)                  # a memory budget nothing fits: one line, exit 1, the finished run untouched
  p = main_py(f"--config={cfg}", f"--workdir={wd}", "--config.train.per_device_batch_size=0",
              "--config.execution.memory_budget_gib=0.0001")
  last = p.stderr.strip().splitlines()[-1]
  assert p.returncode == 1 and last.startswith("error: out of memory: the train state alone needs "), p.stderr[-2000:]
  assert " MiB per device" in last and "but 0.10 MiB (execution.memory_budget_gib=0.0001) is available" in last
  assert "Traceback" not in p.stderr and snapshot(wd) == before


LOG_LINE = re.compile(r"^[IWEF]\d{4} ")       # absl's log lines (timestamps, INFO/WARNING) are not the message


def message_lines(stderr: str) -> list:
  return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def one_line(p, code: int, *words) -> str:
  """The one line on stderr of a run that ended with exit code `code`; it holds each of `words`."""
  lines = message_lines(p.stderr)
  assert p.returncode == code and len(lines) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


def write_config(root, data_dir, where=None) -> str:
  """TINY_MAIN reading ROOT/corpus, preparing into `data_dir`, written into `where` (default: ROOT)."""
  cfg = os.path.join(where or root, "tiny_main.py")
  with open(cfg, "w") as f:
    f.write(TINY_MAIN.format(path=os.path.join(root, "corpus"), data=str(data_dir)))
  return cfg


@pytest.fixture(scope="module")
def paused(tmp_path_factory):
  """A tiny run paused at step 2 of 4 (checkpoint 2, WORKDIR/tokenizer/): (root, config path, workdir)."""
  root = str(tmp_path_factory.mktemp("faults"))
  os.makedirs(os.path.join(root, "corpus"))
  for i in range(10):                                          # one document per file: 1 for validation
    with open(os.path.join(root, "corpus", f"{i}.txt"), "w") as f:
      f.write(CORPUS)
  cfg = write_config(root, os.path.join(root, "data"))
  wd = os.path.join(root, "w")
  p = main_py(f"--config={cfg}", f"--workdir={wd}", "--config.train.max_steps_per_run=2")
  assert p.returncode == 75, p.stderr[-2000:]
  return root, cfg, wd


@pytest.fixture
def workdir(paused, tmp_path):
  wd = str(tmp_path / "w")
  shutil.copytree(paused[2], wd)
  return wd


def test_a_mistyped_config_key_or_value(paused, workdir):
  before = snapshot(workdir)
  p = main_py(f"--config={paused[1]}", f"--workdir={workdir}", "--config.train.num_stpes=5")
  one_line(p, 1, "--config.train.num_stpes: no such config field", 'did you mean "--config.train.num_steps"?')
  p = main_py(f"--config={paused[1]}", f"--workdir={workdir}", "--config.train.num_steps=abc")
  one_line(p, 1, "--config.train.num_steps=abc")
  assert snapshot(workdir) == before


def test_a_train_shard_deleted_between_runs(paused, workdir, tmp_path):
  data = str(tmp_path / "data")
  shutil.copytree(os.path.join(paused[0], "data"), data)
  shards = [os.path.join(r, f) for r, _, fs in os.walk(data) for f in fs if "-train.array_record" in f]
  assert shards
  os.remove(shards[0])
  before = snapshot(workdir)
  p = main_py(f"--config={write_config(paused[0], data, str(tmp_path))}", f"--workdir={workdir}")
  one_line(p, 1, os.path.basename(shards[0]))
  assert snapshot(workdir) == before


def test_prepare_with_a_bad_data_path(paused, tmp_path):
  data = str(tmp_path / "new_data")
  p = main_py(f"--config={paused[1]}", "--mode=prepare", "--config.data.path=/no/such/corpus",
              f"--config.data.data_dir={data}")
  one_line(p, 1, "config.data.path='/no/such/corpus' matches no file or directory")
  assert not os.path.exists(data)


@pytest.mark.parametrize("mode", ["generate", "serve"])
def test_generate_and_serve_with_a_bad_config_override(paused, workdir, mode):
  """Checked (model fields) before the mode loads anything: serve never starts listening."""
  before = snapshot(workdir)
  extra = ["--prompt=the", "--max_new_tokens=2"] if mode == "generate" else ["--port=0"]
  p = main_py(f"--mode={mode}", f"--workdir={workdir}", f"--config={paused[1]}", "--config.model.num_heads=3",
              *extra)
  one_line(p, 1, "config.model.num_heads")
  p = main_py(f"--mode={mode}", f"--workdir={workdir}", f"--config={paused[1]}", "--config.model.num_hedas=4",
              *extra)
  one_line(p, 1, 'did you mean "--config.model.num_heads"?')
  assert snapshot(workdir) == before


def _read_only(path):
  """Makes `path` read-only for this process (root ignores permissions: a read-only bind mount); returns an undo."""
  if os.geteuid() != 0:
    modes = {}
    for r, ds, fs in os.walk(path):
      for n in [r] + [os.path.join(r, x) for x in ds + fs]:
        modes[n] = os.stat(n).st_mode
        os.chmod(n, modes[n] & ~0o222)
    return lambda: [os.chmod(n, m) for n, m in modes.items()]
  ok = subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0 and subprocess.run(
      ["mount", "-o", "remount,bind,ro", path], capture_output=True).returncode == 0
  if not ok:
    subprocess.run(["umount", path], capture_output=True)
    pytest.skip("root without mount: cannot make a read-only workdir here")
  return lambda: subprocess.run(["umount", path], check=True)


@pytest.mark.environment("a read-only workdir: a non-root user, or root allowed to bind-mount")
def test_eval_on_a_read_only_workdir_refuses_before_computing(workdir):
  before = snapshot(workdir)
  undo = _read_only(workdir)
  try:
    p = main_py("--mode=eval", f"--workdir={workdir}")
  finally:
    undo()
  one_line(p, 1, f"{workdir} is not writable", "eval_results_step<N>.json", "nothing was computed")
  assert "validation split" not in p.stdout
  assert snapshot(workdir) == before


@pytest.mark.parametrize("mode", ["train", "eval", "generate"])
def test_an_empty_newest_checkpoint_directory_is_refused_in_every_mode(paused, workdir, mode):
  os.makedirs(os.path.join(workdir, "checkpoints", "6"))
  before = snapshot(workdir)
  args = {"train": [f"--config={paused[1]}"], "eval": ["--mode=eval"],
          "generate": ["--mode=generate", "--prompt=the", "--max_new_tokens=2"]}[mode]
  p = main_py(*args, f"--workdir={workdir}")
  one_line(p, 1, f"{os.path.join(workdir, 'checkpoints', '6')} is not a complete checkpoint",
           "nothing was read or changed", "to use step 2")
  assert snapshot(workdir) == before and os.path.isdir(os.path.join(workdir, "checkpoints", "6"))


def test_resuming_with_a_broken_tokenizer_in_the_workdir(paused, workdir):
  broken = os.path.join(workdir, "tokenizer", "tokenizer.json")
  with open(broken, "w") as f:
    f.write('{"version": "1.0", "model": ')                    # cut short
  before = snapshot(workdir)
  p = main_py(f"--config={paused[1]}", f"--workdir={workdir}")
  one_line(p, 1, f"{broken} is not a readable tokenizer", "nothing was changed")
  assert snapshot(workdir) == before


def test_two_quick_sigints_abort_with_130(paused, tmp_path):
  """The first SIGINT asks for a checkpoint and exit 75; a second one while that runs aborts at once: exit 130
  and one line saying nothing was saved after the last checkpoint."""
  for attempt in range(3):                     # the second signal must arrive before the first's save is done
    wd = str(tmp_path / f"w{attempt}")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main.py"), f"--config={paused[1]}",
                             f"--workdir={wd}", "--config.train.num_steps=1000000",
                             "--config.train.save_every_steps=100000"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err, started, asked = [], threading.Event(), threading.Event()

    def read(stream=proc.stderr, err=err, started=started, asked=asked):
      for line in stream:
        err.append(line)
        if " step " in line and "loss=" in line:
          started.set()
        if "received SIGINT" in line:
          asked.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
      assert started.wait(600), "".join(err)[-3000:]
      proc.send_signal(signal.SIGINT)
      asked.wait(60)
      proc.send_signal(signal.SIGINT)
      out = proc.stdout.read()
      proc.wait(120)
    finally:
      if proc.poll() is None:
        proc.kill()
    reader.join(10)
    if proc.returncode == 75:                  # the graceful stop won the race: try again
      continue
    p = subprocess.CompletedProcess(proc.args, proc.returncode, out, "".join(err))
    one_line(p, 130, "aborted: a second SIGINT stopped the run at once")
    return
  pytest.fail("the first SIGINT's checkpoint finished before the second arrived, three times")
