"""The talk's saved slides quote the tutorials' code as it is now (the deck reads it when built: rebuild it when a tutorial changes)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest

NBS = Path(__file__).resolve().parents[1] / "nbs"
QUOTES = [  # (tutorial, a string in the quoted cell, the name the slide shows)
    ("add_feature", "def deal_share_28d(", "deal_share_28d"),
    ("custom_model", "def extra_trees(", "extra_trees"),
    ("new_data_source", "class CsvFolderSource", "CsvFolderSource"),
]


def _text(html_text: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", html_text))


def _slides_text() -> str:
    nb = json.loads((NBS / "talk.ipynb").read_text())
    outs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    return "\n".join(_text("".join(o.get("data", {}).get("text/html", ""))) for o in outs)


@pytest.mark.parametrize("tutorial,marker,name", QUOTES)
def test_talk_quotes_the_tutorial(tutorial: str, marker: str, name: str) -> None:
    cells = json.loads((NBS / "tutorials" / f"{tutorial}.ipynb").read_text())["cells"]
    src = next(
        "".join(c["source"]) for c in cells if c["cell_type"] == "code" and marker in "".join(c["source"])
    )
    slides = _slides_text()
    # every line of the tutorial's cell down to the first method body (the source slide elides bodies)
    head = src.split("\n\n    def ")[0] if "class " in marker else src
    missing = [ln for ln in head.splitlines() if ln.strip() and ln not in slides]
    assert not missing, (
        f"talk.ipynb's saved slide for {name} differs from tutorials/{tutorial}.ipynb: {missing[:3]}"
    )
