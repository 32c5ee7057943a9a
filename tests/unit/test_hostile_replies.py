"""A broken or hostile node cannot crash, stall or take over the server: every bound on what it sends."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from pollen import protocol as P
from pollen.adapter import Adapter, LoraFactors, flatten
from pollen.codec import CodecError, WireSpec, describe, encode
from server_app.nodes import parse_info
from strategies import replies
from strategies.fedavg import FedAvgLora
from tests.unit.test_strategy_glue import _configure, _delta, _global, _reply, _settings


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _huge(value: float) -> Adapter:
    return {
        m: LoraFactors(torch.full_like(p.a, value), torch.full_like(p.b, value), p.scale)
        for m, p in _global().items()
    }


def test_a_huge_update_is_rejected_even_with_only_two_replies() -> None:
    strategy = FedAvgLora(_settings(fraction_train=1.0))
    messages = _configure(strategy, nodes=2)
    new, _ = strategy.aggregate(1, [_reply(messages[0], _delta(0.01)), _reply(messages[1], _huge(1e30))])
    assert new is not None and all(replies.is_finite(p) for p in new.values())
    assert strategy.report.accepted == 1 and "node 2: delta norm" in strategy.report.rejected[0]
    assert "strategy.max-update-ratio=25" in strategy.report.rejected[0]


def test_zero_deltas_do_not_open_the_outlier_filter() -> None:
    strategy = FedAvgLora(_settings(fraction_train=1.0, max_update_ratio=1e6))
    messages = _configure(strategy, nodes=5)
    values = (0.0, 0.0, 0.01, 0.012, 5.0)  # the last is 400x the others, within the (raised) ratio bound
    sent = [_reply(m, _delta(v)) for m, v in zip(messages, values, strict=True)]
    strategy.aggregate(1, sent)
    assert any("over 20.0x the round median" in r for r in strategy.report.rejected)


def test_a_reply_at_another_wire_spec_is_rejected_before_it_is_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strategy = FedAvgLora(_settings(uplink=WireSpec(bits=4)))
    messages = _configure(strategy)

    def no_decode(record: ArrayRecord) -> None:
        raise AssertionError("decoded a reply that its header already disqualified")

    monkeypatch.setattr(replies, "decode", no_decode)
    strategy.aggregate(1, [_reply(messages[0], _delta(0.1))])  # encoded at 32 bits
    assert (
        "encoded 32-bit absmax in blocks of 64; this run's uplink is 4-bit absmax"
        in strategy.report.rejected[0]
    )


def _many_scalars(count: int, block_size: int) -> ArrayRecord:
    """A well-formed 8-bit record of ``count`` 0-d tensors, laid out as pollen.codec.encode would."""

    def raw(values: np.ndarray, dtype: str) -> Array:
        return Array(dtype=dtype, shape=(int(values.size),), stype="pollen.raw", data=values.tobytes())

    index = b"".join(b"0:t%d\0\0" % i for i in range(count))
    return ArrayRecord(
        {
            "header": raw(np.asarray([1, 8, 0, block_size, count], dtype="<i4"), "int32"),
            "index": raw(np.frombuffer(index, dtype=np.uint8), "uint8"),
            "scales": raw(np.full(count, 0x3F80, dtype="<u2"), "uint16"),  # bfloat16 1.0
            "codes": raw(np.full(count, 128, dtype=np.uint8), "uint8"),
        }
    )


def test_a_reply_of_many_tiny_tensors_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    """100,000 0-d tensors at 8 bits in blocks of 65,536: refused on the header's count, nothing decoded."""
    record = _many_scalars(100_000, 65_536)
    with pytest.raises(CodecError, match="declares 100000 tensors, more than the 4 expected"):
        describe(record, max_tensors=4)
    strategy = FedAvgLora(_settings(uplink=WireSpec(bits=8, block_size=65_536)))
    messages = _configure(strategy)
    monkeypatch.setattr(replies, "decode", lambda record: (_ for _ in ()).throw(AssertionError("decoded")))
    strategy.aggregate(1, [_reply(messages[0], _delta(0.1), delta_record=record)])
    assert "declares 100000 tensors" in strategy.report.rejected[0]


