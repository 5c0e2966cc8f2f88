"""The grain pipeline: packing, sharding, epochs, checkpointing, both paths."""

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import grain
from etils import epath
import numpy as np
import pytest

from mor_jax.data import (DataError, count_batches, make_iterator, prepare,
                          tokenizer_path_for)
from mor_jax.data import corpus as corpora
from tiny import tiny_config

WORDS = ("the quick brown fox jumps over lazy dogs while seven wizards quietly "
         "hum jazz vexing bold nymphs and a sphinx of black quartz judges "
         "my vow").split()
KEYS = ("tokens", "segment_ids", "positions")


def _local_config(tmp_path, n_docs=40, **data):
  """A tiny local corpus: documents from 1 to ~60 tokens, some > a row."""
  d = tmp_path / "corpus"
  if not d.exists():
    d.mkdir()
    rng = np.random.default_rng(0)
    with open(d / "docs.jsonl", "w") as f:
      for i in range(n_docs):
        n = int(rng.integers(1, 40))
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), n)]
        f.write(json.dumps({"text": f"{i} " + " ".join(words)}) + "\n")
    (d / "val.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
  c = tiny_config(vocab=300, seq_len=15,     # rows of 16 tokens
                  data__corpus="local", data__path=str(d), data__val_files=("val.jsonl",),
                  data__data_dir=str(tmp_path / "prepared"), data__prefetch=0)
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
  """The embedded default corpus, built once, with the network cut off."""
  c = tiny_config(vocab=512, seq_len=64, data__data_dir=str(tmp_path_factory.mktemp("shakespeare")))
  mp = pytest.MonkeyPatch()

  def no_network(*args, **kwargs):
    raise OSError("network access attempted during an offline build")

  mp.setattr(socket.socket, "connect", no_network)
  mp.setattr(socket, "create_connection", no_network)
  try:
    t = time.time()
    info = prepare(c)
    build_s = time.time() - t
  finally:
    mp.undo()
  return c, info, build_s


def _doc_tokens(config, split):
  """Tokenized documents of a split, in source order (no EOS)."""
  info = prepare(config)
  return [info.tokenizer.encode(t)
          for t in corpora.iter_texts(info.corpus.dataset_dir, split)]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches):
  for b in batches:
    for r in range(b["tokens"].shape[0]):
      yield {k: b[k][r] for k in KEYS}


def _stream(batches):
  """All non-padding tokens, in order."""
  return [int(t) for row in _rows(batches)
          for t in row["tokens"][row["segment_ids"] > 0]]


def _split_docs(stream, eos):
  assert stream and stream[-1] == eos
  docs, cur = [], []
  for t in stream:
    if t == eos:
      docs.append(tuple(cur))
      cur = []
    else:
      cur.append(t)
  return docs


def _check_rows(batches, eos):
  """Segment ids run 1..k, positions restart per segment, pieces end in EOS
  unless they run to the end of the row; padding only at the end."""
  for row in _rows(batches):
    seg, pos, tok = row["segment_ids"], row["positions"], row["tokens"]
    real = seg > 0
    n = int(real.sum())
    assert real[:n].all() and not real[n:].any()
    assert (np.diff(seg[:n]) >= 0).all() and (np.diff(seg[:n]) <= 1).all()
    assert n == 0 or seg[0] == 1
    for s in range(1, int(seg.max()) + 1):
      idx = np.nonzero(seg == s)[0]
      np.testing.assert_array_equal(pos[idx], np.arange(idx.size))
      if idx[-1] != len(seg) - 1:
        assert tok[idx[-1]] == eos, "a piece ends inside the row without EOS"


def _expected_order(n, seed, num_epochs=1, pi=0, pc=1):
  ds = grain.MapDataset.range(n)[pi::pc].shuffle(seed=seed).repeat(num_epochs)
  return list(ds)


