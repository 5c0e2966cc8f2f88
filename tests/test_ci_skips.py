"""tests/conftest.py in CI (CI=true): a skipped test or module fails, unless marked @pytest.mark.environment."""

import os
import shutil
import subprocess
import sys

SUITE = '''
import pytest

def test_runtime_skip():
  pytest.skip("an optional extra is missing")

@pytest.mark.skipif(True, reason="condition")
def test_skipif():
  pass

@pytest.mark.environment("root, to mount a tmpfs")
def test_machine_dependent():
  pytest.skip("not root")

@pytest.mark.xfail(reason="known")
def test_xfail():
  assert False

def test_passes():
  pass
'''


def _run(tmp_path, ci: str, files: dict[str, str]):
  shutil.copy(os.path.join(os.path.dirname(__file__), "conftest.py"), tmp_path / "conftest.py")
  for name, text in files.items():
    (tmp_path / name).write_text(text)
  env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
  env["CI"] = ci
  return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "no:xdist",
                         str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)


def test_skips_fail_in_ci_except_machine_dependent_ones(tmp_path):
  r = _run(tmp_path, "true", {"test_suite.py": SUITE})
  out = r.stdout
  assert r.returncode == 1, out
  assert "FAILED test_suite.py::test_runtime_skip" in out and "skipped in CI (Skipped: an optional extra" in out
  assert "ERROR test_suite.py::test_skipif" in out          # a skipif is decided at setup
  assert "XFAIL test_suite.py::test_xfail" in out and "PASSED test_suite.py::test_passes" in out
  assert "1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error" in out and "not root" in out   # the marked skip stays


def test_module_level_importorskip_fails_in_ci(tmp_path):
  mod = 'import pytest\npytest.importorskip("no_such_module_xyz")\n\ndef test_x():\n  pass\n'
  r = _run(tmp_path, "true", {"test_mod.py": mod})
  assert r.returncode != 0 and "test_mod.py was skipped in CI" in r.stdout, r.stdout


def test_outside_ci_skips_stay_skips(tmp_path):
  r = _run(tmp_path, "", {"test_suite.py": SUITE})
  assert r.returncode == 0, r.stdout
  assert "2 passed" not in r.stdout and "1 passed, 3 skipped, 1 xfailed" in r.stdout, r.stdout
