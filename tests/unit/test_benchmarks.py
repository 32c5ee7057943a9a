"""The benchmark scripts' own logic: docs sections, sampling arithmetic, verdicts, the quick aggregation."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path
from typing import Any

import pytest

from benchmarks import aggregation, runlog, strategies, wire
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


def _row(name: str, bits: int | None, loss: float, match: float, seeds: tuple[int, ...] = (0,)) -> Row:
    run = strategies.Run(loss, match, None if bits is None else 1000, 1.0)
    return Row(name, "2,4,8,16", bits, {seed: run for seed in seeds})


def test_verdicts_judge_the_gap_and_the_local_baseline() -> None:
    rows = [
        _row("local-only (mean of nodes)", None, 2.0, 0.05),
        _row("fedavg-fp32", 32, 1.0, 0.20),
        _row("flexlora-int4", 4, 1.1, 0.18),
        _row("zeropad-int4", 4, 2.5, 0.04),
    ]
    lines = verdicts(rows)
    assert "flexlora-int4" in lines[0] and lines[0].endswith("met.") and "NOT" not in lines[0]
    assert "NOT met by zeropad-int4 (exact match 0.040 against 0.050" in lines[1]


def test_verdicts_report_a_gap_too_wide() -> None:
    lines = verdicts([_row("fedavg-fp32", 32, 1.0, 0.30), _row("ffa-int4", 4, 1.0, 0.20)])
    assert "NOT met" in lines[0]


def test_verdicts_compare_means_on_the_seeds_both_rows_ran() -> None:
    local = Row(
        "local-only (mean of nodes)",
        "8",
        None,
        {0: strategies.Run(2.0, 0.20, None, 1.0), 1: strategies.Run(2.0, 0.10, None, 1.0)},
    )
    ffa = Row(
        "ffa-fp32",
        "2,4,8,16",
        32,
        {0: strategies.Run(1.0, 0.15, 10, 1.0), 1: strategies.Run(1.0, 0.18, 10, 1.0)},
    )
    single = _row("flora-fp32", 32, 1.0, 0.19, seeds=(0,))  # behind seed 0 alone, its only seed
    lines = verdicts([local, ffa, single])
    assert "NOT met by flora-fp32 (exact match 0.190 against 0.200" in lines[0]
    assert "ffa-fp32" not in lines[0]  # 0.165 against the mean 0.150 on seeds 0,1: ahead
    assert "seeds both ran (0; 0,1)" in lines[0]


def test_render_tables_means_and_every_seed() -> None:
    rows = [
        _row("centralized", None, 0.5, 0.4),
        Row(
            "fedavg-fp32",
            "8",
            32,
            {0: strategies.Run(1.0, 0.2, 2_000_000, 1.0), 2: strategies.Run(1.2, 0.3, 2_000_000, 3.0)},
        ),
    ]
    text = render("python benchmarks/strategies.py", None, rows, 10, {"centralized": 600, "local-only": 120})
    assert "| centralized | 2,4,8,16 | - | 0 | 0.5000 | 0.400 | - | 1 |" in text
    assert "| fedavg-fp32 | 8 | fp32 | 0,2 | 1.1000 (0.1414) | 0.250 (0.071) | 2.00 | 2 |" in text
    assert "| centralized | 0.400 / 0.5000 | - |" in text  # per-seed table: ran seed 0 only


def test_log_rows_keep_the_newest_run_per_row_and_seed(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    run = strategies.Run(1.0, 0.2, 100, 5.0)
    for seed, loss in ((0, 1.0), (1, 2.0), (0, 3.0)):  # seed 0 measured twice: the later one counts
        runlog.append(
            log,
            strategies.to_record(
                "fedavg-fp32", seed, 10, "abc", dataclasses.replace(run, eval_loss=loss), ""
            ),
        )
    runlog.append(log, strategies.to_record("fedavg-fp32", 2, 5, "abc", run, ""))  # other round count
    runlog.append(log, strategies.to_record("fedavg-fp32", 3, 10, "other", run, ""))  # other config
    (row,) = strategies.logged_rows(strategies.same_experiment(runlog.read(log), 10, "abc"))
    assert row.seeds == [0, 1] and row.runs[0].eval_loss == 3.0 and row.wire_bits == 32 and row.ranks == "8"


def test_runlog_rejects_a_malformed_line_with_its_number(tmp_path: Path) -> None:
    log = tmp_path / "runs.jsonl"
    log.write_text('{"row": "a"}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"runs.jsonl:3: expected a JSON object"):
        runlog.read(log)
    log.write_text('{"row": "a"}\n{"row": \n')
    with pytest.raises(ValueError, match=r"runs.jsonl:2: not a JSON object"):
        runlog.read(log)
    assert runlog.read(tmp_path / "absent.jsonl") == []


def test_git_commit_ignores_what_the_benchmarks_write(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "docs").mkdir()
    for name in ("docs/BENCHMARKS.md", "code.py"):
        (tmp_path / name).write_text("one\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "first")
    clean = runlog.git_commit(tmp_path)
    (tmp_path / "docs" / "BENCHMARKS.md").write_text("a table\n")
    assert runlog.git_commit(tmp_path) == clean and "+" not in clean
    (tmp_path / "code.py").write_text("two\n")
    assert runlog.git_commit(tmp_path) == clean + "+changes"


def test_config_fingerprint_changes_with_any_setting() -> None:
    cfg = shipped_run_config()
    assert runlog.config_fingerprint(cfg) == runlog.config_fingerprint(dict(reversed(list(cfg.items()))))
    assert runlog.config_fingerprint(cfg) != runlog.config_fingerprint({**cfg, "train.lr": 0.5})


def test_keys_added_at_their_earlier_behaviour_keep_logged_runs_valid() -> None:
    """New keys at the value that behaves as before, and 'all-linear' on the embedded model (its seven
    projections, the old default), hash like the config the logged runs were made with (evaluating every
    round, as the learning benchmarks still do)."""
    cfg = {**shipped_run_config(), **runlog.EVERY_ROUND}
    before = {k: v for k, v in cfg.items() if k not in runlog.UNCHANGED_BY_DEFAULT}
    before["lora.target-modules"] = runlog.EMBEDDED_ALL_LINEAR
    assert runlog.config_fingerprint(cfg) == runlog.config_fingerprint(before)
    assert runlog.config_fingerprint(cfg) != runlog.config_fingerprint({**cfg, "task.metric": "label"})
    other_model = {**cfg, "model.name": "smollm2-135m"}
    assert runlog.config_fingerprint(other_model) != runlog.config_fingerprint(
        {**other_model, "lora.target-modules": runlog.EMBEDDED_ALL_LINEAR}
    )


def _outcome(name: str, losses: tuple[float, ...], total: int) -> wire.Outcome:
    setting = {s.name: s for s in wire.SETTINGS}[name]
    n = len(losses)
    return wire.Outcome(setting, tuple(range(n)), (total,) * n, losses, (0.1,) * n, (1.0,) * n)


def test_wire_checks_judge_means_over_seeds() -> None:
    fp32 = _outcome("fp32", (1.00, 1.10, 0.90), 1000)
    int8 = _outcome("int8-ef", (1.01, 1.09, 0.90), 500)  # -0.0% on the mean although seeds move by 1%
    int4 = _outcome("int4-ef", (1.05, 1.15, 0.95), 150)  # +5% on the mean; 0.15x bytes
    lines = wire.checks([fp32, int8, int4])
    assert lines[0].startswith("- int4-ef: mean final eval loss +5.00%") and "NOT met" in lines[0]
    assert "0.150x fp32" in lines[0] and "at most 0.14x: NOT met" in lines[0]
    assert lines[1].startswith("- int8-ef: mean final eval loss +0.00%") and "NOT" not in lines[1]
    assert "per seed +1.00%, -0.91%, +0.00%" in lines[1]


def test_wire_render_shows_means_the_noise_floor_and_progress() -> None:
    fp32 = _outcome("fp32", (1.00, 1.10, 0.90), 2_000_000)
    text = wire.render("python benchmarks/wire.py", None, [fp32], 10, ("Partial: 1 of 7 settings have run.",))
    assert (
        "| fp32 | 32 | 32 | absmax | yes | 0,1,2 | 2.00 | 1.000 | 1.0000 (0.1000) | +0.00% | 0.100 | 1 |"
        in text
    )
    assert "moves by 10.0%" in text and "Partial: 1 of 7" in text and "Checks:" not in text


def test_wire_compares_a_single_seed_setting_with_fp32_on_that_seed() -> None:
    fp32 = _outcome("fp32", (1.00, 1.10, 0.90), 1000)
    fp16 = _outcome("fp16", (1.01,), 500)  # seed 0 only
    assert wire.loss_change(fp16, fp32) == pytest.approx(0.01)
    text = wire.render("python benchmarks/wire.py", None, [fp32, fp16], 10)
    assert "| fp16 | 16 | 16 | absmax | yes | 0 | " in text and "+1.00% |" in text
    assert "the others on the first only" in text


def test_quick_aggregation_matches_dense_route(capsys: pytest.CaptureFixture[str]) -> None:
    assert aggregation.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "FlexLoRA, low-rank route, total" in out and "not checked in this smoke run" in out


def test_round_cost_section_reads_rounds_without_evaluation_and_every_process() -> None:
    from benchmarks import round_cost

    def row(n: int, evaluated: bool) -> dict[str, Any]:
        figures = {"eval_loss": 4.0 - n / 10, "eval_seconds": 8.0} if evaluated else {}
        return {
            "round": n,
            "evaluated": evaluated,
            "train_loss": 5.0,
            "round_seconds": 20.0 + n,
            "fit_seconds": 16.0 + n,
            **figures,
        }

    runs = {
        "a": {
            "rows": [row(n, n % 2 == 0 or n == 3) for n in (1, 2, 3)],
            "wall": 90.0,
            "peak_total": 2 * 1024**3,
            "peaks": {"node actor": 900 * 1024**2, "sh": 4 * 1024**2},
            "counts": {"node actor": 1, "sh": 1},
        },
    }
    text = round_cost.render("cmd", None, 3_670_000, {"seconds": 16.0, "peak_rss_mb": 1300.0}, runs, 571.0)
    assert "| a | 22.5 s | 1.41x | 18.5 s | 1.16x | 8.0 s | 90 s | 2.00 GiB |" in text
    assert "| node actor | 900 (1) |" in text and "| sh |" not in text
    assert "| 1 | – / 5.0000 / 21.0 / 17.0 |" in text and "holds 571 MiB" in text
