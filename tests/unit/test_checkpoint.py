"""Round checkpoints: exact round trip, strict loading, and no half-written state after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from pollen.adapter import Adapter, LoraFactors
from server_app import checkpoint as ck
from server_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_round,
    expected_keys,
    load_checkpoint,
    save_checkpoint,
)


def _adapter(rank: int = 4) -> Adapter:
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(rank, 16, generator=g)  # (rank, in_features)
    b = torch.randn(32, rank, generator=g)  # (out_features, rank)
    v = LoraFactors(a=a * 2, b=b[:8], scale=16.0 / 3.0 / rank)
    # not in sorted order: the order decides the order of random draws, so a checkpoint keeps it
    return {"layers.1.v_proj": v, "layers.0.q_proj": LoraFactors(a=a, b=b, scale=16.0 / 3.0 / rank)}


def _checkpoint(server_round: int = 2, rank: int = 4) -> Checkpoint:
    return Checkpoint(
        round=server_round,
        adapter=_adapter(rank),
        strategy_state={"rng": torch.arange(5, dtype=torch.uint8), "sent": {"3": 4}, "name": "fedavg"},
        metrics=[{"round": r, "eval_loss": 1.0 / r} for r in range(1, server_round + 1)],
        meta={"fingerprint": "abc123", "rank": rank},
    )


def test_round_trip_is_exact(tmp_path: Path) -> None:
    saved = _checkpoint()
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(
        tmp_path, expected=expected_keys(saved.adapter), require={"fingerprint": "abc123"}
    )
    assert loaded.round == 2 and loaded.metrics == saved.metrics and loaded.meta == saved.meta
    assert list(loaded.adapter) == list(saved.adapter) == ["layers.1.v_proj", "layers.0.q_proj"]
    for module, pair in saved.adapter.items():
        got = loaded.adapter[module]
        assert torch.equal(got.a, pair.a) and torch.equal(got.b, pair.b) and got.scale == pair.scale
    assert torch.equal(loaded.strategy_state["rng"], saved.strategy_state["rng"])
    assert loaded.strategy_state["sent"] == {"3": 4} and loaded.strategy_state["name"] == "fedavg"
    assert checkpoint_round(tmp_path) == 2


def test_newer_round_replaces_older_and_leaves_one_adapter_file(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))
    save_checkpoint(tmp_path, _checkpoint(2))
    assert load_checkpoint(tmp_path).round == 2
    assert [p.name for p in tmp_path.glob("adapter-*")] == ["adapter-000002.safetensors"]
    assert not list(tmp_path.glob(".*tmp"))


def test_crash_before_commit_keeps_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, _checkpoint(1))
    real_replace = os.replace

    def crash_on_json(src: str | Path, dst: str | Path) -> None:
        if str(dst).endswith(ck.STATE_FILE):
            raise OSError("power cut")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_json)
    with pytest.raises(OSError, match="power cut"):
        save_checkpoint(tmp_path, _checkpoint(2))
    monkeypatch.undo()
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 1 and len(loaded.metrics) == 1


def test_missing_and_unexpected_keys_are_both_reported(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    expected = expected_keys(_adapter())
    expected["layers.0.v_proj.A"] = expected.pop("layers.0.q_proj.A")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path, expected=expected)
    message = str(info.value)
    assert "missing keys ['layers.0.v_proj.A']" in message
    assert "unexpected keys ['layers.0.q_proj.A']" in message


def test_rank_mismatch_names_key_andexpected_keys(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint(rank=4))
    with pytest.raises(CheckpointError, match=r"proj.A has shape \(4, 16\), this run expects \(8, 16\)"):
        load_checkpoint(tmp_path, expected=expected_keys(_adapter(rank=8)))


def test_required_metadata_must_match(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    with pytest.raises(CheckpointError, match="fingerprint='abc123', this run has fingerprint='zzz'"):
        load_checkpoint(tmp_path, require={"fingerprint": "zzz"})


def test_no_checkpoint_says_where_it_looked(tmp_path: Path) -> None:
    assert checkpoint_round(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint in .*checkpoint.json"):
        load_checkpoint(tmp_path)


def test_damaged_tensor_file_fails_the_checksum(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    tensor_file = next(tmp_path.glob("adapter-*.safetensors"))
    data = bytearray(tensor_file.read_bytes())
    data[-1] ^= 0xFF
    tensor_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the checksum"):
        load_checkpoint(tmp_path)


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    state = tmp_path / ck.STATE_FILE
    document = json.loads(state.read_text())
    document["format"] = 99
    state.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="format 99; this Pollen reads format 2"):
        load_checkpoint(tmp_path)


def test_values_json_cannot_hold_are_refused_before_writing(tmp_path: Path) -> None:
    bad = Checkpoint(round=1, adapter=_adapter(), metrics=[{"eval_loss": float("nan")}])
    with pytest.raises(CheckpointError, match=r"metrics\[0\].eval_loss=nan"):
        save_checkpoint(tmp_path, bad)
    odd = Checkpoint(round=1, adapter=_adapter(), strategy_state={"ids": {1, 2}})
    with pytest.raises(CheckpointError, match="strategy_state.ids is a set"):
        save_checkpoint(tmp_path, odd)
    assert checkpoint_round(tmp_path) is None


@pytest.mark.parametrize("value", ["1e400", "2.5", '"3"', "-1", "true"])
def test_a_round_that_is_not_a_whole_number_is_refused_in_one_line(tmp_path: Path, value: str) -> None:
    save_checkpoint(tmp_path, _checkpoint())
    state = tmp_path / ck.STATE_FILE
    state.write_text(state.read_text().replace('"round": 2', f'"round": {value}'))
    with pytest.raises(CheckpointError, match="round|damaged"):
        checkpoint_round(tmp_path)
    with pytest.raises(CheckpointError, match="round|damaged"):
        load_checkpoint(tmp_path)
