"""Render README.md from nbs/index.ipynb without Quarto (nbdev_readme needs Quarto).

python tools/readme.py          # write README.md
python tools/readme.py --check  # exit 1 when README.md is out of step with nbs/index.ipynb
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def render(nb_path: Path = ROOT / "nbs" / "index.ipynb") -> str:
    "Markdown cells as they are, code cells as python blocks; cells tagged/flagged hide are left out."
    parts = []
    for cell in json.loads(nb_path.read_text())["cells"]:
        src = "".join(cell["source"]).strip()
        if not src or src.startswith("#| hide"):
            continue
        parts.append(src if cell["cell_type"] == "markdown" else f"```python\n{src}\n```")
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
