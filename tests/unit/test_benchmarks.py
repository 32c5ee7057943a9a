"""The benchmark scripts' own logic: docs sections, sampling arithmetic, verdicts, the quick aggregation."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import aggregation
from benchmarks.report import nodes_per_round, write_section
from benchmarks.strategies import Row, render, verdicts
from scripts.flower_run import shipped_run_config


def test_write_section_adds_then_replaces_only_its_own_block(tmp_path: Path) -> None:
    docs = tmp_path / "BENCHMARKS.md"
    write_section("wire", "first", docs)
    write_section("other", "kept", docs)
    write_section("wire", "second", docs)
    text = docs.read_text()
    assert "second" in text and "first" not in text and "kept" in text
    assert text.count("<!-- wire:start -->") == 1


def test_write_section_refuses_broken_markers(tmp_path: Path) -> None:
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text("<!-- wire:end -->\n<!-- wire:start -->\n")
    with pytest.raises(ValueError, match="broken wire section"):
        write_section("wire", "new", docs)


def test_nodes_per_round_follows_fraction_and_minimum() -> None:
    cfg = shipped_run_config()
    assert nodes_per_round({**cfg, "strategy.fraction-train": 0.5, "strategy.min-nodes": 2}, 10) == 5
    assert nodes_per_round({**cfg, "strategy.fraction-train": 0.05, "strategy.min-nodes": 2}, 10) == 2
    assert nodes_per_round({**cfg, "strategy.fraction-train": 0.5, "strategy.min-nodes": 20}, 10) == 10


def _row(name: str, bits: int | None, loss: float, match: float) -> Row:
    return Row(name, "2,4,8,16", bits, loss, match, None if bits is None else 1000, 1.0)


def test_verdicts_judge_the_gap_and_the_local_baseline() -> None:
    rows = [
        _row("local-only (mean of nodes)", None, 2.0, 0.05),
        _row("fedavg-fp32", 32, 1.0, 0.20),
        _row("flexlora-int4", 4, 1.1, 0.18),
        _row("zeropad-int4", 4, 2.5, 0.04),
    ]
    lines = verdicts(rows)
    assert "flexlora-int4" in lines[0] and lines[0].endswith("met.") and "NOT" not in lines[0]
    assert "NOT met by zeropad-int4" in lines[1]


def test_verdicts_report_a_gap_too_wide() -> None:
    lines = verdicts([_row("fedavg-fp32", 32, 1.0, 0.30), _row("ffa-int4", 4, 1.0, 0.20)])
    assert "NOT met" in lines[0]


def test_render_tables_every_row() -> None:
    rows = [_row("centralized", None, 0.5, 0.4), _row("fedavg-fp32", 32, 1.0, 0.2)]
    text = render("python benchmarks/strategies.py", None, rows, 10, {"centralized": 600, "local-only": 120})
    assert "| centralized | 2,4,8,16 | - | 0.5000 | 0.400 | - |" in text
    assert "| fedavg-fp32 | 2,4,8,16 | fp32 | 1.0000 | 0.200 | 0.00 |" in text


def test_quick_aggregation_matches_dense_route(capsys: pytest.CaptureFixture[str]) -> None:
    assert aggregation.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "FlexLoRA, low-rank route, total" in out and "not checked in this smoke run" in out
