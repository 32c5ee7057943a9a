"""The README keeps its contract: two one-line Quickstart commands, CI runs the second, table in sync."""

from __future__ import annotations

import re

from scripts.config_table import END, START, config_table
from tests.conftest import ROOT


def _quickstart_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quickstart\s*$(.*?)(?=^## )", text, re.M | re.S)
    assert section, "README has no Quickstart section"
    return re.findall(r"```bash\n(.*?)```", section.group(1), re.S)


def test_quickstart_has_two_single_line_commands() -> None:
    blocks = _quickstart_blocks()
    assert len(blocks) == 2
    assert all(len(block.strip().splitlines()) == 1 for block in blocks)
    assert "flwr run ." in blocks[0] and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in blocks[0]
    assert "torch==2.13.0" in blocks[0] and "torch==2.13.0" in blocks[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    assert _quickstart_blocks()[1].strip() in (ROOT / ".ci" / "run").read_text()


def test_config_table_matches_pyproject() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == config_table((ROOT / "pyproject.toml").read_text()), "run scripts/config_table.py"
