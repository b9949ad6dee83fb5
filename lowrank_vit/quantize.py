"""8-bit storage of the low-rank factors: symmetric int8, one float scale per row, quantized
in the activation-scaled domain.

The int8 row format itself (`quantize_rows_int8`) lives in `lowrank_vit.layer`, which stores and
dequantizes it; this module chooses the column scales and walks the model. Applied after
compression (the paper reports that mixed-rank compression composes with 8-bit post-training
quantization). Rows are output channels of `up` [out, r] and rank components of
`down` [r, in].

Why activation-scaled: a ViT's LayerNorm outputs have a few outlier channels with activations
orders of magnitude above the rest, and whitened factors (√Σ Vᵀ L⁻¹) have their largest entries
on the *quietest* input directions. Plain per-row int8 then sets each row's step by entries
that barely matter and rounds away the ones that do: on ref-vit it took top-1 from 98 % to 13 %.
So each factor is quantized as W·diag(c), c = the RMS of that factor's input per channel
(from the calibration XᵀX), and dequantized as q·scale / c: the rounding error becomes uniform
in what reaches the output (the SmoothQuant/AWQ idea, exact to store: c is one float per column).
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_vit.layer import LowRankLinear


def input_column_scales(down: torch.Tensor, second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS per input channel of `down` (sqrt diag E[xxᵀ]) and of `up` (the rank-r intermediate
    z = x·downᵀ: sqrt diag(down E[xxᵀ] downᵀ)); second_moment = XᵀX / N [in, in]."""
    c = second_moment.to(torch.float64)
    d = down.detach().to(torch.float64)
    x_rms = c.diagonal().clamp_min(0).sqrt()
    z_rms = torch.einsum("ri,ij,rj->r", d, c, d).clamp_min(0).sqrt()
    return _floor(x_rms).float(), _floor(z_rms).float()


def _floor(rms: torch.Tensor) -> torch.Tensor:
    # A channel that never fires must not get a zero scale (its weights would divide by 0).
    return rms.clamp_min(float(rms.max().clamp_min(1e-12)) * 1e-4)


def quantize_factors_int8(model: nn.Module, second_moments: dict[str, torch.Tensor] | None = None) -> int:
    """Quantize every `LowRankLinear` in `model` in place; returns how many were quantized.

    second_moments: {layer name: XᵀX / N} from calibration; without it a layer is quantized
    plain per row (no activation scaling)."""
    count = 0
    for name, layer in model.named_modules():
        if isinstance(layer, LowRankLinear) and not layer.is_int8:
            layer.merge_residual()
            scales = None
            if second_moments is not None and name in second_moments:
                scales = input_column_scales(layer.down, second_moments[name])
            layer.quantize_int8(scales)
            count += 1
    return count
