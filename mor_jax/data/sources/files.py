"""A user's corpus files: `.txt[.gz]`, `.jsonl[.gz]` and `.parquet`.

`list_local_files(config.data.path)` resolves a directory, glob or file to
the corpus files; `iter_file_documents(path, ...)` yields the documents of one
file. FineWeb-Edu's layout (parquet with a `text` column) reads as it is.
Unreadable or truncated files raise DataError; a corrupt record goes to a
`CorruptRecords` policy (skip and count, or fail).
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
import zlib
from typing import Iterator

from absl import logging

from mor_jax.errors import DataError

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_MAX_LOGGED_CORRUPT = 10


def _walk(root: str) -> list[str]:
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    found.extend(os.path.join(dirpath, name) for name in filenames)
  return found


def _files_of_dir(root: str) -> list[str]:
  found = _walk(root)
  files = sorted(f for f in found if f.endswith(SUPPORTED_SUFFIXES))
  if not files:
    others = sorted(os.path.relpath(f, root) for f in found)[:5]
    raise DataError(
        f"the local corpus {root} contains no .txt, .txt.gz, .jsonl, "
        f".jsonl.gz or .parquet files (found: {others or 'nothing'}). "
        "Fix: point config.data.path at a directory or glob of such files.")
  return files


def list_local_files(path: str) -> tuple[str, list[str]]:
  """Resolves config.data.path to (root, sorted absolute files)."""
  if not path:
    raise DataError(
        "config.data.corpus='local' but config.data.path is empty. Fix: set "
        "config.data.path to a directory or glob of .txt/.jsonl[.gz]/.parquet "
        "files, or use config.data.corpus='shakespeare'.")
  expanded = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(expanded):
    return expanded, _files_of_dir(expanded)
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


class CorruptRecords:
  """Counts (or raises on) corrupt records, per file; also counts empty ones."""

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
    self.by_file[path] = self.by_file.get(path, 0) + 1
    if self.total <= _MAX_LOGGED_CORRUPT:
      logging.warning("skipping corrupt record in %s (%s): %s", path, where,
                      why)

  @property
  def total(self) -> int:
    return sum(self.by_file.values())


def _unreadable(path: str, e: OSError) -> DataError:
  return DataError(
      f"cannot read {path}: {e.strerror or e}. Fix: check that the file "
      "exists and is readable, or remove it from config.data.path.")


def _open_binary(path: str):
  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise _unreadable(path, e) from e
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
                        corrupt: CorruptRecords) -> Iterator[tuple[int, str]]:
  """Yields (record index in file, text) of one corpus file.

  Unreadable/truncated files and a missing text column raise DataError; a
  corrupt record (bad JSON line, invalid UTF-8, non-string or null text) goes
  to `corrupt` (skip and count, or fail).
  """
  try:
    if path.endswith(TEXT_SUFFIXES):
      yield from _iter_txt(path, txt_separator, corrupt)
    elif path.endswith(JSONL_SUFFIXES):
      yield from _iter_jsonl(path, text_column, corrupt)
    else:
      yield from _iter_parquet(path, text_column, corrupt)
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise _truncated(path, e) from e
  except OSError as e:
    if isinstance(e, (FileNotFoundError, PermissionError)):
      raise _unreadable(path, e) from e
    raise _truncated(path, e) from e


def _iter_txt(path, separator, corrupt):
  """A text file: one document, or one per `separator`."""
  with _open_binary(path) as f:
    for i, blob in enumerate(_split_stream(f, separator.encode("utf-8"))):
      try:
        text = blob.decode("utf-8")
      except UnicodeDecodeError as e:
        corrupt(path, f"document {i}", f"invalid UTF-8 at byte {e.start}")
        continue
      yield i, text


def _iter_jsonl(path, column, corrupt):
  """JSON lines: the `column` field of each object."""
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


def _parquet_file(path, column):
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
  return pf


def _binary_column(path, column, col):
  """A string/binary arrow column as binary (decoded per row: bad UTF-8 is found)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
    return col.cast(pa.large_binary())
  if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
    return col
  raise DataError(
      f"{path}: column {column!r} has type {col.type}, not text. Fix: "
      "set config.data.text_column to the column that holds the text.")


def _iter_parquet(path, column, corrupt):
  """Parquet: the `column` of each row (null and invalid UTF-8 are corrupt)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  pf = _parquet_file(path, column)
  row = 0
  try:
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
      for value in _binary_column(path, column, batch.column(0)).to_pylist():
        if value is None:
          corrupt(path, f"row {row}", f"{column!r} is null")
        else:
          try:
            yield row, value.decode("utf-8")
          except UnicodeDecodeError as e:
            corrupt(path, f"row {row}", f"invalid UTF-8 at byte {e.start}")
        row += 1
  except (pa.ArrowException, OSError) as e:
    raise _truncated(path, e) from e
