"""Write the README's configuration table from pyproject.toml, where every key is documented.

Usage: python scripts/config_table.py   (rewrites the table between the config-table markers of
README.md; tests/unit/test_docs.py fails when the two disagree)
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config_rows(pyproject_text: str) -> list[tuple[str, str, str]]:
    """(key, default, comment) for each key of [tool.flwr.app.config], in file order."""
    section = pyproject_text.split("[tool.flwr.app.config]", 1)[1]
    rows: list[tuple[str, str, str]] = []
    comment: list[str] = []
    for line in section.splitlines():
        if line.startswith("["):
            break
        if line.startswith("#"):
            comment.append(line.lstrip("# ").strip())
            continue
        match = re.match(r"^([\w.\-]+)\s*=\s*(.+)$", line)
        if match:
            rows.append((match.group(1), match.group(2).strip(), " ".join(comment)))
        comment = []
    return rows


def config_table(pyproject_text: str) -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, comment in config_rows(pyproject_text):
        lines.append(f"| `{key}` | `{default}` | {comment.replace('|', '/')} |")
    return "\n".join(lines)


START, END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def with_table(readme: str, table: str) -> str:
    """``readme`` with the text between the markers replaced by ``table``."""
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table}\n{END}{tail}"


if __name__ == "__main__":
    readme_path = ROOT / "README.md"
    table = config_table((ROOT / "pyproject.toml").read_text())
    readme_path.write_text(with_table(readme_path.read_text(), table))
    print(f"wrote {len(table.splitlines()) - 2} keys into {readme_path}")
