"""FFA-LoRA: A frozen at a shared seeded initialisation, only B trained and averaged.

With one A shared by all nodes, averaging B is exact (sum_k p_k s_k B_k A = (sum_k p_k s_k B_k) A),
and the uplink carries B alone: half the factors. Ranks nest: a rank-r node uses the first r rows of
the max-rank A. Error feedback is meaningful for B, which persists across rounds. With A frozen, the
update can only grow along A's fixed random rows and learns slowly at ``train.lr``, so nodes train
with ``train.lr`` times ``strategy.ffa-lr-multiplier`` (its effect is measured in docs/BENCHMARKS.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter, LoraFactors, add
from strategies.base import LoraStrategy
from strategies.math.common import pad_b
from strategies.math.ffa import average_b, shared_a
from strategies.replies import NodeUpdate


class FfaLora(LoraStrategy):
    """Frozen shared A, averaged B."""

    name = "ffa"
    projection = "truncate"
    trains_a = False

    def initial_global(self, fresh: Adapter) -> Adapter:
        """Replace each A by the shared seeded A (B stays zero, so the product starts at zero)."""
        return {
            module: LoraFactors(
                a=shared_a(tuple(pair.a.shape), self.settings.seed, module),  # type: ignore[arg-type]
                b=pair.b,
                scale=pair.scale,
            )
            for module, pair in fresh.items()
        }

    def train_lr(self, lr: float) -> float:
        return lr * self.settings.ffa_lr_multiplier

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        weights = [u.weight for u in updates]
        out: Adapter = {}
        for module, target in global_adapter.items():
            pairs = [u.delta[module] for u in updates]
            mean_b = average_b(
                [p.b for p in pairs], weights, [p.scale for p in pairs], out_scale=target.scale
            )
            out[module] = LoraFactors(
                a=target.a.new_zeros(target.a.shape),
                b=pad_b(mean_b, target.rank),  # (out_features, global_rank)
                scale=target.scale,
            )
        return add(global_adapter, out)