@pytest.mark.parametrize("add_bos", [False, True])
def test_epoch_conserves_every_token_with_eos(tmp_path, add_bos):
  c = _local_config(tmp_path, add_bos=add_bos)
  docs = _doc_tokens(c, "train")
  tok = prepare(c).tokenizer
  it = make_iterator(c, "train", global_batch_size=3, process_index=0,
                     process_count=1, num_epochs=1)
  batches = list(it)
  for b in batches:
    assert set(b) == set(KEYS)
    for k in KEYS:
      assert b[k].dtype == np.int32 and b[k].shape == (3, 16)
  _check_rows(batches, tok.eos_id)
  bos = [tok.bos_id] if add_bos else []
  expected = [t for i in _expected_order(len(docs), c.data.shuffle_seed)
              for t in bos + docs[i] + [tok.eos_id]]
  assert _stream(batches) == expected  # nothing lost, nothing duplicated
  n_real = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
  assert n_real == sum(len(d) + 1 + len(bos) for d in docs)
  assert sum(int((b["tokens"] == tok.eos_id)[b["segment_ids"] > 0].sum())
             for b in batches) == len(docs) * (2 if add_bos else 1)
  # Only the last row is partial; the last batch is padded to full size.
  rows = -(-n_real // 16)
  assert len(batches) == -(-rows // 3)
  # count_batches (the eval bar's total) knows this without packing.
  assert count_batches(c, "train", global_batch_size=3) == len(batches)


def test_process_shards_are_disjoint_and_cover(tmp_path):
  c = _local_config(tmp_path)
  docs = _doc_tokens(c, "train")
  eos = prepare(c).tokenizer.eos_id
  for pc in (2, 3):
    shards = []
    for pi in range(pc):
      it = make_iterator(c, "train", global_batch_size=2 * pc,
                         process_index=pi, process_count=pc, num_epochs=1)
      batches = list(it)
      assert all(b["tokens"].shape == (2, 16) for b in batches)
      assert count_batches(c, "train", global_batch_size=2 * pc, process_index=pi, process_count=pc) == len(batches)
      shards.append(_split_docs(_stream(batches), eos))
    assert sum(len(s) for s in shards) == len(docs)
    assert sorted(d for s in shards for d in s) == sorted(map(tuple, docs))
    for a in range(pc):
      for b in range(a + 1, pc):
        assert not set(shards[a]) & set(shards[b])


def test_epochs_reshuffle_and_seeds_are_deterministic(tmp_path):
  c = _local_config(tmp_path)
  docs = _doc_tokens(c, "train")
  eos = prepare(c).tokenizer.eos_id
  it = make_iterator(c, "train", global_batch_size=2, process_index=0,
                     process_count=1, num_epochs=2)
  seen = _split_docs(_stream(list(it)), eos)
  e1, e2 = seen[:len(docs)], seen[len(docs):]
  assert sorted(e1) == sorted(e2) == sorted(map(tuple, docs))
  assert e1 != e2  # a fresh order each epoch
  a = _take(make_iterator(c, "train", global_batch_size=2, process_index=0,
                          process_count=1), 6)
  b = _take(make_iterator(c, "train", global_batch_size=2, process_index=0,
                          process_count=1), 6)
  d = _take(make_iterator(c, "train", global_batch_size=2, process_index=0,
                          process_count=1, seed=123), 6)
  assert all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, b))
  assert not all(np.array_equal(x["tokens"], y["tokens"])
                 for x, y in zip(a, d))


