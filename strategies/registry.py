"""Strategy names (``strategy.name``) -> classes; the one place a name is turned into code."""

from __future__ import annotations

from strategies.base import LoraStrategy, StrategySettings
from strategies.fedavg import FedAvgLora

STRATEGY_CLASSES: dict[str, type[LoraStrategy]] = {
    FedAvgLora.name: FedAvgLora,
}


def build_strategy(name: str, settings: StrategySettings) -> LoraStrategy:
    """The strategy called ``name``; ValueError naming the accepted names otherwise."""
    if name not in STRATEGY_CLASSES:
        raise ValueError(
            f"strategy.name={name!r} is not available: expected one of {', '.join(STRATEGY_CLASSES)}"
        )
    return STRATEGY_CLASSES[name](settings)
