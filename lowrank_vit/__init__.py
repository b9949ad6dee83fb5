"""Activation-aware mixed-rank compression of vision transformers (and causal-LM linears).

    from lowrank_vit import MixedRankConfig, compress, save_pretrained, load_compressed
    report = compress(model, calib_batches, MixedRankConfig(keep=0.4))   # in place
    save_pretrained(model, "out/model"); model = load_compressed("out/model")

Pieces: `calibration` (XᵀX per layer, float64, hooks) → `decompose` (whitened / ASVD / plain SVD)
→ `allocate` (global greedy ranks under the budget) → `LowRankLinear` → `compensate`
(sequential layer-wise error compensation) → optional `quantize` (int8 factors).
"""

from lowrank_vit.config import METHODS, ROLES, MixedRankConfig
from lowrank_vit.layer import LowRankLinear
from lowrank_vit.model import (
    compress,
    count_weights,
    find_targets,
    load_compressed,
    save_pretrained,
)

__all__ = ["METHODS", "ROLES", "MixedRankConfig", "LowRankLinear", "compress", "count_weights", "find_targets", "load_compressed", "save_pretrained"]
