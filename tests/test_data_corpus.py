"""TFDS corpora (corpus.py): the local-corpus builder over sources/files.py, bad inputs, preparation
that is redone after an interruption; no logging filter installed by importing the package."""

import gzip
import json
import logging
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mor_jax.data import DataError, build_corpus, get_tokenizer, prepare
from mor_jax.data import corpus as corpora
from mor_jax.data import preparation as prepare_lib
from tiny import tiny_config


def _config(tmp_path, **data):
  c = tiny_config(vocab=300, seq_len=16, data__corpus="local",
                  data__data_dir=str(tmp_path / "prepared"))
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def _texts(info, split):
  return sorted(corpora.iter_texts(info.dataset_dir, split))


def test_importing_the_data_package_installs_no_logging_filter():
  code = ("import logging, mor_jax.data; "
          "print(len(logging.getLogger('absl').filters), len(logging.getLogger().filters))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ["0", "0"]


def test_tfds_config_notes_are_filtered_only_while_building(tmp_path, caplog):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "a.txt").write_text("alpha")
  (d / "b.txt").write_text("beta")
  with caplog.at_level(logging.INFO, logger="absl"):
    build_corpus(_config(tmp_path, path=str(d), val_files=("b.txt",)))
  notes = ("Using custom data configuration", "Variant folder")   # logged by tfds without the filter
  assert not [r for r in caplog.records if str(r.msg).startswith(notes)]
  assert any("building dataset" in r.getMessage() for r in caplog.records)
  assert not logging.getLogger("absl").filters


def test_local_formats_and_val_files(tmp_path):
  d = tmp_path / "corpus"
  (d / "sub").mkdir(parents=True)
  (d / "a.txt").write_text("alpha doc")
  (d / "b.txt").write_text("beta one\x00SEP\x00beta two")
  with open(d / "c.jsonl", "w") as f:
    f.write(json.dumps({"body": "gamma"}) + "\n\n")
    f.write(json.dumps({"body": "delta", "x": 1}) + "\n")
  with gzip.open(d / "sub" / "e.jsonl.gz", "wt") as f:
    f.write(json.dumps({"body": "epsilon"}) + "\n")
  pq.write_table(pa.table({"body": ["zeta", "eta"], "n": [1, 2]}),
                 d / "f.parquet")
  (d / "README.md").write_text("ignored: not a corpus file type")
  # .txt files have no 'body' column: one document per file / per separator.
  c = _config(tmp_path, path=str(d), text_column="body",
              val_files=("f.parquet", "sub/e.jsonl.gz"),
              txt_separator="\x00SEP\x00")
  info = build_corpus(c)
  assert info.num_docs == {"train": 5, "validation": 3}
  assert _texts(info, "train") == ["alpha doc", "beta one", "beta two",
                                   "delta", "gamma"]
  assert _texts(info, "validation") == ["epsilon", "eta", "zeta"]
  # A second call reuses the built dataset (nothing rewritten).
  stamp = os.path.getmtime(os.path.join(info.dataset_dir,
                                        "dataset_info.json"))
  info2 = build_corpus(c)
  assert info2.dataset_dir == info.dataset_dir
  assert os.path.getmtime(os.path.join(info.dataset_dir,
                                       "dataset_info.json")) == stamp


