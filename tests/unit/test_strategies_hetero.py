"""Heterogeneous-rank strategies through their Flower glue: nodes of ranks 2, 4 and 8 in one round."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from pollen import protocol as P
from pollen.adapter import Adapter, LoraFactors, flatten, unflatten
from pollen.codec import WireSpec, decode, encode
from pollen.config import parse_run_config
from server_app.app import train_config
from strategies.base import LoraStrategy, StrategySettings
from strategies.registry import build_strategy

ALPHA = 16.0
RANKS = {1: 2, 2: 4, 3: 8}
SHAPES = {"layers.0.q_proj": (10, 12), "layers.1.v_proj": (6, 12)}  # (out, in)


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class FakeGrid:
    def get_node_ids(self) -> list[int]:
        return list(RANKS)


def fake_grid() -> Grid:
    """A FakeGrid typed as the Grid that strategies expect."""
    return cast(Grid, FakeGrid())


def _strategy(name: str, ffa_lr_multiplier: float = 1.0) -> LoraStrategy:
    settings = StrategySettings(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_nodes=3,
        alpha=ALPHA,
        global_rank=4,
        fingerprint="fp",
        downlink=WireSpec(bits=32),
        seed=3,
        wait_seconds=1.0,
        ffa_lr_multiplier=ffa_lr_multiplier,
    )
    strategy = build_strategy(name, settings)
    strategy.node_ranks = dict(RANKS)
    return strategy


def _fresh(rank: int) -> Adapter:
    g = torch.Generator().manual_seed(rank)
    return {
        m: LoraFactors(torch.rand(rank, i, generator=g) - 0.5, torch.zeros(o, rank), ALPHA / rank)
        for m, (o, i) in SHAPES.items()
    }


def _train(message: Message, train_a: bool, seed: int) -> tuple[Message, Adapter]:
    """What a node does: decode, change its factors, reply with the delta (B only when A is frozen)."""
    rank = P.config_int(message.content.config_records[P.CONFIG], P.RANK)
    received = unflatten(decode(message.content.array_records[P.ADAPTER]), scale=ALPHA / rank)
    g = torch.Generator().manual_seed(seed)
    delta = {
        m: LoraFactors(
            torch.randn(p.a.shape, generator=g) * 0.1 if train_a else torch.zeros_like(p.a),
            torch.randn(p.b.shape, generator=g) * 0.1,
            p.scale,
        )
        for m, p in received.items()
    }
    tensors = flatten(delta)
    if not train_a:
        tensors = {k: v for k, v in tensors.items() if k.endswith(".B")}
    content = RecordDict(
        {
            P.DELTA: encode(tensors, WireSpec(bits=32)),
            P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10 * rank}),
            P.META: ConfigRecord({P.RANK: rank, P.LORA_SCALE: ALPHA / rank, P.FINGERPRINT: "fp"}),
        }
    )
    trained = {m: LoraFactors(p.a + delta[m].a, p.b + delta[m].b, p.scale) for m, p in received.items()}
    return Message(content=content, reply_to=message), trained


def _round(name: str) -> tuple[LoraStrategy, Adapter, Adapter, list[Message], list[Adapter]]:
    strategy = _strategy(name)
    rank = strategy.global_rank(sorted(RANKS.values()))
    start = strategy.initial_global(_fresh(rank))
    messages = list(strategy.train_messages(1, start, ConfigRecord(), fake_grid()))
    replies, trained = zip(*(_train(m, strategy.trains_a, i) for i, m in enumerate(messages)), strict=True)
    new, _ = strategy.aggregate(1, list(replies))
    assert new is not None and strategy.report.accepted == 3, strategy.report.rejected
    return strategy, start, new, list(messages), list(trained)


@pytest.mark.parametrize("name", ["zeropad", "flora", "flexlora", "ffa"])
def test_each_node_gets_its_own_rank(name: str) -> None:
    _, _, new, messages, _ = _round(name)
    for message in messages:
        rank = RANKS[message.metadata.dst_node_id]
        sent = unflatten(decode(message.content.array_records[P.ADAPTER]), scale=ALPHA / rank)
        assert all(p.rank == rank for p in sent.values())
    assert all(p.rank == 8 for p in new.values())


def test_zeropad_pads_and_truncates() -> None:
    _, start, new, messages, _ = _round("zeropad")
    small = next(m for m in messages if m.metadata.dst_node_id == 1)
    sent = unflatten(decode(small.content.array_records[P.ADAPTER]), scale=ALPHA / 2)
    for module, pair in start.items():
        # truncation keeps the first slots; B is rescaled from alpha/8 to alpha/2
        assert torch.allclose(sent[module].a, pair.a[:2])
        assert torch.allclose(sent[module].b * (ALPHA / 2), pair.b[:, :2] * (ALPHA / 8))
        assert new[module].a.shape == pair.a.shape


def test_ffa_never_changes_a_and_sends_b_only() -> None:
    _, start, new, _, _ = _round("ffa")
    for module, pair in start.items():
        assert torch.equal(new[module].a, pair.a)
        assert not torch.equal(new[module].b, pair.b)


@pytest.mark.parametrize(("name", "expected"), [("ffa", 0.015), ("fedavg", 0.003), ("flexlora", 0.003)])
def test_only_ffa_scales_the_training_learning_rate(name: str, expected: float) -> None:
    strategy = _strategy(name, ffa_lr_multiplier=5.0)
    if name == "fedavg":
        strategy.node_ranks = dict.fromkeys(RANKS, 4)  # fedavg needs one rank
    rank = strategy.global_rank(sorted(set(strategy.node_ranks.values())))
    start = strategy.initial_global(_fresh(rank))
    config = ConfigRecord({P.LR: 0.003})
    messages = list(strategy.train_messages(1, start, config, fake_grid()))
    assert len(messages) == len(RANKS)
    for message in messages:
        assert P.config_number(message.content.config_records[P.CONFIG], P.LR) == pytest.approx(expected)
    assert config[P.LR] == 0.003  # the caller's record is untouched


def test_flexlora_global_is_the_truncated_svd_of_the_weighted_products() -> None:
    _, _, new, messages, trained = _round("flexlora")
    weights = [10.0 * RANKS[m.metadata.dst_node_id] for m in messages]
    total = sum(weights)
    for module in SHAPES:
        dense = sum((w / total) * t[module].product().double() for w, t in zip(weights, trained, strict=True))
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        reference = (u[:, :8] * s[:8]) @ vh[:8]
        error = torch.linalg.norm(new[module].product().double() - reference) / torch.linalg.norm(reference)
        assert error < 1e-4


def test_flora_global_is_the_old_product_plus_every_weighted_update() -> None:
    _, start, new, messages, trained = _round("flora")
    weights = [10.0 * RANKS[m.metadata.dst_node_id] for m in messages]
    total = sum(weights)
    for module in SHAPES:
        exact = start[module].product().double()
        for message, weight, after in zip(messages, weights, trained, strict=True):
            rank = RANKS[message.metadata.dst_node_id]
            sent = unflatten(decode(message.content.array_records[P.ADAPTER]), scale=ALPHA / rank)[module]
            exact = exact + (weight / total) * (after[module].product().double() - sent.product().double())
        u, s, vh = torch.linalg.svd(exact, full_matrices=False)
        reference = (u[:, :8] * s[:8]) @ vh[:8]
        error = torch.linalg.norm(new[module].product().double() - reference) / torch.linalg.norm(reference)
        assert error < 1e-4


def test_flora_stack_is_exact_before_reprojection() -> None:
    from strategies.math.flora import stack_with_updates
    from strategies.replies import NodeUpdate

    g = torch.Generator().manual_seed(5)
    base = {"m": LoraFactors(torch.randn(16, 20, generator=g), torch.randn(24, 16, generator=g), ALPHA / 16)}
    updates = []
    for node, rank in enumerate((2, 4, 8, 16)):
        sent = {
            "m": LoraFactors(
                torch.randn(rank, 20, generator=g), torch.randn(24, rank, generator=g), ALPHA / rank
            )
        }
        delta = {
            "m": LoraFactors(
                torch.randn(rank, 20, generator=g), torch.randn(24, rank, generator=g), ALPHA / rank
            )
        }
        updates.append(NodeUpdate(node_id=node, rank=rank, sent=sent, delta=delta, weight=float(node + 1)))
    received, trained = [u.sent for u in updates], [u.trained() for u in updates]
    stacked = stack_with_updates(base, received, trained, [u.weight for u in updates])["m"]
    expected = base["m"].product().double()
    for update in updates:
        change = update.trained()["m"].product().double() - update.sent["m"].product().double()
        expected = expected + (update.weight / 10.0) * change
    error = torch.linalg.norm(stacked.product() - expected) / torch.linalg.norm(expected)
    assert error < 1e-5


def test_a_cosine_schedule_decays_the_rate_nodes_receive_over_the_rounds(run_config: dict[str, Any]) -> None:
    run_config.update(
        {"num-server-rounds": 5, "train.lr": 0.003, "train.lr-schedule": "cosine", "train.lr-min": 0.0003}
    )
    cfg = parse_run_config(run_config)
    strategy = _strategy("zeropad")
    rank = strategy.global_rank(sorted(set(strategy.node_ranks.values())))
    start = strategy.initial_global(_fresh(rank))
    sent = []
    for server_round in range(1, 6):
        config = train_config(cfg, server_round)  # what the ServerApp hands the strategy each round
        messages = list(strategy.train_messages(server_round, start, config, fake_grid()))
        sent.append({P.config_number(m.content.config_records[P.CONFIG], P.LR) for m in messages})
    assert all(len(rates) == 1 for rates in sent)  # one rate per round, the same for every node
    rates = [rates.pop() for rates in sent]
    assert rates[0] == pytest.approx(0.003) and rates[-1] == pytest.approx(0.0003)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:], strict=False))
