"""Every figure has a source: `python benchmarks/claims.py --check` passes on the repository, fails on a figure
edited by hand, a missing source, an unknown or unclosed marker, and every result file carries its provenance.

No jax here: claims.py reads JSON and Markdown only, so each check runs in well under a second.
"""

import fnmatch
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMS = os.path.join(REPO, "benchmarks", "claims.py")
MARKER = re.compile(r"<!-- claim:([A-Za-z0-9_.-]+) -->(.*?)<!-- /claim -->", re.S)
PROVENANCE_COMMIT = "bf04ed6"       # tools/provenance.py: result files from later commits must carry provenance
PRE_PROVENANCE = {                  # result files committed before it (their numbers are kept as they were)
    "benchmarks/results/ab_one_house_cpu.json", "benchmarks/results/cpu_train_step_avx512.json",
    "benchmarks/results/gpu_h100_train_throughput.json", "benchmarks/results/gpu_h200_train_throughput.json",
    "benchmarks/results/isoflop/isoflop.json", "benchmarks/results/isoflop_seeds/isoflop_seeds.json",
    "benchmarks/results/token_depths/default_job_step300.json",
    "benchmarks/results/uptrain/uptrain.json", "benchmarks/results/uptrain_long/uptrain.json",
    "benchmarks/results/isoflop_seeds/runs/*.json", "benchmarks/results/uptrain/runs/*.json",
    "benchmarks/results/uptrain_long/runs/*.json",
}


