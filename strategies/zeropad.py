"""Zero padding (HetLoRA's layout): nodes train the first r_k slots of one max-rank global adapter.

Each node receives the global factors truncated to its rank (B rescaled to its ``alpha / r_k``); its
delta is zero-padded back to the global rank and the deltas are averaged factor by factor and added to
the global (docs/STRATEGIES.md compares this with HetLoRA's average of trained modules). With
``strategy.norm-weighted`` each node's weight is also multiplied, per module, by the norm of its trained
module (HetLoRA's norm weights). Error feedback is meaningful: every slot persists across rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter, add
from strategies.base import LoraStrategy
from strategies.math.common import pad_pair
from strategies.math.zeropad import zeropad_aggregate
from strategies.replies import NodeUpdate


class ZeroPadLora(LoraStrategy):
    """Zero-pad to the largest rank, aggregate, truncate per node."""

    name = "zeropad"
    projection = "truncate"

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        trained = [u.trained() for u in updates] if self.settings.norm_weighted else None
        mean = zeropad_aggregate([u.delta for u in updates], [u.weight for u in updates], norm_of=trained)
        # The mean delta at the global rank and scale (its rank is the largest node rank).
        padded = {
            module: pad_pair(pair, global_adapter[module].rank, global_adapter[module].scale)
            for module, pair in mean.items()
        }
        return add(global_adapter, padded)
