"""Render README.md from nbs/index.ipynb without Quarto (nbdev_readme needs Quarto).

python tools/readme.py          # write README.md
python tools/readme.py --check  # exit 1 when README.md is out of step with nbs/index.ipynb
"""

import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL_NOTEBOOK_LINK = re.compile(r"\]\((?!https?://|/|#)([^)\s]+\.ipynb)\)")  # e.g. ](tutorials/x.ipynb)


class _Tables(HTMLParser):
    "The <table>s of an HTML output (a pandas or polars frame) as lists of header and body rows."

    def __init__(self):
        super().__init__()
        self.tables, self.cell, self.part = [], None, "body"

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append({"head": [], "body": []})
            self.part = "body"
        elif tag == "thead":
            self.part = "head"
        elif tag == "tbody":
            self.part = "body"
        elif tag == "tr" and self.tables:
            self.tables[-1][self.part].append([])
        elif tag in ("th", "td"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self.cell is not None and self.tables:
            self.tables[-1][self.part][-1].append(" ".join(self.cell.split()))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def html_table_markdown(html: str) -> str | None:
    "The first table of `html` as a markdown table (header rows merged cell by cell), or None."
    parser = _Tables()
    parser.feed(html)
    if not parser.tables or not parser.tables[0]["body"]:
        return None
    t = parser.tables[0]
    width = max(len(r) for r in t["head"] + t["body"])
    head = [next((r[i] for r in t["head"] if i < len(r) and r[i]), "") for i in range(width)]

    def row(cells):
        cells = [c.replace("|", "\\|") for c in cells] + [""] * (width - len(cells))
        return "| " + " | ".join(cells) + " |"

    return "\n".join([row(head), row(["---"] * width), *map(row, t["body"])])


def render_outputs(cell: dict) -> list[str]:
    "What a README reader should see of a code cell's outputs: printed text, and tables as markdown."
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream" and out.get("name") == "stdout":
            parts.append(f"```text\n{''.join(out['text']).rstrip()}\n```")
        elif "data" in out:
            data = out["data"]
            table = html_table_markdown("".join(data["text/html"])) if "text/html" in data else None
            if "text/markdown" in data:
                parts.append("".join(data["text/markdown"]).strip())
            elif table:
                parts.append(table)
            elif "text/plain" in data and not any(k.startswith("image/") for k in data):
                parts.append(f"```text\n{''.join(data['text/plain']).rstrip()}\n```")
    return parts  # images, stderr and errors are left out


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "Markdown cells as they are, code cells as python blocks and their outputs; cells flagged hide are left out."
    parts = []
    for cell in json.loads(nb_path.read_text())["cells"]:
        src = "".join(cell["source"]).strip()
        if not src or src.startswith("#| hide"):
            continue
        if cell["cell_type"] == "markdown":
            parts.append(LOCAL_NOTEBOOK_LINK.sub(r"](nbs/\1)", src))  # links are relative to nbs/ in the site
        else:
            parts += [f"```python\n{src}\n```", *render_outputs(cell)]
    return (
        "<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook -->\n\n"
        + "\n\n".join(parts)
        + "\n"
    )


if __name__ == "__main__":
    text, readme = render(), ROOT / "README.md"
    if "--check" in sys.argv:
        if not readme.exists() or readme.read_text() != text:
            sys.exit("README.md is out of step with nbs/index.ipynb: run `python tools/readme.py`")
        print("README.md matches nbs/index.ipynb")
    else:
        readme.write_text(text)
        print(f"wrote {readme}")
