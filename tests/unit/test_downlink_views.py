"""Downlink by change through the strategy: the server sends adapter minus the node's view, in step."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from pollen import protocol as P
from pollen.adapter import Adapter, LoraFactors, add, flatten
from pollen.codec import WireSpec, decode, encode
from pollen.downlink import apply_payload, load_view, store_view
from strategies.base import StrategySettings
from strategies.fedavg import FedAvgLora

ALPHA, RANK = 16.0, 4


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def fake_grid() -> Grid:
    """A FakeGrid typed as the Grid that strategies expect."""
    return cast(Grid, FakeGrid())


def _adapter(seed: int) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    return {
        "m": LoraFactors(torch.randn(RANK, 64, generator=g), torch.randn(32, RANK, generator=g), ALPHA / RANK)
    }


def _strategy() -> FedAvgLora:
    settings = StrategySettings(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_nodes=2,
        alpha=ALPHA,
        global_rank=RANK,
        fingerprint="fp",
        downlink=WireSpec(bits=4),
        seed=0,
        wait_seconds=1.0,
    )
    return FedAvgLora(settings)


def _receive(message: Message, context: Context) -> Adapter:
    """The node's half: decode against the view it holds, keep the new view."""
    config = message.content.config_records[P.CONFIG]
    held = load_view(context.state, ALPHA / RANK)
    adapter, view = apply_payload(message.content.array_records[P.ADAPTER], config, ALPHA / RANK, held)
    if view is not None:
        store_view(context.state, view)
    return adapter


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _node_round(strategy: FedAvgLora, message: Message, context: Context) -> tuple[Adapter, Message]:
    received = _receive(message, context)
    delta = {"m": LoraFactors(torch.zeros(RANK, 64), torch.full((32, RANK), 0.01), ALPHA / RANK)}
    content = RecordDict(
        {
            P.DELTA: encode(flatten(delta), WireSpec(bits=32)),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: 5}),
            P.META: ConfigRecord({P.RANK: RANK, P.LORA_SCALE: ALPHA / RANK, P.FINGERPRINT: "fp"}),
        }
    )
    return received, Message(content=content, reply_to=message)


def test_node_and_server_agree_on_every_round_and_changes_are_small() -> None:
    strategy = _strategy()
    contexts = {1: _context(), 2: _context()}
    global_adapter = _adapter(0)
    for server_round in (1, 2, 3):
        messages = list(strategy.train_messages(server_round, global_adapter, ConfigRecord(), fake_grid()))
        bases = [m.content.config_records[P.CONFIG][P.DOWNLINK_BASE] for m in messages]
        assert bases == ([P.NO_VIEW] * 2 if server_round == 1 else [server_round - 1] * 2)
        replies = []
        for message in messages:
            node = message.metadata.dst_node_id
            received, reply = _node_round(strategy, message, contexts[node])
            sent = strategy._sent[node]
            assert torch.allclose(received["m"].a, sent["m"].a) and torch.allclose(
                received["m"].b, sent["m"].b
            )
            replies.append(reply)
        new, _ = strategy.aggregate(server_round, replies)
        assert new is not None and strategy.report.accepted == 2
        step = {"m": LoraFactors(torch.zeros(RANK, 64), torch.full((32, RANK), 0.01), ALPHA / RANK)}
        global_adapter = add(global_adapter, step)
    # after round 1 only changes travel: the last change is small next to the adapter itself
    change = decode(messages[0].content.array_records[P.ADAPTER])
    change_norm = sum(float(v.norm()) for v in change.values())
    adapter_norm = sum(float(v.norm()) for v in flatten(global_adapter).values())
    assert change_norm < 0.1 * adapter_norm


def test_a_node_that_lost_its_view_is_refused_then_resent_whole() -> None:
    strategy = _strategy()
    contexts = {1: _context(), 2: _context()}
    messages = list(strategy.train_messages(1, _adapter(0), ConfigRecord(), fake_grid()))
    replies = [_node_round(strategy, m, contexts[m.metadata.dst_node_id])[1] for m in messages]
    strategy.aggregate(1, replies)
    second = list(strategy.train_messages(2, _adapter(0), ConfigRecord(), fake_grid()))
    fresh = _context()  # node 1 restarted and lost its state
    with pytest.raises(ValueError, match="holds version None"):
        _receive(second[0], fresh)
    failed = Message(Error(code=0, reason="lost view"), reply_to=second[0])
    ok = _node_round(strategy, second[1], contexts[2])[1]
    strategy.aggregate(2, [failed, ok])
    third = list(strategy.train_messages(3, _adapter(0), ConfigRecord(), fake_grid()))
    assert third[0].content.config_records[P.CONFIG][P.DOWNLINK_BASE] == P.NO_VIEW
