"""The quickstart notebook runs top to bottom (its code cells, in order, in one namespace) and trains."""

import json
import os

import pytest

NB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "quickstart.ipynb")

pytestmark = pytest.mark.usefixtures("fast_compilation")


@pytest.mark.parametrize("cwd", ["notebooks", "repository root"])
def test_quickstart_notebook_runs(monkeypatch, cwd):
  monkeypatch.chdir(os.path.dirname(NB) if cwd == "notebooks" else os.path.dirname(os.path.dirname(NB)))
  cells = [c for c in json.load(open(NB))["cells"] if c["cell_type"] == "code"]
  ns = {"__name__": "__notebook__"}
  for c in cells:
    exec(compile("".join(c["source"]), NB, "exec"), ns)  # pylint: disable=exec-used
  assert ns["losses"][-1] < 0.5 * ns["losses"][0]          # it learns the passage
  assert isinstance(ns["out"][0].text, str) and ns["out"][0].text
