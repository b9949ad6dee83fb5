"""`LowRankLinear`: a drop-in for `nn.Linear` whose weight is a principal low-rank term plus a
compact residual term, computed factor by factor (the full matrix is never formed in forward).

    y = (x · downᵀ) · upᵀ  +  (x · residual_downᵀ) · residual_upᵀ  +  bias

shapes: x [..., in], down [rank, in], up [out, rank],
        residual_down [residual_rank, in], residual_up [out, residual_rank].

The residual pair is what layer-wise error compensation trains. It starts with
`residual_up = 0`, so it adds exactly zero until trained, and its parameters count in the
budget like any others. After compensation `merge_residual()` concatenates it onto the
principal factors (exact), so inference runs one pair of thin matmuls.

Factors can be stored as int8 (`quantize_int8`): symmetric, one float scale per row; they are
dequantized on the fly in forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eval.errors import require_positive


def quantize_rows_int8(weight: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, cols] -> (q int8 [rows, cols], scale float32 [rows, 1]) with
    weight · diag(column_scale) ≈ q · scale (column_scale [cols], default ones)."""
    w = weight.detach().float()
    if column_scale is not None:
        w = w * column_scale.float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale), -127, 127).to(torch.int8)
    return q, scale


class LowRankLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        residual_rank: int = 0,
        bias: bool = True,
        int8: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        require_positive("rank", rank)
        require_positive("residual_rank", residual_rank, minimum=0)
        self.in_features, self.out_features = in_features, out_features
        kw = {"device": device, "dtype": dtype}
        if int8:
            # Shells for loading a quantized checkpoint: int8 factors with float row scales.
            self.register_buffer("down_q", torch.zeros(rank, in_features, dtype=torch.int8, device=device))
            self.register_buffer("down_scale", torch.ones(rank, 1, **kw))
            self.register_buffer("down_column_scale", torch.ones(1, in_features, **kw))
            self.register_buffer("up_q", torch.zeros(out_features, rank, dtype=torch.int8, device=device))
            self.register_buffer("up_scale", torch.ones(out_features, 1, **kw))
            self.register_buffer("up_column_scale", torch.ones(1, rank, **kw))
            self.down = self.up = None
        else:
            self.down = nn.Parameter(torch.empty(rank, in_features, **kw))
            self.up = nn.Parameter(torch.empty(out_features, rank, **kw))
            nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
            nn.init.zeros_(self.up)
        self.residual_down = nn.Parameter(torch.empty(residual_rank, in_features, **kw))
        self.residual_up = nn.Parameter(torch.zeros(out_features, residual_rank, **kw))
        nn.init.normal_(self.residual_down, std=1.0 / math.sqrt(in_features))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None

    @classmethod
    def from_factors(
        cls,
        up: torch.Tensor,
        down: torch.Tensor,
        bias: torch.Tensor | None,
        residual_rank: int = 0,
        generator: torch.Generator | None = None,
    ) -> LowRankLinear:
        """Build from factors up [out, r] and down [r, in]; the residual term starts at zero."""
        out_features, rank = up.shape
        layer = cls(down.shape[1], out_features, rank, residual_rank, bias=bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            layer.up.copy_(up)
            layer.down.copy_(down)
            if bias is not None:
                layer.bias.copy_(bias)
            if residual_rank:
                noise = torch.randn(layer.residual_down.shape, generator=generator, dtype=torch.float32)
                layer.residual_down.copy_(noise / math.sqrt(layer.in_features))
        return layer

    @property
    def rank(self) -> int:
        return (self.down if self.down is not None else self.down_q).shape[0]

    @property
    def residual_rank(self) -> int:
        return self.residual_down.shape[0]

    @property
    def is_int8(self) -> bool:
        return self.down is None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The principal factors (up [out, r], down [r, in]) as floats (dequantized if int8)."""
        if self.is_int8:
            dtype = self.down_scale.dtype
            up = self.up_q.to(dtype) * self.up_scale / self.up_column_scale
            down = self.down_q.to(dtype) * self.down_scale / self.down_column_scale
            return up, down
        return self.up, self.down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self.factors()
        y = F.linear(F.linear(x, down), up, self.bias)
        if self.residual_rank:
            y = y + F.linear(F.linear(x, self.residual_down), self.residual_up)
        return y

    def weight_parameters(self) -> int:
        """Weight parameters (biases excluded): (rank + residual_rank) · (in + out)."""
        return (self.rank + self.residual_rank) * (self.in_features + self.out_features)

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight [out, in] (formed only here, never in forward)."""
        up, down = self.factors()
        return up @ down + self.residual_up @ self.residual_down

    @torch.no_grad()
    def fold_to_dense(self) -> nn.Linear:
        """An `nn.Linear` computing the same function."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    @torch.no_grad()
    def merge_residual(self) -> None:
        """Concatenate the residual pair onto the principal factors (the function is unchanged)."""
        if not self.residual_rank or self.is_int8:
            return
        self.down = nn.Parameter(torch.cat([self.down, self.residual_down], dim=0))
        self.up = nn.Parameter(torch.cat([self.up, self.residual_up], dim=1))
        self.residual_down = nn.Parameter(self.residual_down.new_zeros(0, self.in_features))
        self.residual_up = nn.Parameter(self.residual_up.new_zeros(self.out_features, 0))

    @torch.no_grad()
    def quantize_int8(self, column_scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Store the principal factors as int8, one symmetric scale per row (merges the residual first).

        column_scales: (down's [in], up's [rank]) input RMS per column: the factor is quantized
        as W·diag(c) and dequantized as q·scale / c (see `lowrank_vit.quantize`). Default: ones."""
        if self.is_int8:
            return
        self.merge_residual()
        down_c, up_c = column_scales if column_scales is not None else (None, None)
        for name, c in (("down", down_c), ("up", up_c)):
            weight = getattr(self, name).detach()
            if c is None:
                c = torch.ones(weight.shape[1], device=weight.device)
            q, scale = quantize_rows_int8(weight, c)
            delattr(self, name)
            setattr(self, name, None)
            self.register_buffer(f"{name}_q", q)
            self.register_buffer(f"{name}_scale", scale.to(weight.dtype))
            self.register_buffer(f"{name}_column_scale", c.reshape(1, -1).to(weight))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"residual_rank={self.residual_rank}, bias={self.bias is not None}, int8={self.is_int8}"
        )

