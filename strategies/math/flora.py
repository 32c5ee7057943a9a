"""FLoRA (Wang et al., NeurIPS 2024): aggregate by stacking factors, which is exact for any ranks.

Concatenating the clients' factors along the rank axis (A's multiplied by weight and scale) gives one
pair of rank ``sum_k r_k`` whose product is exactly the weighted sum of the clients' products,
``sum_k p_k s_k B_k A_k`` (``common.stack_factors``); averaging A and B separately (FedIT) is not.

Pollen keeps a global adapter and receives factor deltas, so the stack it needs holds the global pair and,
for every node, its trained pair and its received pair with B negated: the product is the old global
product plus every node's weighted change of product (:func:`stack_with_updates`). The stacked rank grows
by twice the node ranks per round, so the strategy re-projects it to the largest node rank by SVD
(``projection.svd_of_product``); folding it into the base weights, as the paper does, would re-quantize
every node's 4-bit base each round. docs/STRATEGIES.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.common import (
    check_layer_shapes,
    check_scales,
    common_modules,
    normalize_weights,
    stack_products,
)


def stack_with_updates(
    global_adapter: Adapter, sent: Sequence[Adapter], trained: Sequence[Adapter], weights: Sequence[float]
) -> Adapter:
    """Per module, a scale-1.0 pair whose product is ``s_g B_g A_g + sum_k p_k s_k (B'_k A'_k - B_k A_k)``.

    ``sent[k]`` is what node ``k`` received (``B_k, A_k`` at its scale ``s_k``), ``trained[k]`` what it
    holds after training (``B'_k, A'_k``, each pair at its own scale, which for a node is ``s_k`` again);
    ``p`` are the normalised ``weights``. Stacked in float64 as
    ``[B_g, B'_1, -B_1, B'_2, -B_2, ...]`` times ``[s_g A_g; p_1 s_1 A'_1; p_1 s_1 A_1; ...]``.
    """
    if len(sent) != len(trained):
        raise ValueError(f"got {len(sent)} received adapters but {len(trained)} trained ones; one of each")
    fractions = normalize_weights(weights, len(sent))
    common_modules([global_adapter, *sent, *trained])
    stacked: Adapter = {}
    for module, pair in global_adapter.items():
        check_layer_shapes(module, [pair, *(s[module] for s in sent), *(t[module] for t in trained)])
        check_scales(module, [pair, *(s[module] for s in sent), *(t[module] for t in trained)])
        parts = [pair]
        stack_weights = [1.0]
        for node_sent, node_trained, fraction in zip(sent, trained, fractions, strict=True):
            received = node_sent[module]
            negated = LoraFactors(a=received.a, b=-received.b, scale=received.scale)  # product -s_k B_k A_k
            parts += [node_trained[module], negated]
            stack_weights += [fraction, fraction]
        stacked[module] = stack_products(parts, stack_weights, torch.float64)
    return stacked
