"""The Flower glue of the strategies: sampling, encoding per node, validation of every reply."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from pollen import protocol as P
from pollen.adapter import Adapter, LoraFactors, flatten, unflatten
from pollen.codec import WireSpec, decode, encode
from strategies.base import StrategySettings
from strategies.fedavg import FedAvgLora

ALPHA, RANK = 16.0, 4


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages are stamped with the run they belong to; outside a Flower process we set one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class FakeGrid:
    """Just enough of a Flower Grid for configure_*: a fixed set of connected node ids."""

    def __init__(self, nodes: Iterable[int]) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


def fake_grid(nodes: Iterable[int]) -> Grid:
    """A FakeGrid typed as the Grid that strategies expect."""
    return cast(Grid, FakeGrid(nodes))


def _settings(**changes: object) -> StrategySettings:
    values: dict[str, object] = dict(
        fraction_train=0.5,
        fraction_evaluate=0.0,
        min_nodes=2,
        alpha=ALPHA,
        global_rank=RANK,
        fingerprint="abc",
        downlink=WireSpec(bits=32),
        seed=0,
        wait_seconds=1.0,
    )
    values.update(changes)
    return StrategySettings(**values)  # type: ignore[arg-type]


def _global() -> Adapter:
    g = torch.Generator().manual_seed(0)
    return {
        f"layers.{i}.q_proj": LoraFactors(
            torch.randn(RANK, 12, generator=g), torch.randn(10, RANK, generator=g), ALPHA / RANK
        )
        for i in range(2)
    }


def _reply(
    message: Message,
    delta: Adapter,
    *,
    examples: float = 10,
    fingerprint: str = "abc",
    rank: int | None = None,
    delta_record: ArrayRecord | None = None,
    drop: str | None = None,
) -> Message:
    records: dict[str, object] = {
        P.DELTA: delta_record if delta_record is not None else encode(flatten(delta), WireSpec(bits=32)),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: examples, P.TRAIN_LOSS: 1.0}),
        P.META: ConfigRecord(
            {
                P.RANK: rank if rank is not None else RANK,
                P.LORA_SCALE: ALPHA / RANK,
                P.FINGERPRINT: fingerprint,
            }
        ),
    }
    if drop:
        del records[drop]
    return Message(content=RecordDict(records), reply_to=message)  # type: ignore[arg-type]


def _delta(value: float) -> Adapter:
    return {
        m: LoraFactors(torch.full_like(p.a, value), torch.full_like(p.b, -value), p.scale)
        for m, p in _global().items()
    }


def _configure(strategy: FedAvgLora, nodes: int = 6) -> list[Message]:
    config = ConfigRecord({P.LR: 0.1})
    messages = list(strategy.train_messages(1, _global(), config, fake_grid(range(1, nodes + 1))))
    assert dict(config) == {P.LR: 0.1}  # the caller's record is never mutated
    return messages


def test_train_messages_sample_and_encode_per_node() -> None:
    messages = _configure(FedAvgLora(_settings()))
    assert len(messages) == 3  # ceil(0.5 * 6)
    again = _configure(FedAvgLora(_settings()))
    assert [m.metadata.dst_node_id for m in messages] == [m.metadata.dst_node_id for m in again]
    for message in messages:
        config = message.content.config_records[P.CONFIG]
        assert config[P.RANK] == RANK and config[P.FINGERPRINT] == "abc" and config[P.LR] == 0.1
        sent = unflatten(decode(message.content.array_records[P.ADAPTER]), scale=ALPHA / RANK)
        for module, pair in _global().items():
            assert torch.equal(sent[module].a, pair.a)


def test_same_seed_samples_the_same_partitions_whatever_the_node_ids() -> None:
    """Node ids are random per run; the draw follows partition ids, so a seeded run is repeatable."""
    sampled = []
    for node_ids in ([11, 52, 7, 90, 33, 64], [5, 4, 3, 2, 1, 6]):
        strategy = FedAvgLora(_settings())
        strategy.node_keys = {node: partition for partition, node in enumerate(node_ids)}
        config = ConfigRecord({P.LR: 0.1})
        messages = strategy.train_messages(1, _global(), config, fake_grid(node_ids))
        sampled.append([strategy.node_keys[m.metadata.dst_node_id] for m in messages])
    assert sampled[0] == sampled[1] and sampled[0] == sorted(sampled[0])


def test_min_nodes_overrides_a_small_fraction() -> None:
    messages = _configure(FedAvgLora(_settings(fraction_train=0.1, min_nodes=4)))
    assert len(messages) == 4


def test_sampling_waits_for_min_nodes_then_fails_clearly() -> None:
    strategy = FedAvgLora(_settings(min_nodes=5, wait_seconds=0.1))
    with pytest.raises(TimeoutError, match="only 2 usable nodes connected"):
        list(strategy.train_messages(1, _global(), ConfigRecord(), fake_grid([1, 2])))


def test_fedavg_adds_the_weighted_mean_delta() -> None:
    strategy = FedAvgLora(_settings())
    messages = _configure(strategy)
    replies = [
        _reply(m, _delta(v), examples=w) for m, v, w in zip(messages, (1.0, 2.0, 4.0), (1, 1, 2), strict=True)
    ]
    new, metrics = strategy.aggregate(1, replies)
    assert new is not None and metrics is not None
    expected = np.average([1.0, 2.0, 4.0], weights=[1, 1, 2])
    for module, pair in _global().items():
        assert torch.allclose(new[module].a, pair.a + expected, atol=1e-6)
        assert torch.allclose(new[module].b, pair.b - expected, atol=1e-6)
    assert metrics[P.NUM_EXAMPLES] == 4 and strategy.report.accepted == 3


def _nan_record() -> ArrayRecord:
    """A well-formed fp32 payload whose values are NaN (a client cannot encode it by accident)."""
    record = encode(flatten(_delta(1.0)), WireSpec(bits=32))
    values = record["values"]
    nan = np.full(len(values.data) // 4, np.nan, dtype="<f4").tobytes()
    record["values"] = Array(dtype=values.dtype, shape=values.shape, stype=values.stype, data=nan)
    return record


def _garbage_record() -> ArrayRecord:
    return ArrayRecord({"junk": Array(np.arange(5, dtype=np.uint8))})


BAD_REPLIES: dict[str, Callable[[Message], Message]] = {
    "fingerprint": lambda m: _reply(m, _delta(1.0), fingerprint="other"),
    "rank": lambda m: _reply(m, _delta(1.0), rank=8),
    "examples": lambda m: _reply(m, _delta(1.0), examples=-3),
    "missing-meta": lambda m: _reply(m, _delta(1.0), drop=P.META),
    "garbage": lambda m: _reply(m, _delta(1.0), delta_record=_garbage_record()),
    "nan": lambda m: _reply(m, _delta(1.0), delta_record=_nan_record()),
    "shape": lambda m: _reply(m, {k: LoraFactors(p.a[:, :5], p.b, p.scale) for k, p in _delta(1.0).items()}),
    "error": lambda m: Message(Error(code=0, reason="out of memory"), reply_to=m),
}


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_a_bad_reply_is_rejected_and_the_round_goes_on(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    strategy = FedAvgLora(_settings())
    messages = _configure(strategy)
    replies = [
        _reply(messages[0], _delta(1.0)),
        _reply(messages[1], _delta(3.0)),
        BAD_REPLIES[kind](messages[2]),
    ]
    with caplog.at_level("WARNING", logger="pollen"):
        new, _ = strategy.aggregate(1, replies)
    assert new is not None
    assert strategy.report.accepted == 2 and len(strategy.report.rejected) == 1
    assert "rejected" in caplog.text
    module, pair = next(iter(_global().items()))
    assert torch.allclose(new[module].a, pair.a + 2.0, atol=1e-6)  # mean of the two good deltas


def test_an_outlier_delta_is_dropped() -> None:
    strategy = FedAvgLora(_settings(fraction_train=1.0))
    messages = _configure(strategy, nodes=4)
    replies = [_reply(m, _delta(v)) for m, v in zip(messages, (1.0, 1.1, 0.9, 24.0), strict=True)]
    strategy.aggregate(1, replies)
    assert strategy.report.accepted == 3 and "over 20.0x" in strategy.report.rejected[0]


def test_no_usable_reply_gives_no_new_global() -> None:
    strategy = FedAvgLora(_settings())
    messages = _configure(strategy)
    assert strategy.aggregate(1, [_reply(messages[0], _delta(1.0), fingerprint="x")]) == (None, None)


def test_flower_hooks_carry_the_stored_adapter_and_agree_with_the_adapter_api() -> None:
    """Flower's Strategy.start loop calls configure_train / aggregate_train with ArrayRecords."""
    from pollen.adapter import from_stored, to_stored

    by_adapter, by_record = FedAvgLora(_settings()), FedAvgLora(_settings())
    grid = fake_grid(range(1, 7))
    sent = by_adapter.train_messages(1, _global(), ConfigRecord({P.LR: 0.1}), grid)
    hooked = list(
        by_record.configure_train(1, ArrayRecord(to_stored(_global())), ConfigRecord({P.LR: 0.1}), grid)
    )
    assert [m.metadata.dst_node_id for m in sent] == [m.metadata.dst_node_id for m in hooked]
    new, _ = by_adapter.aggregate(1, [_reply(m, _delta(1.0)) for m in sent])
    record, _ = by_record.aggregate_train(1, [_reply(m, _delta(1.0)) for m in hooked])
    assert new is not None and record is not None
    stored = from_stored(record.to_torch_state_dict())
    for module, pair in new.items():
        assert torch.equal(stored[module].a, pair.a) and torch.equal(stored[module].b, pair.b)
        assert stored[module].scale == pair.scale


def test_strategy_state_restores_the_downlink_generator_and_refuses_a_bad_one() -> None:
    quantized = _settings(downlink=WireSpec(bits=4))
    first = FedAvgLora(quantized)
    first.train_messages(1, _global(), ConfigRecord(), fake_grid(range(1, 7)))
    state = first.state()
    after = [
        m.content.array_records[P.ADAPTER]
        for m in first.train_messages(2, _global(), ConfigRecord(), fake_grid(range(1, 7)))
    ]
    resumed = FedAvgLora(quantized)
    resumed.restore(state)
    again = [
        m.content.array_records[P.ADAPTER]
        for m in resumed.train_messages(2, _global(), ConfigRecord(), fake_grid(range(1, 7)))
    ]
    for left, right in zip(after, again, strict=True):
        assert all(
            torch.equal(a, b) for a, b in zip(decode(left).values(), decode(right).values(), strict=True)
        )
    with pytest.raises(ValueError, match="downlink-generator"):
        resumed.restore({})
