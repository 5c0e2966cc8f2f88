"""Files users rely on, replaced atomically: the one owner of "write to a temporary file, then rename" (no imports
from mor_jax: every layer may use it). A reader sees the old file or the new one, never half of one; a failed
write leaves the old file as it was and no temporary file behind. `atomic_dir` does the same for a folder of
results (prepared data, tokenizers): it appears complete or not at all."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from typing import Any, Iterator


@contextlib.contextmanager
def replacing(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path next to `path` (same folder, so the rename is atomic) that the caller writes; renamed
  over `path` when the block ends without an error, removed otherwise. `suffix`: e.g. '.png' for matplotlib. The
  new file keeps the mode of the one it replaces (else the umask's, as open() gives)."""
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")
  try:
    yield tmp
    if os.path.exists(path):
      os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(path: str, text: str, *, sync: bool = False) -> None:
  """`text` to `path` atomically (`sync`: flushed to the disk before the rename)."""
  with replacing(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      if sync:
        f.flush()
        os.fsync(f.fileno())


def write_json(path: str, obj: Any, *, indent: int | None = 2, default=None, sync: bool = False) -> None:
  """`obj` as JSON (with a final newline) to `path` atomically."""
  write_text(path, json.dumps(obj, indent=indent, default=default) + "\n", sync=sync)


def copy_file(src: str, dst: str) -> None:
  """A copy of `src` at `dst`, atomically."""
  with replacing(dst) as tmp:
    shutil.copyfile(src, tmp)


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
