"""Aggregation math for heterogeneous-rank LoRA: pure functions over factor tensors, no Flower imports.

One module per method (``fedavg``, ``zeropad``, ``flora``, ``flexlora``, ``ffa``) plus ``projection``,
which re-expresses an adapter at a node's rank and ``lora_alpha``. Every pair carries its own scale
(``lora_alpha / rank``), so nothing here assumes an alpha or a rank.
"""

from strategies.math.fedavg import average_factors, normalize_weights
from strategies.math.ffa import average_b, ffa_aggregate, shared_a
from strategies.math.flexlora import flexlora_aggregate, lowrank_svd
from strategies.math.flora import fold_into_dense, reproject, stack_factors
from strategies.math.projection import (
    PROJECTION_METHODS,
    SVDFactors,
    adapter_from_svd,
    factors_from_svd,
    pad_rank,
    project_to_rank,
    svd_of_product,
)
from strategies.math.zeropad import product_norm, truncate, zeropad_aggregate

__all__ = [
    "PROJECTION_METHODS",
    "SVDFactors",
    "adapter_from_svd",
    "average_b",
    "average_factors",
    "factors_from_svd",
    "ffa_aggregate",
    "flexlora_aggregate",
    "fold_into_dense",
    "lowrank_svd",
    "normalize_weights",
    "pad_rank",
    "product_norm",
    "project_to_rank",
    "reproject",
    "shared_a",
    "stack_factors",
    "svd_of_product",
    "truncate",
    "zeropad_aggregate",
]
