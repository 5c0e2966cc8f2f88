"""mor_jax.files, the one owner of atomic writes: the old file or the new one, never half of one; a failed write
leaves the old file and no temporary file; the mode of a replaced file is kept; atomic_dir for folders."""

import json
import os
import stat

import pytest

from mor_jax import files


def test_write_text_json_and_copy_replace_whole_files(tmp_path):
  p = str(tmp_path / "a.txt")
  files.write_text(p, "one")
  files.write_text(p, "two", sync=True)
  assert open(p).read() == "two"
  files.write_json(str(tmp_path / "a.json"), {"x": 1})
  assert json.load(open(tmp_path / "a.json")) == {"x": 1} and open(tmp_path / "a.json").read().endswith("\n")
  files.copy_file(p, str(tmp_path / "b.txt"))
  assert open(tmp_path / "b.txt").read() == "two"
  assert sorted(os.listdir(tmp_path)) == ["a.json", "a.txt", "b.txt"]     # no temporary file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  p = str(tmp_path / "r.json")
  files.write_text(p, "old")
  with pytest.raises(TypeError):
    files.write_json(p, {"x": object()})
  with pytest.raises(RuntimeError):
    with files.replacing(p, suffix=".png") as tmp:
      open(tmp, "w").write("half")
      raise RuntimeError("killed")
  assert open(p).read() == "old" and os.listdir(tmp_path) == ["r.json"]


def test_the_mode_of_a_replaced_file_is_kept(tmp_path):
  p = str(tmp_path / "README.md")
  open(p, "w").write("x")
  os.chmod(p, 0o640)
  files.write_text(p, "y")
  assert stat.S_IMODE(os.stat(p).st_mode) == 0o640 and open(p).read() == "y"


def test_atomic_dir_appears_complete_or_not_at_all(tmp_path):
  final = str(tmp_path / "data" / "shards")
  with pytest.raises(RuntimeError):
    with files.atomic_dir(final, "done.json") as tmp:
      open(os.path.join(tmp, "part"), "w").write("x")
      raise RuntimeError("killed")
  assert not os.path.exists(final) and os.listdir(tmp_path / "data") == []
  with files.atomic_dir(final, "done.json") as tmp:
    open(os.path.join(tmp, "done.json"), "w").write("{}")
  assert os.listdir(final) == ["done.json"] and os.listdir(tmp_path / "data") == ["shards"]
