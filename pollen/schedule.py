"""Learning rate per federated round: constant, or a cosine decay from ``train.lr`` to ``train.lr-min``.

Nodes start a fresh optimizer every round, so the server picks each round's rate and sends it with the
adapter. A decay lets long runs settle; a short run that is still learning may do better at a constant
rate, which is the default.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "cosine")


def round_lr(schedule: str, lr: float, lr_min: float, server_round: int, num_rounds: int) -> float:
    """The rate for ``server_round`` (1-based) of ``num_rounds``; round 1 trains at ``lr``.

    ``cosine`` reaches ``lr_min`` at the last round: ``lr_min + (lr - lr_min) * (1 + cos(pi t)) / 2``
    with ``t = (round - 1) / (num_rounds - 1)``. Rounds past the end (a resumed, longer run) stay at
    ``lr_min``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if server_round < 1 or num_rounds < 1:
        raise ValueError(f"server_round={server_round}, num_rounds={num_rounds}: both must be >= 1")
    if schedule == "constant" or num_rounds == 1:
        return lr
    progress = min(1.0, (server_round - 1) / (num_rounds - 1))
    return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * progress))
