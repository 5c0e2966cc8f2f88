"""Corpus sources: the Shakespeare conversion and validation plays (sources/shakespeare.py)."""

import pytest

from mor_jax.data import DataError
from mor_jax.data.sources import shakespeare
from tiny import tiny_config


def test_play_documents_plain_text():
  md = ("# The Play\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A\\[B]_\n\n"
        "**ALPHA**  \nTo be, or *not*--to be.  \nWell.\n\n"
        "### SCENE II. Elsewhere.\n\n**BETA**  \nNo.\n\n# EPILOGUE\n\nBye.\n")
  docs = shakespeare.play_documents("the-play", md)
  assert [d[0] for d in docs] == ["the-play/000", "the-play/001",
                                  "the-play/002"]
  assert docs[0][1] == ("The Play\nACT I. SCENE I. A room.\n\nEnter A[B]\n\n"
                        "ALPHA:\nTo be, or not--to be.\nWell.\n")
  assert docs[1][1] == "The Play\nACT I. SCENE II. Elsewhere.\n\nBETA:\nNo.\n"
  assert docs[2][1] == "The Play\nEPILOGUE\n\nBye.\n"


def test_shakespeare_val_plays_deterministic_and_configurable():
  c = tiny_config()
  plays = shakespeare.shakespeare_plays()
  assert len(plays) == 38 and "hamlet" in plays
  v1, v2 = shakespeare.shakespeare_val_plays(c), shakespeare.shakespeare_val_plays(c)
  assert v1 == v2 and len(v1) == 1
  c.data.val_fraction = 0.1
  assert len(shakespeare.shakespeare_val_plays(c)) == 4
  c.data.val_files = ("hamlet", "macbeth.md")
  assert shakespeare.shakespeare_val_plays(c) == ("hamlet", "macbeth")
  c.data.val_files = ("hamlett",)
  with pytest.raises(DataError, match="hamlett"):
    shakespeare.shakespeare_val_plays(c)
