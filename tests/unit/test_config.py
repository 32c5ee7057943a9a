"""Run/node config parsing: defaults parse, every bad value is named with what is accepted."""

from __future__ import annotations

import re
from typing import Any

import pytest
import tomllib

from pollen.config import ConfigError, known_run_keys, parse_node_config, parse_run_config
from tests.conftest import ROOT


def test_shipped_defaults_parse(run_config: dict[str, Any]) -> None:
    cfg = parse_run_config(run_config)
    assert cfg.model.name == "embedded"
    assert cfg.model.quantization == "4bit"
    assert cfg.lora.rank >= 1 and cfg.lora.target_modules
    assert cfg.strategy.name == "fedavg"


def test_every_key_is_documented_with_a_comment() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.flwr.app.config]", 1)[1]
    lines = section.splitlines()
    for key in known_run_keys():
        index = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(key)}\s*=", line))
        assert lines[index - 1].startswith("#"), f"{key} has no comment above it in pyproject.toml"


def test_pyproject_keys_equal_known_keys(run_config: dict[str, Any]) -> None:
    assert set(run_config) == set(known_run_keys())
    tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("lora.rank", 0, "from 1 to 4096"),
        ("strategy.name", "fedprox", "one of 'fedavg'"),
        ("model.quantization", "3bit", "one of '4bit', '8bit', 'none'"),
        ("train.lr", "fast", "a number between 0 and 1"),
        ("wire.uplink-bits", 5, "one of 32, 16, 8, 4"),
        ("task.partitioner", "zipf", "one of 'dirichlet', 'iid'"),
        ("model.device", "gpu0", "'cuda:N'"),
        ("lora.rank", True, "from 1 to 4096"),
        ("train.lr-schedule", "linear", "one of 'constant', 'cosine'"),
        ("train.lr-min", -0.1, "a number from 0 up to"),
        ("train.micro-batch-size", -1, "0 (the whole batch in one pass) or an integer >= 1"),
        ("eval.every", 0, "an integer >= 1"),
        ("eval.background", "yes", "true or false"),
    ],
)
def test_bad_value_is_named_with_what_is_accepted(
    run_config: dict[str, Any], key: str, value: Any, accepted: str
) -> None:
    run_config[key] = value
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    (line,) = info.value.problems
    assert line.startswith(f"{key}={value!r}") and accepted in line
    assert "\n" not in line


def test_unknown_key_suggests_the_close_one(run_config: dict[str, Any]) -> None:
    run_config["rank"] = 8
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    assert info.value.problems == [
        "rank is not a Pollen config key (did you mean 'lora.rank'?); known keys are listed in pyproject.toml"
    ]


def test_all_problems_are_reported_together(run_config: dict[str, Any]) -> None:
    run_config["lora.rank"] = -1
    run_config["train.batch-size"] = 0
    del run_config["seed"]
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    assert len(info.value.problems) == 3


def test_integers_are_accepted_for_floats(run_config: dict[str, Any]) -> None:
    run_config["lora.alpha"] = 32
    assert parse_run_config(run_config).lora.alpha == 32.0


def test_nf4_needs_a_4bit_direction(run_config: dict[str, Any]) -> None:
    run_config.update({"wire.scheme": "nf4", "wire.uplink-bits": 8, "wire.downlink-bits": 32})
    with pytest.raises(ConfigError, match="nf4"):
        parse_run_config(run_config)


def test_cosine_schedule_cannot_end_above_its_start(run_config: dict[str, Any]) -> None:
    run_config.update({"train.lr-schedule": "cosine", "train.lr": 0.001, "train.lr-min": 0.01})
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    (line,) = info.value.problems
    assert line.startswith("train.lr-min=0.01 is above train.lr=0.001")


