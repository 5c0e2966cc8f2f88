"""One process of the 2-process CPU training test (tests/test_train_multihost.py); also the shared config and data.

  python tests/multihost_worker.py PORT PROCESS_ID WORKDIR OUT_JSON

Each process has 2 simulated CPU devices and joins JAX's distributed runtime
(coordinator 127.0.0.1:PORT, gloo collectives). The mesh is data=2 x fsdp=2
(parameters and optimizer state sharded, so no process holds a whole
parameter). Phase 1 trains steps 1-2 and stops (train.max_steps_per_run);
phase 2 resumes from that multi-process checkpoint (with device prefetch) and
trains steps 3-4; it reuses phase 1's programs through JAX's persistent
compilation cache. Every process feeds only its own rows of each global batch
(`process_row_indices`).
"""

from __future__ import annotations

import json
import os
import sys

ROWS, SEQ, VOCAB, STEPS = 8, 16, 128, 4
EVAL_ROWS = 4


def make_config(phase: int | None = None, port: int = 0, process_id: int = 0):
  """The tiny MoR config; phase 1 / 2 add the distributed and mesh settings (None: the single-process reference)."""
  from configs.base import get_config  # pylint: disable=g-import-not-at-top
  c = get_config()
  c.name = "tiny-multihost"
  c.model.update(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 max_seq_len=64, scan_layers=False)
  c.recursion.update(strategy="cycle", num_recursions=2)
  c.mor.update(enable=True, type="expert", z_loss=True)
  c.data.seq_len = SEQ
  c.train.update(num_steps=STEPS, total_batch_size=ROWS, per_device_batch_size=1, warmup_steps=1, learning_rate=1e-2,
                 log_every_steps=1, eval_every_steps=0, eval_batches=1, save_every_steps=2, keep_checkpoints=3,
                 progress_bar=False)
  if phase is not None:
    c.distributed.update(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    c.train.max_steps_per_run = 2 if phase == 1 else 0
    c.parallel.update(data=-1, fsdp=2, prefetch=0 if phase == 1 else 2)
  return c


def train_data(rows=ROWS):
  from mor_jax.train.synthetic import SyntheticIterator  # pylint: disable=g-import-not-at-top
  return SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=3)


def eval_data(rows):
  from mor_jax.train.synthetic import SyntheticIterator  # pylint: disable=g-import-not-at-top
  return SyntheticIterator(vocab_size=VOCAB, seq_len=SEQ, rows=rows, seed=11, num_batches=1)


class LocalRows:
  """This process's rows of a global-batch iterator; its state names the process (checked on restore)."""

  def __init__(self, it, indices, process_id):
    self.it, self.indices, self.process_id = it, indices, process_id

  def __iter__(self):
    return self

  def __next__(self):
    return {k: v[self.indices] for k, v in next(self.it).items()}

  def get_state(self):
    return {"index": self.it.get_state()["index"], "process": self.process_id}

  def set_state(self, state):
    if state["process"] != self.process_id:
      raise AssertionError(f"process {self.process_id} was given the data state of process {state['process']}")
    self.it.set_state({"index": state["index"]})


def main(argv):
  port, pid, workdir, out_path = int(argv[1]), int(argv[2]), argv[3], argv[4]
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from mor_jax import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.initialize(make_config(1, port, pid))
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_disable_most_optimizations", True)   # as the fast_compilation fixture of the reference
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(out_path), f"jax_cache{pid}"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from mor_jax import config as C  # pylint: disable=g-import-not-at-top
  from mor_jax.model.transformer import param_axes  # pylint: disable=g-import-not-at-top
  from mor_jax.train import DataParallel, train_and_evaluate  # pylint: disable=g-import-not-at-top

  result = {"process_index": jax.process_index(), "process_count": jax.process_count(),
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(), "phases": []}
  for phase in (1, 2):
    config = make_config(phase, port, pid)
    c = C.validate(config, jax.device_count())
    dp = DataParallel("pjit", data=c.parallel.data, fsdp=c.parallel.fsdp,
                      param_axes=param_axes(C.model_config(c)) if c.parallel.fsdp != 1 else None)
    rows = dp.process_row_indices(ROWS, int(c.train.grad_accum_steps))

    def evals(batch_size, dp=dp):
      return LocalRows(eval_data(batch_size), dp.process_row_indices(batch_size, 1), pid)
    rep = train_and_evaluate(config, workdir, train_iterator=LocalRows(train_data(), rows, pid),
                             eval_iterator_fn=evals)
    result["phases"].append({"rows": rows.tolist(), "report": rep})
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f, default=str)


if __name__ == "__main__":
  main(sys.argv)