def run_claims(*args, cwd=REPO):
  return subprocess.run([sys.executable, CLAIMS, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def features_claims(text: str) -> list:
  """(ID, text) of every generated figure in the README's features table."""
  section = text.split("## Features", 1)[1].split("\n## ", 1)[0]
  return MARKER.findall(section)


@pytest.fixture()
def readme_copy(tmp_path):
  """A copy of README.md in a folder whose other entries link to the repository's (so its links resolve)."""
  for name in os.listdir(REPO):
    if name not in ("README.md", ".git"):
      os.symlink(os.path.join(REPO, name), tmp_path / name)
  shutil.copy(os.path.join(REPO, "README.md"), tmp_path / "README.md")
  return tmp_path / "README.md"


def test_check_passes_on_the_repository():
  out = run_claims("--check")
  assert out.returncode == 0, out.stdout + out.stderr
  n = int(re.search(r"checked (\d+) generated figures", out.stderr).group(1))
  assert n >= 20, out.stderr                      # README and docs quote their figures through markers


def test_every_features_figure_is_checked(readme_copy):
  original = readme_copy.read_text()
  claims = features_claims(original)
  assert {c for c, _ in claims} >= {"causal-gap", "isoflop-3x-order", "cpu-step", "gpu-mfu", "readme-engine",
                                    "readme-serving", "gguf-logits"}
  ok = run_claims("--check", "--root", REPO, str(readme_copy))
  assert ok.returncode == 0, ok.stdout + ok.stderr                 # the untouched copy passes
  for cid, text in claims:
    m = re.search(r"\d", text)
    assert m, (cid, text)
    edited = text[:m.start()] + str((int(m.group()) + 1) % 10) + text[m.end():]
    readme_copy.write_text(original.replace(f"<!-- claim:{cid} -->{text}<!-- /claim -->",
                                            f"<!-- claim:{cid} -->{edited}<!-- /claim -->", 1))
    out = run_claims("--check", "--root", REPO, str(readme_copy))
    assert out.returncode == 1, (cid, out.stdout)
    line = next(ln for ln in out.stdout.splitlines() if f"claim:{cid}" in ln)
    assert "README.md" in line and "differs from benchmarks/results/" in line, line
    fixed = run_claims("--root", REPO, str(readme_copy))       # without --check: rewritten from the source
    assert fixed.returncode == 0, fixed.stdout
    assert readme_copy.read_text() == original, cid


def test_missing_source_unknown_id_and_unclosed_marker_fail(tmp_path):
  doc = tmp_path / "doc.md"
  doc.write_text("worst <!-- claim:parity-worst -->1e-6<!-- /claim -->\n")
  out = run_claims("--check", "--root", str(tmp_path), str(doc))          # a root without benchmarks/results/
  assert out.returncode == 1
  assert "claim:parity-worst: source benchmarks/results/parity_worst.json does not exist" in out.stdout
  doc.write_text("x <!-- claim:no-such-figure -->1<!-- /claim --> and <!-- claim:causal-gap -->0.1\n")
  out = run_claims("--check", "--root", REPO, str(doc))
  assert out.returncode == 1
  assert "claim:no-such-figure: no registry entry" in out.stdout and "without its '<!-- /claim -->'" in out.stdout
  doc.write_text("[a dead link](nowhere.md) and ![a picture](../benchmarks/results/missing.png)\n")
  out = run_claims("--check", "--root", REPO, str(doc))
  assert out.returncode == 1 and out.stdout.count("points at nothing") == 2, out.stdout
  assert run_claims("--check", str(tmp_path / "absent.md")).returncode == 2


def test_write_result_records_provenance(tmp_path):
  sys.path.insert(0, REPO)
  from mor_jax.tools import provenance  # pylint: disable=import-outside-toplevel
  out = tmp_path / "r.json"
  provenance.write_result(str(out), {"x": 1.5}, conditions={"weights": "random", "batch": 16}, argv=["bench.py"])
  d = json.loads(out.read_text())
  p = d["provenance"]
  assert d["x"] == 1.5 and p["conditions"] == {"weights": "random", "batch": 16}
  assert p["command"].endswith("bench.py") and p["versions"]["jax"] and p["machine"]["cores"] >= 1
  if p["commit"] is not None:                                  # a git checkout: the commit and the dirty flag
    assert re.fullmatch(r"[0-9a-f]{40}", p["commit"]) and isinstance(p["dirty"], bool)
    assert all(not f.startswith(provenance.RESULTS) for f in p.get("dirty_paths", []))
  assert not [f for f in os.listdir(tmp_path) if f != "r.json"]    # no temporary file left behind


def _git(*args):
  return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=30)


def _pre_provenance(rel: str) -> bool:
  return any(fnmatch.fnmatch(rel, pattern) for pattern in PRE_PROVENANCE)


def test_result_files_carry_provenance():
  """A result added or changed since tools/provenance.py carries its commit and the jax version."""
  files = sorted(glob.glob(os.path.join(REPO, "benchmarks", "results", "**", "*.json"), recursive=True))
  assert len(files) > 20
  missing = []
  for path in files:
    rel = os.path.relpath(path, REPO)
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    prov = data.get("provenance") if isinstance(data, dict) else None
    if prov:
      assert re.fullmatch(r"[0-9a-f]{40}", prov.get("commit") or ""), rel
      assert prov.get("versions", {}).get("jax"), rel
    elif not _pre_provenance(rel):
      missing.append(rel)
  assert not missing, f"results without provenance (write them with provenance.write_result): {missing}"


@pytest.mark.environment("a git checkout with its history (a fresh clone has it)")
def test_pre_provenance_files_are_unchanged_since_and_labelled_by_their_commit():
  if _git("cat-file", "-e", PROVENANCE_COMMIT).returncode != 0:
    pytest.skip("not a git checkout with history")
  for path in glob.glob(os.path.join(REPO, "benchmarks", "results", "**", "*.json"), recursive=True):
    rel = os.path.relpath(path, REPO)
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if (isinstance(data, dict) and "provenance" in data) or not _pre_provenance(rel):
      continue
    last = _git("log", "-1", "--format=%H", "--", rel).stdout.strip()
    assert last, f"{rel} is not committed: a new result is written with write_result"
    assert _git("merge-base", "--is-ancestor", last, PROVENANCE_COMMIT).returncode == 0, (
        f"{rel} changed after {PROVENANCE_COMMIT} without provenance: write it with write_result")
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import claims_figures  # pylint: disable=import-outside-toplevel
  for rel, (commit, date) in claims_figures.LEGACY.items():   # the label the docs give a file without provenance
    last = _git("log", "-1", "--format=%H %ad", "--date=short", "--", rel).stdout.split()
    assert last and last[0].startswith(commit) and last[1] == date, (rel, last, commit, date)
