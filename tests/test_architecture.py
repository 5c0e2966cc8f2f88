"""The repository's shape, checked as tests (issue 37): the import contract of .importlinter (layers, no cycles;
grimp counts function-local imports), `ruff check` clean under pyproject.toml's rules, and the size limits of
/work/shared/docs/style.md: files <= 400 lines, functions <= 80 lines."""

import ast
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80


def _tool(name: str) -> str:
  path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  if path is None:
    pytest.skip(f"{name} is not installed (pip install -r requirements-test.txt)")
  return path


def test_the_import_contract_holds():
  p = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
  assert "2 kept, 0 broken" in p.stdout


def test_ruff_is_clean():
  p = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]


def _python_files():
  for base in ("mor_jax", "benchmarks", "tests", "configs"):
    for r, ds, fs in os.walk(os.path.join(ROOT, base)):
      ds[:] = [d for d in ds if d not in ("__pycache__", "refdata", "data")]
      yield from (os.path.join(r, f) for f in fs if f.endswith(".py"))
  yield os.path.join(ROOT, "main.py")


def test_files_and_functions_stay_small():
  too_big = []
  for path in _python_files():
    rel = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if text.count("\n") > MAX_FILE_LINES:
      too_big.append(f"{rel}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        n = node.end_lineno - node.lineno + 1
        if n > MAX_FUNCTION_LINES:
          too_big.append(f"{rel}:{node.lineno} {node.name}: {n} lines")
  assert not too_big, f"over {MAX_FILE_LINES} lines a file / {MAX_FUNCTION_LINES} a function: {too_big}"
