"""Strategy names (``strategy.name``) -> classes; the one place a name is turned into code."""

from __future__ import annotations

from strategies.base import LoraStrategy, StrategySettings
from strategies.fedavg import FedAvgLora
from strategies.ffa import FfaLora
from strategies.flexlora import FlexLoraStrategy
from strategies.flora import FloraStrategy
from strategies.zeropad import ZeroPadLora

STRATEGY_CLASSES: dict[str, type[LoraStrategy]] = {
    cls.name: cls for cls in (FedAvgLora, ZeroPadLora, FloraStrategy, FlexLoraStrategy, FfaLora)
}


def build_strategy(name: str, settings: StrategySettings) -> LoraStrategy:
    """The strategy called ``name``; ValueError naming the accepted names otherwise."""
    if name not in STRATEGY_CLASSES:
        accepted = ", ".join(STRATEGY_CLASSES)
        raise ValueError(f"strategy.name={name!r} is not available: expected one of {accepted}")
    return STRATEGY_CLASSES[name](settings)
