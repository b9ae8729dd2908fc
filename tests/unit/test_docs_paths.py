"""Every module path and dotted module name the docs mention exists: a stale path after a
move (``raydc/scoring/score_stage.py``) fails here, not in a reader's hands."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("bench/**/*.md")])
# raydc/x/y.py, raydc/x/, bench/x.py, jobs/x.py, tests/x/y.py, scripts/x.sh
# (a glob such as bench/results/long_traces_*.json and a ratio such as raydc/plain are not
# paths: a path ends at a file name with a dot or at a folder's slash)
PATH = re.compile(r"(?<![\w/.-])((?:raydc|bench|jobs|tests|scripts)/[\w./-]*(?:\.\w+|/))(?![\w*])")
# raydc.x.y[.attr] (a module, or a module's attribute)
DOTTED = re.compile(r"(?<![\w./-])(raydc(?:\.[A-Za-z_]\w*)+)")


def _mentions(pattern: re.Pattern) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for m in pattern.finditer(doc.read_text()):
            found.append((doc.relative_to(ROOT).as_posix(), m.group(1).rstrip(".")))
    return found


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_the_docs_name_only_paths_that_exist():
    stale = sorted({(doc, p) for doc, p in _mentions(PATH) if not (ROOT / p).exists()})
    assert not stale, f"stale paths in the docs: {stale}"


def test_the_docs_name_only_modules_that_exist():
    mentions = _mentions(DOTTED)
    assert len(mentions) > 20  # the pattern finds what the docs say
    stale = sorted({(doc, d) for doc, d in mentions if not _resolves(d)})
    assert not stale, f"stale module names in the docs: {stale}"


@pytest.mark.parametrize("path", ["raydc/scoring/score_stage.py", "raydc.scoring.score_stage"])
def test_a_moved_path_would_be_caught(path):
    pattern = PATH if "/" in path else DOTTED
    (hit,) = [m.group(1) for m in pattern.finditer(f"see `{path}` for it")]
    assert hit == path
    assert not (ROOT / hit).exists() and not _resolves(hit)
