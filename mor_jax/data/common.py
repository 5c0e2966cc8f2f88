"""Small helpers shared by the data modules: paths, hashes, JSON (atomic writes: mor_jax.files)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

DEFAULT_DATA_DIR = os.path.join("~", ".cache", "mor_jax", "datasets")


def data_root(config) -> str:
  """Absolute directory holding prepared datasets ('' -> ~/.cache/...)."""
  d = config.data.data_dir or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(d))


def short_hash(obj: Any, n: int = 10) -> str:
  """Stable short hex digest of a JSON-serialisable object."""
  blob = json.dumps(obj, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:n]


def read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def ensure_absl_flags_parsed() -> None:
  """grain reads absl flags; mark them parsed when called from pytest/notebooks."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
