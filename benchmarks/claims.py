"""Every figure has a source: the figures of README.md and docs/*.md that come from benchmarks/results/, regenerated.

  python benchmarks/claims.py              # rewrite the text between markers from the result files it cites
  python benchmarks/claims.py --check      # exit 1 on any difference, missing source, unknown marker or dead link
  python benchmarks/claims.py --check --root . /tmp/copy/README.md   # check other files against this repository

A figure that comes from a result is written between markers, inline (a table cell, a sentence) or around a block
(a whole table, the marker lines on their own):

    | serving | <!-- claim:readme-serving -->...generated text...<!-- /claim --> | docs |

`benchmarks/claims_registry.py` says, for each ID, which result files it reads (paths relative to the repository)
and how it turns them into text. `--check` prints one line per problem, naming the file, the marker and its
source: the text between markers differs from what the source gives (edited by hand, or the result changed), a
source file does not exist, an ID has no registry entry, a marker is not closed, or a relative Markdown link or
image in these files points at nothing. It changes nothing; without `--check` the differing texts are rewritten
(each file atomically) and the other problems reported the same way. Exit status: 0 clean, 1 problems found,
2 bad arguments. Nothing here imports jax: the check runs in a second.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))     # mor_jax.files (imports nothing heavy: no jax here)

import claims_figures  # noqa: E402  (benchmarks/claims_figures.py: Source, renderers)
import claims_registry  # noqa: E402  (benchmarks/claims_registry.py: ID -> sources and renderer)
from mor_jax import files as files_lib  # noqa: E402

ROOT = os.path.dirname(HERE)
MARKER = re.compile(r"<!-- claim:([A-Za-z0-9_.-]+) -->((?:(?!<!-- claim:).)*?)<!-- /claim -->", re.S)
OPEN = re.compile(r"<!-- claim:")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE = re.compile(r"`[^`\n]*`")


def default_files(root: str) -> list[str]:
  """README.md and docs/*.md under root."""
  return [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def load_source(root: str, rel: str):
  """A source file's contents: parsed JSON for .json, text otherwise."""
  with open(os.path.join(root, rel), encoding="utf-8") as f:
    return json.load(f) if rel.endswith(".json") else f.read()


def render(root: str, cid: str, cache: dict) -> tuple[str | None, list[str]]:
  """(the text claim `cid` gets from its sources, []) or (None, problems)."""
  claim = claims_registry.CLAIMS.get(cid)
  if claim is None:
    return None, ["no registry entry (add it to benchmarks/claims_registry.py)"]
  missing = [s for s in claim.sources if not os.path.isfile(os.path.join(root, s))]
  if missing:
    return None, [f"source {s} does not exist" for s in missing]
  data = []
  for s in claim.sources:
    if s not in cache:
      cache[s] = claims_figures.Source(s, load_source(root, s))
    data.append(cache[s])
  try:
    text = claim.render(*data)
  except (KeyError, ValueError, TypeError, IndexError, ZeroDivisionError) as e:   # a source without what it needs
    return None, [f"cannot render from {', '.join(claim.sources)}: {type(e).__name__}: {e}"]
  return ("\n" + text.strip("\n") + "\n" if claim.block else text), []


def _line_of(text: str, pos: int) -> int:
  return text.count("\n", 0, pos) + 1


def _first_difference(have: str, want: str) -> str:
  a, b = have.splitlines() or [""], want.splitlines() or [""]
  for x, y in zip(a, b):
    if x != y:
      return f"has {x.strip()!r}, source gives {y.strip()!r}"
  return f"has {len(a)} lines, source gives {len(b)}"


def dead_links(path: str, text: str) -> list[str]:
  """Relative Markdown links and images (outside code spans) whose target does not exist."""
  out = []
  for m in LINK.finditer(CODE.sub("", text)):
    target = m.group(1).split("#", 1)[0]
    if not target or re.match(r"^[a-z]+:", target):
      continue
    if not os.path.exists(os.path.join(os.path.dirname(path), target)):
      out.append(f"link to {m.group(1)} points at nothing")
  return out


def process(path: str, root: str, cache: dict, write: bool) -> tuple[list[str], int]:
  """(problem lines, number of claims rewritten) for one Markdown file."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  name = os.path.relpath(path, root) if os.path.abspath(path).startswith(os.path.abspath(root) + os.sep) else path
  problems, pieces, last, changed = [], [], 0, 0
  matches = list(MARKER.finditer(text))
  if len(OPEN.findall(text)) != len(matches):
    problems.append(f"{name}: a '<!-- claim:ID -->' marker without its '<!-- /claim -->' (or nested markers)")
  for m in matches:
    cid, have = m.group(1), m.group(2)
    where = f"{name}:{_line_of(text, m.start())}: claim:{cid}"
    want, errors = render(root, cid, cache)
    claim = claims_registry.CLAIMS.get(cid)
    srcs = ", ".join(claim.sources) if claim else "?"
    problems += [f"{where}: {e}" for e in errors]
    if want is not None and want != have:
      if write:
        pieces += [text[last:m.start(2)], want]
        last = m.end(2)
        changed += 1
      else:
        problems.append(f"{where} differs from {srcs}: {_first_difference(have, want)}")
  problems += [f"{name}: {e}" for e in dead_links(path, text)]
  if changed:
    pieces.append(text[last:])
    files_lib.write_text(path, "".join(pieces))
  return problems, changed


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("files", nargs="*", help="Markdown files (default: README.md and docs/*.md under --root)")
  p.add_argument("--check", action="store_true", help="change nothing; exit 1 when anything differs or is missing")
  p.add_argument("--root", default=ROOT, help="the repository the sources are read from (default: this one)")
  args = p.parse_args(argv)
  if not os.path.isdir(args.root):
    print(f"error: --root {args.root} is not a directory", file=sys.stderr)
    return 2
  files = args.files or default_files(args.root)
  missing = [f for f in files if not os.path.isfile(f)]
  if missing:
    print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
    return 2
  cache, problems, changed, seen = {}, [], 0, 0
  for path in files:
    probs, n = process(path, args.root, cache, write=not args.check)
    problems += probs
    changed += n
    with open(path, encoding="utf-8") as f:
      seen += len(MARKER.findall(f.read()))
  for line in problems:
    print(line)
  verb = "checked" if args.check else f"rewrote {changed} of"
  print(f"claims: {verb} {seen} generated figures in {len(files)} files; {len(problems)} problems",
        file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