def test_node_config_defaults_and_overrides() -> None:
    node = parse_node_config(
        {"partition-id": 3, "num-partitions": 10, "lora-rank": 16, "data-path": "x.jsonl"}
    )
    assert (node.partition_id, node.num_partitions, node.lora_rank, node.data_path) == (3, 10, 16, "x.jsonl")
    lone = parse_node_config({})
    assert (lone.partition_id, lone.num_partitions, lone.lora_rank) == (0, 1, 0)


@pytest.mark.parametrize(
    ("node_config", "fragment"),
    [
        ({"lora-rank": -2}, "lora-rank=-2"),
        ({"partition-id": 5, "num-partitions": 5}, "must be below num-partitions=5"),
        ({"gpu": 1}, "'gpu' is not known"),
    ],
)
def test_bad_node_config(node_config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        parse_node_config(node_config)


@pytest.mark.parametrize(
    ("key", "value", "accepted"),
    [
        ("lora.alpha", float("inf"), "a number > 0"),
        ("lora.alpha", float("nan"), "a number > 0"),
        ("strategy.round-timeout", float("inf"), "a number of seconds > 0"),
        ("strategy.max-update-ratio", float("-inf"), "a number above 0, up to 1e6"),
    ],
)
def test_every_float_must_be_finite(
    run_config: dict[str, Any], key: str, value: float, accepted: str
) -> None:
    run_config[key] = value
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    assert info.value.problems == [f"{key}={value!r} is not valid: expected {accepted}, not inf or nan"]


@pytest.mark.parametrize(("uplink", "downlink"), [(4, 32), (4, 8), (16, 4)])
def test_nf4_needs_4_bits_in_both_directions(run_config: dict[str, Any], uplink: int, downlink: int) -> None:
    """The codec refuses nf4 at any other width, and wire.scheme applies to uplink and downlink alike."""
    run_config.update({"wire.scheme": "nf4", "wire.uplink-bits": uplink, "wire.downlink-bits": downlink})
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    ((key, bits),) = [
        (k, b) for k, b in (("wire.uplink-bits", uplink), ("wire.downlink-bits", downlink)) if b != 4
    ]
    assert info.value.problems == [
        f"{key}={bits} does not fit wire.scheme='nf4': NF4 codes 4-bit payloads only, and the scheme applies "
        f"to both directions; set {key}=4 or use wire.scheme='absmax'"
    ]


def test_every_wire_combination_that_parses_builds_its_wire_spec(run_config: dict[str, Any]) -> None:
    from pollen.codec import WireSpec

    for scheme in ("absmax", "nf4"):
        for uplink in (32, 16, 8, 4):
            for downlink in (32, 16, 8, 4):
                run_config.update(
                    {"wire.scheme": scheme, "wire.uplink-bits": uplink, "wire.downlink-bits": downlink}
                )
                try:
                    wire = parse_run_config(run_config).wire
                except ConfigError:
                    continue
                for bits in (wire.uplink_bits, wire.downlink_bits):
                    WireSpec(bits=bits, scheme=wire.scheme, block_size=wire.block_size)


@pytest.mark.parametrize("name", ["runs/r1", "..\\r1", ".", "x" * 101, "new\nline", "bell\x07"])
def test_run_name_must_be_a_plain_folder_name(run_config: dict[str, Any], name: str) -> None:
    run_config["output.run-name"] = name
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    (line,) = info.value.problems
    assert line.startswith(f"output.run-name={name!r} is not valid: expected a plain folder name")
    assert "at most 100 characters" in line and "\n" not in line


def test_a_long_plain_run_name_is_accepted(run_config: dict[str, Any]) -> None:
    run_config["output.run-name"] = "qlora-smollm2 r16 (seed 3)" + "x" * 74
    assert len(parse_run_config(run_config).output.run_name) == 100


def test_num_train_is_bounded(run_config: dict[str, Any]) -> None:
    run_config["task.num-train"] = 10**8
    with pytest.raises(ConfigError) as info:
        parse_run_config(run_config)
    assert info.value.problems == [
        "task.num-train=100000000 is not valid: expected an integer from 10 to 1000000"
    ]
