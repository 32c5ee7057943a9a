"""A node's round without Flower (client_app/worker.py) on the embedded model, and the knobs parser."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from client_app.worker import Worker, load_worker, score_round, train_round
from pollen import protocol as P
from pollen.adapter import Adapter
from pollen.config import RunConfig, parse_run_config
from pollen.protocol import knobs_for
from scripts.flower_run import shipped_run_config
from tasks.synthetic import make_examples

RANK = 4
ROWS = make_examples(24, seed=3)


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return parse_run_config({**shipped_run_config(), "train.local-steps": 2, "train.batch-size": 4})


@pytest.fixture(scope="module")
def worker(cfg: RunConfig) -> Worker:
    return load_worker(cfg)


@pytest.fixture(scope="module")
def received(worker: Worker) -> Adapter:
    worker.host.activate(RANK)
    return worker.host.read()  # a fresh adapter, as round 1 sends it


def _sent(cfg: RunConfig) -> dict[str, Any]:
    """A message config as the server and strategy send it (server_app/app.py train_config + base.py)."""
    knobs = knobs_for(cfg, RANK, server_round=2)
    return {
        P.ROUND: 2,
        P.RANK: RANK,
        P.LR: knobs.lr,
        P.LOCAL_STEPS: knobs.local_steps,
        P.BATCH_SIZE: knobs.batch_size,
        P.MAX_SEQ_LEN: knobs.max_seq_len,
        P.SEED: cfg.seed,
        P.TRAIN_A: True,
        P.UPLINK_BITS: 4,
        P.UPLINK_SCHEME: "absmax",
        P.BLOCK_SIZE: 64,
        P.ERROR_FEEDBACK: True,
        P.FINGERPRINT: "not a knob",
    }


def test_the_parser_reads_every_knob_the_server_sends(cfg: RunConfig) -> None:
    knobs = P.parse_round_knobs(_sent(cfg))
    assert knobs == knobs_for(cfg, RANK, server_round=2)
    assert (knobs.server_round, knobs.rank, knobs.seed, knobs.train_a) == (2, RANK, 0, True)


def test_the_benchmarks_knobs_are_the_servers(cfg: RunConfig) -> None:
    from server_app.app import train_config

    cosine = parse_run_config({**shipped_run_config(), "train.lr-schedule": "cosine"})
    for run in (cfg, cosine):
        record = {**train_config(run, 3), P.ROUND: 3, P.RANK: RANK, P.TRAIN_A: False}
        assert P.parse_round_knobs(record) == knobs_for(run, RANK, server_round=3, train_a=False)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (P.SEED, None, "message config has no 'seed'"),
        (P.SEED, "0", "message config seed='0' is not a number"),
        (P.LOCAL_STEPS, 2.5, "message config local-steps=2.5 is not an integer"),
        (P.LR, True, "message config lr=True is not a number"),
        (P.TRAIN_A, 1, "message config train-a=1 is not a boolean"),
        (P.UPLINK_SCHEME, 4, "message config uplink-scheme=4 is not a string"),
        (P.BATCH_SIZE, 0, "message config batch-size=0 is not valid: expected an integer >= 1"),
    ],
)
def test_the_parser_names_a_missing_or_mistyped_key(
    cfg: RunConfig, key: str, value: Any, message: str
) -> None:
    record = _sent(cfg)
    if value is None:
        del record[key]
    else:
        record[key] = value
    with pytest.raises(ValueError) as raised:
        P.parse_round_knobs(record)
    assert str(raised.value).startswith(message)


def test_a_round_trains_every_factor_and_drops_frozen_a(
    cfg: RunConfig, worker: Worker, received: Adapter
) -> None:
    knobs = knobs_for(cfg, RANK)
    both = train_round(worker, received, knobs, ROWS, partition_id=0, prompt_format="auto")
    assert {name.rsplit(".", 1)[1] for name in both.delta} == {"A", "B"}
    assert all(tensor.abs().sum() > 0 for tensor in both.delta.values())  # no factor left untrained
    assert both.num_examples == len(ROWS) and both.num_prompt_cut == 0
    assert both.train.steps == knobs.local_steps

    frozen = train_round(worker, received, replace(knobs, train_a=False), ROWS, 0, "auto")
    assert frozen.delta.keys() == {name for name in both.delta if name.endswith(".B")}
    assert all(tensor.abs().sum() > 0 for tensor in frozen.delta.values())
    assert worker.host.read().keys() == received.keys()


def test_same_knobs_same_partition_same_delta(cfg: RunConfig, worker: Worker, received: Adapter) -> None:
    knobs = knobs_for(cfg, RANK)
    first, again = (train_round(worker, received, knobs, ROWS, 1, "auto") for _ in range(2))
    assert first.delta.keys() == again.delta.keys()
    assert all(torch.equal(first.delta[name], again.delta[name]) for name in first.delta)
    assert first.train.mean_loss == again.train.mean_loss
    other = train_round(worker, received, knobs, ROWS, 2, "auto")  # another node draws other batches
    assert not all(torch.equal(first.delta[name], other.delta[name]) for name in first.delta)


def test_cut_prompts_are_counted_and_scoring_without_responses_gives_no_loss(
    cfg: RunConfig, worker: Worker, received: Adapter
) -> None:
    knobs = knobs_for(cfg, RANK)
    long_rows = [{**row, "input": row["input"] + " filler" * 40} for row in ROWS[:8]]
    done = train_round(worker, received, knobs, long_rows, 0, "auto")  # 128 tokens: inputs are cut
    assert done.num_prompt_cut == len(long_rows) and done.num_examples == len(long_rows)

    loss, count = score_round(worker, received, knobs, ROWS[:6], "auto")
    assert loss is not None and loss > 0 and count == 6
    assert score_round(worker, received, replace(knobs, max_seq_len=8), ROWS[:6], "auto") == (None, 0)
