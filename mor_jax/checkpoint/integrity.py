"""Integrity of a saved step: a checksum manifest and a finiteness check of the restored state.

`write_manifest(step_dir)` records the size and SHA-256 of every file of a finished step in
`<step>/checksums.json` (written to a temporary file and renamed, after the save completed; the checkpoint
manager calls it on a background thread).
`verify_manifest(step_dir)` re-reads them before a restore and raises CheckpointCorruptError naming the
first damaged, missing or truncated file. A step without a manifest (written before manifests existed, or
cut between the save and its manifest) is restored without this check. `nonfinite_leaves(tree)` names the
leaves of a restored state that hold NaN or Inf.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mor_jax import files as files_lib
from mor_jax.checkpoint.layout import MANIFEST, CheckpointCorruptError

_CHUNK = 1 << 22


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(_CHUNK), b""):
      h.update(block)
  return h.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), step_dir)
      if rel != MANIFEST and not n.startswith((MANIFEST + ".", "." + MANIFEST + ".")):   # (temporary files)
        out.append(rel)
  return sorted(out)


def write_manifest(step_dir: str) -> str:
  """Writes `<step_dir>/checksums.json` ({relative path: [size, sha256]}) atomically; returns its path."""
  files = {rel: [os.path.getsize(os.path.join(step_dir, rel)), _sha256(os.path.join(step_dir, rel))]
           for rel in _files(step_dir)}
  path = os.path.join(step_dir, MANIFEST)
  files_lib.write_json(path, {"version": 1, "algorithm": "sha256", "files": files}, indent=0, sync=True)
  return path


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> None:
  """Raises CheckpointCorruptError (naming the file) unless every file listed matches its size and checksum."""
  path = os.path.join(step_dir, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      files = json.load(f)["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(f"the checksum manifest {path} is unreadable ({e})", path) from None
  for rel, (size, digest) in sorted(files.items()):
    p = os.path.join(step_dir, rel)
    if not os.path.isfile(p):
      raise CheckpointCorruptError(f"{p} is missing", p)
    got = os.path.getsize(p)
    if got != size:
      raise CheckpointCorruptError(f"{p} has {got} bytes, {size} were written (truncated or overwritten)", p)
    if _sha256(p) != digest:
      raise CheckpointCorruptError(f"{p} does not match its checksum (the bytes changed after it was written)", p)


def nonfinite_leaves(tree) -> list[str]:
  """Paths of the leaves of `tree` holding NaN or Inf (arrays spread over processes are checked on device)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  flat = [(p, x) for p, x in flat if jnp.issubdtype(getattr(x, "dtype", np.int32), jnp.inexact)]
  if not flat:
    return []
  if all(getattr(x, "is_fully_addressable", True) for _, x in flat):
    ok = [bool(np.all(np.isfinite(np.asarray(jax.device_get(x))))) for _, x in flat]
  else:
    ok = [bool(v) for v in jax.device_get(_finite_on_device([x for _, x in flat]))]
  return [jax.tree_util.keystr(p) for (p, _), good in zip(flat, ok) if not good]


@jax.jit
def _finite_on_device(leaves):
  return [jnp.all(jnp.isfinite(x)) for x in leaves]