def test_val_fraction_split_is_deterministic(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  with open(d / "docs.jsonl", "w") as f:
    for i in range(200):
      f.write(json.dumps({"text": f"document number {i}"}) + "\n")
  c1 = _config(tmp_path, path=str(d), val_fraction=0.1)
  info1 = build_corpus(c1)
  c2 = _config(tmp_path / "other", path=str(d / "*.jsonl"), val_fraction=0.1)
  info2 = build_corpus(c2)
  assert info1.dataset_dir != info2.dataset_dir
  val1 = _texts(info1, "validation")
  assert val1 == _texts(info2, "validation")
  assert 8 <= len(val1) <= 35  # ~10% of 200
  assert info1.num_docs["train"] + len(val1) == 200
  assert not set(val1) & set(_texts(info1, "train"))


def test_empty_corpus_errors(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(DataError, match=f"{empty}.*no .txt"):
    build_corpus(_config(tmp_path, path=str(empty)))
  with pytest.raises(DataError, match="matches no file"):
    build_corpus(_config(tmp_path, path=str(tmp_path / "nope" / "*.txt")))
  with pytest.raises(DataError, match="config.data.path is empty"):
    build_corpus(_config(tmp_path, path=""))
  blank = tmp_path / "blank"
  blank.mkdir()
  (blank / "a.txt").write_text("   \n")
  (blank / "b.txt").write_text("")
  with pytest.raises(DataError, match="no training documents"):
    build_corpus(_config(tmp_path, path=str(blank), val_files=("b.txt",)))


def test_unreadable_file_error(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "ok.txt").write_text("fine")
  os.symlink(tmp_path / "missing-target.txt", d / "broken.txt")
  with pytest.raises(DataError, match="broken.txt"):
    build_corpus(_config(tmp_path, path=str(d)))


def test_truncated_files_error_and_leave_nothing_valid(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "ok.txt").write_text("fine")
  blob = gzip.compress(("\n".join(json.dumps({"text": f"row {i}"})
                                  for i in range(2000))).encode())
  (d / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
  c = _config(tmp_path, path=str(d), val_files=("ok.txt",))
  with pytest.raises(DataError, match="cut.jsonl.gz.*truncated"):
    build_corpus(c)
  assert not corpora.make_builder(c).is_prepared()
  # Fixing the file makes the next run build from scratch.
  (d / "cut.jsonl.gz").write_bytes(blob)
  assert build_corpus(c).num_docs == {"train": 2000, "validation": 1}

  p = tmp_path / "pq"
  p.mkdir()
  pq.write_table(pa.table({"text": [f"t{i}" for i in range(500)]}),
                 p / "full.parquet")
  raw = (p / "full.parquet").read_bytes()
  (p / "cut.parquet").write_bytes(raw[: len(raw) - 40])
  with pytest.raises(DataError, match="cut.parquet.*truncated"):
    build_corpus(_config(tmp_path, path=str(p), val_files=("full.parquet",)))


def test_missing_text_column_errors(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  pq.write_table(pa.table({"content": ["a", "b"]}), d / "x.parquet")
  with pytest.raises(DataError, match=r"x.parquet has no column 'text'.*"
                     r"content.*text_column"):
    build_corpus(_config(tmp_path, path=str(d)))
  d2 = tmp_path / "corpus2"
  d2.mkdir()
  (d2 / "y.jsonl").write_text(json.dumps({"content": "a"}) + "\n")
  with pytest.raises(DataError, match=r"y.jsonl.*no 'text' field.*"
                     r"text_column"):
    build_corpus(_config(tmp_path, path=str(d2)))


def _corrupt_corpus(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  with open(d / "train.jsonl", "wb") as f:
    f.write(json.dumps({"text": "good one"}).encode() + b"\n")
    f.write(b'{"text": "bad \xff\xfe utf8"}\n')  # invalid UTF-8
    f.write(b'{"text": "unterminated\n')        # invalid JSON
    f.write(json.dumps({"text": 7}).encode() + b"\n")  # not a string
    f.write(json.dumps({"text": "good two"}).encode() + b"\n")
  (d / "bad.txt").write_bytes(b"latin-1 \xe9t\xe9")
  (d / "val.txt").write_text("validation")
  return d


def test_corrupt_records_skipped_and_counted(tmp_path):
  d = _corrupt_corpus(tmp_path)
  info = build_corpus(_config(tmp_path, path=str(d), val_files=("val.txt",)))
  assert _texts(info, "train") == ["good one", "good two"]
  assert info.metadata["skipped_records"] == 4
  assert info.metadata["skipped_by_file"] == {str(d / "bad.txt"): 1,
                                              str(d / "train.jsonl"): 3}


def test_corrupt_record_fails_by_config(tmp_path):
  d = _corrupt_corpus(tmp_path)
  c = _config(tmp_path, path=str(d), val_files=("val.txt",),
              on_corrupt_record="fail")
  with pytest.raises(DataError, match=r"bad.txt.*invalid UTF-8.*"
                     r"on_corrupt_record='skip'"):
    build_corpus(c)
  (d / "bad.txt").unlink()
  with pytest.raises(DataError, match=r"train.jsonl \(line 2\).*UTF-8"):
    build_corpus(c)


def test_validation_split_empty_error(tmp_path):
  d = tmp_path / "corpus"
  d.mkdir()
  (d / "only.txt").write_text("just one document")
  with pytest.raises(DataError, match="validation split.*empty.*val_files"):
    build_corpus(_config(tmp_path, path=str(d), val_fraction=0.001))


def test_interrupted_pretokenize_is_redone(tmp_path, monkeypatch):
  d = tmp_path / "corpus"
  d.mkdir()
  words = ("the quick brown fox jumps over lazy dogs while seven wizards "
           "quietly hum jazz vexing bold nymphs").split()
  for i in range(6):
    (d / f"{i}.txt").write_text(
        " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(300)))
  c = _config(tmp_path, path=str(d), val_files=("0.txt",), pretokenized=True,
              prepare_workers=1)
  calls = []

  def boom(job):
    calls.append(job["split"])
    with open(job["path"], "wb") as f:
      f.write(b"half-written")
    raise KeyboardInterrupt("killed")

  real = prepare_lib._tokenize_shard
  monkeypatch.setattr(prepare_lib, "_tokenize_shard", boom)
  with pytest.raises(KeyboardInterrupt):
    prepare(c)
  info_dir = corpora.make_builder(c).data_dir
  assert calls and not [n for n in os.listdir(info_dir)
                        if n.startswith("tokens-")]
  # A kill leaves a temporary directory and maybe a final one without its
  # completion marker: neither counts as prepared.
  tokens_dir = prepare_lib.tokens_dir_for(
      build_corpus(c), get_tokenizer(c))
  os.makedirs(tokens_dir + ".tmp-999999999-x")
  os.makedirs(tokens_dir)
  (open(os.path.join(tokens_dir, "train.array_record-00000-of-00001"), "w")
   .write("junk"))
  monkeypatch.setattr(prepare_lib, "_tokenize_shard", real)
  info = prepare(c)
  assert info.tokens_dir == tokens_dir
  assert info.tokens["splits"]["train"]["num_docs"] == 5
  assert sorted(n for n in os.listdir(info_dir) if n.startswith("tokens-")) \
      == [os.path.basename(tokens_dir)]
