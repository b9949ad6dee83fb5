"""8-bit storage of the low-rank factors: symmetric int8, one float scale per row.

Applied after compression (the paper reports that mixed-rank compression composes with 8-bit
post-training quantization). Rows are output channels of `up` [out, r] and rank components of
`down` [r, in]; with whitened factors each row's range is balanced (√σ on both sides).
"""

from __future__ import annotations

import torch
from torch import nn


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, cols] -> (q int8 [rows, cols], scale float32 [rows, 1]); weight ≈ q · scale."""
    scale = weight.detach().abs().amax(dim=1, keepdim=True).float() / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(weight.detach().float() / scale), -127, 127).to(torch.int8)
    return q, scale


def quantize_factors_int8(model: nn.Module) -> int:
    """Quantize every `LowRankLinear` in `model` in place; returns how many were quantized."""
    from lowrank_vit.layer import LowRankLinear

    layers = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    for layer in layers:
        layer.quantize_int8()
    return len(layers)
