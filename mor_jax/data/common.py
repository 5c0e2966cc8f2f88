"""Small helpers shared by the data modules: errors, paths, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "mor_jax", "datasets")


def data_root(config) -> str:
  """Absolute directory holding prepared datasets ('' -> ~/.cache/...)."""
  d = config.data.data_dir or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(d))


def short_hash(obj: Any, n: int = 10) -> str:
  """Stable short hex digest of a JSON-serialisable object."""
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:n]


@contextlib.contextmanager
def atomic_dir(final: str, marker: str) -> Iterator[str]:
  """Yields a temporary directory that is renamed to `final` on success.

  `marker` is the file (written last inside the directory) whose presence
  means `final` is complete. An exception (or a kill) leaves only a `.tmp-*`
  directory behind, which never looks like a finished result; leftovers of
  dead processes are removed on the next success. A `final` without its
  marker is replaced; a complete one (another process won) is kept.
  """
  parent = os.path.dirname(final)
  os.makedirs(parent, exist_ok=True)
  prefix = os.path.basename(final) + ".tmp-"
  tmp = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isfile(os.path.join(final, marker)):
    shutil.rmtree(tmp, ignore_errors=True)  # finished by another process
  else:
    if os.path.exists(final):
      shutil.rmtree(final)  # a stale, unfinished result
    try:
      os.replace(tmp, final)
    except OSError:
      shutil.rmtree(tmp, ignore_errors=True)
      if not os.path.isfile(os.path.join(final, marker)):
        raise
  # Remove leftovers of earlier interrupted attempts (their process is gone).
  for name in os.listdir(parent):
    if name.startswith(prefix) and not _pid_alive(name[len(prefix):]):
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _pid_alive(tag: str) -> bool:
  try:
    pid = int(tag.split("-", 1)[0])
    os.kill(pid, 0)
  except (ValueError, ProcessLookupError):
    return False
  except OSError:
    return True
  return True


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def ensure_absl_flags_parsed() -> None:
  """grain reads absl flags; mark them parsed when called from pytest/notebooks."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