def _assert_same(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    for k in KEYS:
      np.testing.assert_array_equal(x[k], y[k])


def test_restore_yields_exactly_the_following_batches(shakespeare, tmp_path):
  c, _, _ = shakespeare
  c = c.copy_and_resolve_references()
  c.data.prefetch = 2
  it = make_iterator(c, "train", global_batch_size=4, process_index=0,
                     process_count=1)
  _take(it, 7)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  after = _take(it, 5)
  # Orbax's grain handler writes/reads the same state.
  handler = grain.checkpoint.CheckpointHandler()
  it2 = make_iterator(c, "train", global_batch_size=4, process_index=0,
                      process_count=1)
  it2.set_state(state)
  handler.save(epath.Path(tmp_path), item=it2)
  _assert_same(_take(it2, 5), after)
  it3 = make_iterator(c, "train", global_batch_size=4, process_index=0,
                      process_count=1)
  handler.restore(epath.Path(tmp_path), item=it3)
  _assert_same(_take(it3, 5), after)


def test_restore_across_epoch_end_of_finite_run(tmp_path):
  c = _local_config(tmp_path)
  mk = lambda: make_iterator(c, "train", global_batch_size=2, process_index=0,
                             process_count=1, num_epochs=2)
  full = list(mk())
  for k in (0, 5, len(full) // 2, len(full) - 1, len(full)):
    it = mk()
    _take(it, k)
    state = it.get_state()
    it2 = mk()
    it2.set_state(state)
    _assert_same(list(it2), full[k:])


def test_restore_with_worker_processes(tmp_path):
  c = _local_config(tmp_path, num_workers=2, prefetch=2)
  it = make_iterator(c, "train", global_batch_size=2, process_index=0,
                     process_count=1, num_epochs=1)
  try:
    first = _take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    rest = list(it)
    it.set_state(state)
    _assert_same(list(it), rest)
  finally:
    it.close()
  # Worker processes tokenize and pack; every token still appears once.
  # (Rows of the two workers interleave, so compare token counts.)
  batches = first + rest
  eos = prepare(c).tokenizer.eos_id
  expected = collections.Counter(
      t for d in _doc_tokens(c, "train") for t in d + [eos])
  assert collections.Counter(_stream(batches)) == expected
  _check_rows(batches, eos)


def test_pretokenized_path_gives_the_same_batches(tmp_path):
  raw = _local_config(tmp_path)
  pre = _local_config(tmp_path, pretokenized=True, prepare_workers=2)
  info = prepare(pre)
  assert info.tokens["dtype"] == "uint16"
  assert info.tokens["splits"]["train"]["num_docs"] == 40
  assert len(info.tokens["splits"]["train"]["files"]) == 2  # two processes
  assert os.path.isfile(os.path.join(info.tokens_dir, "tokenizer.json"))
  for split in ("train", "validation"):
    kw = dict(global_batch_size=2, process_index=0, process_count=1)
    a = _take(make_iterator(raw, split, **kw), 12)
    b = _take(make_iterator(pre, split, **kw), 12)
    _assert_same(a, b)
    n = len(list(make_iterator(pre, split, num_epochs=1, **kw)))
    assert count_batches(pre, split, **kw) == count_batches(raw, split, **kw) == n


def test_shakespeare_default_builds_offline_and_is_reused(shakespeare):
  c, info, build_s = shakespeare
  assert info.corpus.name.startswith("mor_shakespeare/")
  assert info.num_docs == {"train": 765, "validation": 14}
  assert info.tokenizer.vocab_size == 512
  assert info.tokenizer_path == tokenizer_path_for(c)
  assert info.tokenizer_path.startswith(info.corpus.dataset_dir)
  stamps = [os.path.getmtime(p) for p in (
      info.tokenizer_path,
      os.path.join(info.corpus.dataset_dir, "dataset_info.json"))]
  t = time.time()
  again = prepare(c)
  assert time.time() - t < min(1.0, build_s)
  assert again.corpus.dataset_dir == info.corpus.dataset_dir
  assert [os.path.getmtime(p) for p in (
      info.tokenizer_path,
      os.path.join(info.corpus.dataset_dir, "dataset_info.json"))] == stamps
  # Train and validation are different plays.
  val_plays = set(info.corpus.metadata["validation_plays"])
  text = next(corpora.iter_texts(info.corpus.dataset_dir, "validation"))
  assert text.splitlines()[0] == "The Taming of the Shrew"
  assert val_plays == {"the-taming-of-the-shrew"}
  b = next(make_iterator(c, "validation", global_batch_size=4,
                         process_index=1, process_count=2))
  assert b["tokens"].shape == (2, 65)
  decoded = info.tokenizer.decode(b["tokens"][0])
  assert decoded and "\ufffd" not in decoded


def test_iterator_argument_errors(tmp_path):
  c = _local_config(tmp_path)
  with pytest.raises(DataError, match="not divisible"):
    make_iterator(c, "train", global_batch_size=3, process_index=0,
                  process_count=2)
  with pytest.raises(DataError, match="unknown split"):
    make_iterator(c, "test", global_batch_size=2, process_index=0,
                  process_count=1)
  with pytest.raises(DataError, match="fewer than the 2 processes"):
    make_iterator(c, "validation", global_batch_size=2, process_index=0,
                  process_count=2)


_CHILD = """
import pathlib, sys, time
from test_data_pipeline import _local_config
from mor_jax.data import make_iterator
c = _local_config(pathlib.Path(sys.argv[1]), num_workers=2, prefetch=2)
it = make_iterator(c, "train", global_batch_size=2, process_index=0, process_count=1)
next(it)
print("ready", flush=True)
time.sleep(120)
"""


def _children(pid):
  """Pids of the live (not zombie) processes whose parent is `pid`."""
  out = []
  for name in os.listdir("/proc"):
    try:
      with open(f"/proc/{name}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
      continue
    if fields[0] != "Z" and int(fields[1]) == pid:
      out.append(int(name))
  return out


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_no_orphaned_workers_after_parent_is_killed(tmp_path):
  """kill -9 of a process iterating with num_workers=2: its grain workers and resource tracker are gone 10 s later."""
  prepare(_local_config(tmp_path))           # build here: the child only starts its workers
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]))
  child = subprocess.Popen([sys.executable, "-c", _CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env,
                           text=True)
  spawned = []
  try:
    assert child.stdout.readline().strip() == "ready", "the child did not start iterating"
    spawned = _children(child.pid)
    assert len(spawned) >= 2, spawned            # 2 grain workers (+ multiprocessing's resource tracker)
    child.send_signal(signal.SIGKILL)
    child.wait()
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in spawned):
      time.sleep(0.2)
    assert not [p for p in spawned if _alive(p)], "orphaned after the parent's kill -9"
  finally:
    for p in [child.pid] + spawned:
      if _alive(p):
        os.kill(p, signal.SIGKILL)
