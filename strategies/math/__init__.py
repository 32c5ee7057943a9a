"""Aggregation math for heterogeneous-rank LoRA: pure functions over factor tensors, no Flower imports.

``common`` holds the primitives every method shares (weight and shape checks, weighted sums, padding,
stacking); one module per method (``fedavg``, ``zeropad``, ``flora``, ``flexlora``, ``ffa``) builds on it,
plus ``projection``, which re-expresses an adapter at a node's rank and ``lora_alpha``. Every pair carries
its own scale (``lora_alpha / rank``), so nothing here assumes an alpha or a rank.
"""

from strategies.math.common import normalize_weights, pad_pair, stack_factors, stack_products, truncate
from strategies.math.fedavg import average_factors
from strategies.math.ffa import average_b, shared_a
from strategies.math.flexlora import lowrank_svd
from strategies.math.flora import stack_with_updates
from strategies.math.projection import (
    PROJECTION_METHODS,
    SVDFactors,
    balanced_factors,
    factors_from_svd,
    pad_rank,
    project_to_rank,
    svd_of_product,
)
from strategies.math.zeropad import hetlora_weights, product_norm, zeropad_aggregate

__all__ = [
    "PROJECTION_METHODS",
    "SVDFactors",
    "average_b",
    "average_factors",
    "balanced_factors",
    "factors_from_svd",
    "hetlora_weights",
    "lowrank_svd",
    "normalize_weights",
    "pad_pair",
    "pad_rank",
    "product_norm",
    "project_to_rank",
    "shared_a",
    "stack_factors",
    "stack_products",
    "stack_with_updates",
    "svd_of_product",
    "truncate",
    "zeropad_aggregate",
]
