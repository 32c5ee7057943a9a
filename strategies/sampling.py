"""Which nodes a round asks: a bounded wait for enough nodes, then a seeded draw in partition order."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any


def sample_size(available: int, fraction: float, min_nodes: int) -> int:
    """How many of ``available`` nodes a round samples: the fraction rounded up, at least min_nodes."""
    return min(available, max(min_nodes, math.ceil(fraction * available)))


def wait_for_nodes(nodes: Callable[[], list[int]], count: int, timeout: float, what: str) -> list[int]:
    """Poll ``nodes()`` until it lists ``count`` nodes; TimeoutError after ``timeout`` seconds.

    ``what`` names the nodes counted in the error (e.g. "usable nodes"), which also names the setting.
    """
    deadline = time.monotonic() + timeout
    while len(found := nodes()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"only {len(found)} {what} connected within {timeout:.0f} s; strategy.min-nodes is {count}"
            )
        time.sleep(1.0)
    return found


def seeded_sample(
    nodes: Sequence[int], size: int, seed: int, server_round: int, salt: int, order: Callable[[int], Any]
) -> list[int]:
    """``size`` of ``nodes``, drawn from (seed, round, salt) alone, returned in ``order``.

    ``nodes`` must already be in ``order`` (node ids are random per run, partition ids are not), so the
    same seed samples the same data in every run.
    """
    rng = random.Random(seed * 1_000_003 + server_round * 2 + salt)
    return sorted(rng.sample(list(nodes), size), key=order)
