"""Print the README's configuration table from pyproject.toml, where every key is documented.

Usage: python scripts/config_table.py   (paste the output into README.md; a test keeps them in sync)
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


if __name__ == "__main__":
    print(config_table((ROOT / "pyproject.toml").read_text()))
