"""Measure how notebooks read, as in issue 10 §1: exported-cell size, tests under them, saved outputs.

    python tools/nbstyle.py                      # every nbs/**/*.ipynb, one overall table
    python tools/nbstyle.py --per-notebook       # plus one row per notebook
    python tools/nbstyle.py nbs/12_leakage.ipynb nbs/11_features.ipynb --per-notebook

Definitions (the same for hsml and for the anchors fastcore/nbdev):
- an *exported* cell is a code cell with an `#| export` / `#| exports` directive; its lines are its
  source lines without the directive lines and without trailing blank lines;
- a *test or demo right under* an exported cell: the next code cell exists and is not exported;
- an *example* cell is a code cell that is not exported, not `#| hide`, and not only directives
  (`#| default_exp ...`); it has a *saved output* when its `outputs` list is not empty;
- `show_doc` counts calls to `show_doc(` in code cells; `#| hide` counts cells with that directive.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

DIRECTIVE = re.compile(r"^\s*#\s*\|\s*([\w-]+)")


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _directives(src: str) -> set[str]:
    "Names of the `#| name` directives at the top of a cell."
    out = set()
    for line in src.splitlines():
        m = DIRECTIVE.match(line)
        if m:
            out.add(m.group(1).lower())
        elif line.strip():
            break
    return out


def _body_lines(src: str) -> int:
    "Lines of a cell without its directive lines and trailing blank lines."
    lines = [ln for ln in src.splitlines() if not DIRECTIVE.match(ln)]
    while lines and not lines[-1].strip():
        lines.pop()
    return len(lines)


@dataclass
class Stats:
    "What one notebook (or a set of them) measures."

    name: str
    export_lines: list[int] = field(default_factory=list)  # lines of each exported cell
    tested: int = 0  # exported cells whose next code cell is not exported
    examples: int = 0  # example cells
    with_output: int = 0  # example cells with a saved output
    show_doc: int = 0  # show_doc( calls
    hide: int = 0  # #| hide cells

    def __iadd__(self, o: Stats) -> Stats:
        self.export_lines += o.export_lines
        for k in ("tested", "examples", "with_output", "show_doc", "hide"):
            setattr(self, k, getattr(self, k) + getattr(o, k))
        return self

    def row(self) -> list[str]:
        n = len(self.export_lines)
        med = f"{statistics.median(self.export_lines):g}" if n else "-"
        mx = str(max(self.export_lines)) if n else "-"
        share = f"{self.tested / n:.0%} ({self.tested}/{n})" if n else "-"
        over = sum(x > 100 for x in self.export_lines)
        return [self.name, f"{med} / {mx}", str(over), share, f"{self.with_output} of {self.examples}",
                str(self.show_doc), str(self.hide)]  # fmt: skip


HEADER = ["notebook", "lines per exported cell, median / max", "exported cells > 100 lines",
          "exported cells with a test or demo under them", "example cells with a saved output",
          "show_doc calls", "#| hide cells"]  # fmt: skip


def measure(path: Path) -> Stats:
    "Measure one notebook."
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    st = Stats(path.name)
    info = [(_source(c), _directives(_source(c))) for c in cells]
    exported = [bool(d & {"export", "exports"}) for _, d in info]
    for i, (c, (src, d)) in enumerate(zip(cells, info)):
        st.show_doc += src.count("show_doc(")
        st.hide += "hide" in d
        if exported[i]:
            st.export_lines.append(_body_lines(src))
            st.tested += i + 1 < len(cells) and not exported[i + 1]
        elif "hide" not in d and _body_lines(src):
            st.examples += 1
            st.with_output += bool(c.get("outputs"))
    return st


def table(rows: list[list[str]]) -> str:
    "A markdown table."
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("notebooks", nargs="*", help="notebooks or folders (default: nbs/**/*.ipynb)")
    p.add_argument("--per-notebook", action="store_true", help="one row per notebook, then the total")
    a = p.parse_args(argv)
    paths: list[Path] = []
    for s in a.notebooks or ["nbs"]:
        q = Path(s)
        paths += sorted(q.rglob("*.ipynb")) if q.is_dir() else [q]
    paths = [q for q in paths if ".ipynb_checkpoints" not in q.parts]
    per = [measure(q) for q in paths]
    total = Stats(f"all ({len(per)} notebooks)")
    for st in per:
        total += st
    print(table([st.row() for st in per] + [total.row()] if a.per_notebook else [total.row()]))


if __name__ == "__main__":
    main()