def test_a_huge_tensor_name_is_cut_in_the_reason() -> None:
    strategy = FedAvgLora(_settings())
    messages = _configure(strategy)
    tensors = flatten(_delta(0.1))
    tensors["x" * 1_000_000] = torch.zeros(2)
    tensors.pop(next(iter(tensors)))
    strategy.aggregate(1, [_reply(messages[0], _delta(0.1), delta_record=encode(tensors, WireSpec(bits=32)))])
    (reason,) = strategy.report.rejected
    assert "differ from the adapter sent" in reason and len(reason) < 400 and "1000000 characters" in reason


def test_a_node_cannot_claim_more_examples_than_its_partition_or_the_cap(
    caplog: pytest.LogCaptureFixture,
) -> None:
    strategy = FedAvgLora(_settings(fraction_train=1.0, max_node_examples=1000))
    messages = _configure(strategy, nodes=3)
    strategy.partition_sizes = {1: 40}  # node 1 trains a pool partition of 40 examples
    sent = [
        _reply(messages[0], _delta(1.0), examples=1e12),
        _reply(messages[1], _delta(1.0), examples=1e12),  # own data: the server cannot know, so it caps
        _reply(messages[2], _delta(3.0), examples=1000),
    ]
    logging.getLogger("pollen").addHandler(caplog.handler)
    try:
        new, _ = strategy.aggregate(1, sent)
    finally:
        logging.getLogger("pollen").removeHandler(caplog.handler)
    assert new is not None
    assert "node 1: claims 1e+12 examples, but its partition holds 40" in strategy.report.rejected[0]
    assert "node 2 claims 1e+12 examples; it counts for strategy.max-node-examples=1000" in caplog.text
    module, pair = next(iter(_global().items()))
    assert torch.allclose(new[module].a, pair.a + 2.0, atol=1e-5)  # nodes 2 and 3 weigh 1000 each


def test_evaluations_with_impossible_figures_are_left_out() -> None:
    strategy = FedAvgLora(_settings(fraction_evaluate=1.0))
    messages = _configure(strategy)

    def reply(examples: float, loss: float) -> Message:
        record = MetricRecord({P.NUM_EXAMPLES: examples, P.EVAL_LOSS: loss})
        return Message(content=RecordDict({P.METRICS: record}), reply_to=messages[0])

    bad = [
        reply(math.nan, 1.0),
        reply(math.inf, 1.0),
        reply(1e300, 1.0),
        reply(5, -3.3e8),
        reply(5, math.nan),
    ]
    assert strategy.aggregate_evaluate(1, bad) is None
    result = strategy.aggregate_evaluate(1, [*bad, reply(10, 2.0), reply(30, 1.0)])
    assert result is not None and result[P.EVAL_LOSS] == pytest.approx(1.25)


def test_a_non_finite_aggregate_is_discarded_and_the_global_kept() -> None:
    class Broken(FedAvgLora):
        def combine(self, global_adapter: Adapter, updates: object) -> Adapter:  # type: ignore[override]
            return {m: LoraFactors(p.a * math.inf, p.b, p.scale) for m, p in global_adapter.items()}

    strategy = Broken(_settings())
    messages = _configure(strategy)
    assert strategy.aggregate(1, [_reply(messages[0], _delta(0.1))]) == (None, None)
    assert "is not finite" in strategy.report.rejected[0] and strategy.report.accepted == 0


@pytest.mark.parametrize(
    ("rank", "reason"),
    [
        (10**9, "rank=1000000000 is not an integer from 0 to 256"),
        ("16", "rank=16 is not an integer"),
        (8.7, "rank=8.7"),
    ],
)
def test_a_handshake_rank_must_be_a_whole_number_within_the_maximum(rank: object, reason: str) -> None:
    meta: dict[str, Any] = {P.PARTITION_ID: 0, P.RANK: rank, P.FINGERPRINT: "f"}
    meta.update({P.QUANTIZATION: "4bit", P.DEVICE: "cpu"})
    content = RecordDict({P.META: ConfigRecord(meta)})
    reply = Message(content=content, reply_to=_configure(FedAvgLora(_settings()))[0])
    with pytest.raises(ValueError, match=reason):
        parse_info(1, reply, max_rank=256)


def test_a_wrong_array_type_in_the_delta_is_rejected_in_one_line() -> None:
    strategy = FedAvgLora(_settings())
    messages = _configure(strategy)
    junk = ArrayRecord({"header": Array(np.arange(5, dtype=np.int32))})
    strategy.aggregate(1, [_reply(messages[0], _delta(0.1), delta_record=junk)])
    assert len(strategy.report.rejected) == 1 and "\n" not in strategy.report.rejected[0]
