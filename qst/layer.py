"""The side network's building blocks: downsamplers, the side decoder block, gates, the
output mix, and the side network that chains them over the backbone's hidden states.

Nothing here knows the backbone's architecture: the side network only sees a list of hidden
states [batch, seq, d] and the tensor the backbone's LM head consumes [batch, seq, d_out].

Side decoder block (this package's own; the same for every backbone): pre-norm, causal
multi-head self-attention with the backbone's head count (head_dim = width / heads) and rotary
position embeddings (RoPE, positions from the attention mask so left padding is handled), then
an FFN of width ffn / r (SwiGLU by default; plain act(up) -> down when initialised from a
backbone whose MLP is plain). Keys and values of past tokens are kept in `SideKVCache` for
generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from qst.config import QSTConfig

# ---------------------------------------------------------------------------------------------
# Downsamplers: d -> width (= d // r)


class LinearDownsampler(nn.Module):
    """One d -> d/r projection (d * d/r parameters)."""

    def __init__(self, d: int, width: int):
        super().__init__()
        self.proj = nn.Linear(d, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class LoRADownsampler(nn.Module):
    """d -> k -> d/r, no nonlinearity (k * (d + d/r) parameters)."""

    def __init__(self, d: int, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, width, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(h))


class AdapterDownsampler(nn.Module):
    """d -> k, swish, k -> d/r, LayerNorm(d/r) (the paper's default)."""

    def __init__(self, d: int, width: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d, rank)
        self.up = nn.Linear(rank, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.up(F.silu(self.down(h))))


class PoolDownsampler(nn.Module):
    """Max or mean over groups of r neighbouring channels; no parameters (needs r | d)."""

    def __init__(self, r: int, mode: str):
        super().__init__()
        self.r, self.mode = r, mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        groups = rearrange(h, "... (w r) -> ... w r", r=self.r)
        return groups.amax(-1) if self.mode == "max" else groups.mean(-1)

    def extra_repr(self) -> str:
        return f"r={self.r}, mode={self.mode}"


def make_downsampler(kind: str, d: int, width: int, r: int, rank: int) -> nn.Module:
    if kind == "linear":
        return LinearDownsampler(d, width)
    if kind == "lora":
        return LoRADownsampler(d, width, rank)
    if kind == "adapter":
        return AdapterDownsampler(d, width, rank)
    if kind in ("maxpool", "avgpool"):
        return PoolDownsampler(r, kind.removesuffix("pool"))
    raise ValueError(f"unknown downsampler {kind!r}")


# ---------------------------------------------------------------------------------------------
# The side decoder block


@dataclasses.dataclass(frozen=True)
class SideBlockSpec:
    """Shape and flavour of every side block (saved with the side network)."""

    width: int
    num_heads: int
    ffn_width: int
    ffn_kind: str = "gated"  # "gated": down(act(gate x) * up x); "plain": down(act(up x))
    activation: str = "silu"  # a name in transformers.activations.ACT2FN
    bias: bool = False
    norm: str = "rms"  # "rms" or "layer"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def make_norm(kind: str, width: int, eps: float) -> nn.Module:
    return RMSNorm(width, eps) if kind == "rms" else nn.LayerNorm(width, eps=eps)


class SideKVCache:
    """Keys and values of the tokens seen so far, per side block: [batch, heads, past, head_dim]."""

    def __init__(self):
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (e.g. drop finished sequences)."""
        for layer in self.keys:
            self.keys[layer] = self.keys[layer].index_select(0, index)
            self.values[layer] = self.values[layer].index_select(0, index)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [batch, 1, seq, rot] for RoPE on the first `rot` (even) dims of a head."""
    rot = head_dim - head_dim % 2
    inv_freq = 1.0 / theta ** (torch.arange(0, rot, 2, device=position_ids.device, dtype=torch.float32) / max(rot, 1))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, S, rot/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, S, rot]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    if rot == 0:  # head_dim 1: nothing to rotate; causal attention still orders tokens
        return x
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class SideAttention(nn.Module):
    def __init__(self, spec: SideBlockSpec):
        super().__init__()
        w = spec.width
        self.num_heads = spec.num_heads
        self.q_proj = nn.Linear(w, w, bias=spec.bias)
        self.k_proj = nn.Linear(w, w, bias=spec.bias)
        self.v_proj = nn.Linear(w, w, bias=spec.bias)
        self.o_proj = nn.Linear(w, w, bias=spec.bias)

    def forward(self, x, cos, sin, mask, cache: SideKVCache | None, layer: int) -> torch.Tensor:
        # x: [B, S, w]; mask: [B, 1, S, past + S] (bool, True = may attend, or additive float),
        # or None for plain causal attention over these S tokens (see `side_attention_mask`)
        split = lambda t: rearrange(t, "b s (h d) -> b h s d", h=self.num_heads)  # noqa: E731
        q = apply_rotary(split(self.q_proj(x)), cos, sin)
        k = apply_rotary(split(self.k_proj(x)), cos, sin)
        v = split(self.v_proj(x))
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # is_causal with no mask tensor: nothing [B, 1, S, S] to read, and fully masked key blocks
        # are skipped (exact only when queries and keys are the same S tokens: no past keys)
        causal = mask is None and q.shape[2] > 1
        if causal and q.shape[2] != k.shape[2]:
            raise ValueError("mask=None means causal attention without past keys; pass a mask when there is a cache")
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        return self.o_proj(rearrange(out, "b h s d -> b s (h d)"))


class SideMLP(nn.Module):
    def __init__(self, spec: SideBlockSpec):
        super().__init__()
        from transformers.activations import ACT2FN

        self.gated = spec.ffn_kind == "gated"
        if self.gated:
            self.gate_proj = nn.Linear(spec.width, spec.ffn_width, bias=spec.bias)
        self.up_proj = nn.Linear(spec.width, spec.ffn_width, bias=spec.bias)
        self.down_proj = nn.Linear(spec.ffn_width, spec.width, bias=spec.bias)
        self.act = ACT2FN[spec.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))


class SideBlock(nn.Module):
    """Pre-norm decoder block of width d/r."""

    def __init__(self, spec: SideBlockSpec):
        super().__init__()
        self.attn_norm = make_norm(spec.norm, spec.width, spec.norm_eps)
        self.attn = SideAttention(spec)
        self.mlp_norm = make_norm(spec.norm, spec.width, spec.norm_eps)
        self.mlp = SideMLP(spec)

    def forward(self, x, cos, sin, mask, cache: SideKVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


# ---------------------------------------------------------------------------------------------
# Gates and the output mix


class Gate(nn.Module):
    """g_i = (1 - beta) * down_i(h_i) + beta * side_i(g_{i-1}), beta = sigmoid(gamma)."""

    def __init__(self, width: int, init: float, per_channel: bool):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width if per_channel else 1,), float(init)))

    def forward(self, down: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        beta = torch.sigmoid(self.gamma)
        return (1 - beta) * down + beta * side


# ---------------------------------------------------------------------------------------------
# The side network


def causal_mask_is_exact(attention_mask: torch.Tensor | None, past: int) -> bool:
    """True when plain causal attention (SDPA `is_causal=True`, no mask tensor) gives the same
    outputs at every real token as `side_attention_mask`: no past keys, and no padding or right
    padding only (each row 1..1 0..0). With right padding a real token's causal window holds only
    real tokens; only the outputs at pad positions change, and nothing reads those (their
    labels are -100, classification pools the last real token, and causality keeps them out of
    every real token's window in later blocks)."""
    if past:
        return False
    if attention_mask is None:
        return True
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def side_attention_mask(attention_mask: torch.Tensor | None, batch: int, seq: int, past: int,
                        device: torch.device) -> torch.Tensor:
    """Bool [B, 1, S, past + S]: causal, padding keys masked, and each token always sees itself
    (a fully masked row would give NaN for left-padding positions, whose outputs are unused)."""
    total = past + seq
    q_pos = torch.arange(past, total, device=device)[:, None]
    k_pos = torch.arange(total, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, seq, total)
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, None, -total:].bool()
    return mask | (k_pos == q_pos)[None, None]


def side_position_ids(attention_mask: torch.Tensor | None, batch: int, seq: int, past: int,
                      device: torch.device) -> torch.Tensor:
    """Positions [B, S] counting only real tokens (left padding starts at 0), like HF generate."""
    if attention_mask is None:
        return torch.arange(past, past + seq, device=device)[None].expand(batch, seq)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -seq:]


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


class SideNetwork(nn.Module):
    """Downsamplers, side blocks, gates, final norm, upsampler and (paper mix only) alpha.

    `states` is [h_0, h_{l_1}, ..., h_{l_K}]: the embedding output and the outputs of the K
    backbone layers that feed a side block. There are K + 1 downsamplers and K blocks and gates.
    """

    def __init__(self, config: QSTConfig, spec: SideBlockSpec, hidden_size: int, out_size: int, num_blocks: int):
        super().__init__()
        self.config, self.spec = config, spec
        self.downsamplers = nn.ModuleList(
            make_downsampler(config.downsample, hidden_size, spec.width, config.r, config.adapter_rank)
            for _ in range(num_blocks + 1)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(SideBlock(spec) for _ in range(num_blocks))
        self.gates = nn.ModuleList(
            Gate(spec.width, config.gate_init, config.gate_per_channel) for _ in range(num_blocks)
        )
        self.final_norm = make_norm(spec.norm, spec.width, spec.norm_eps)
        self.upsample = nn.Linear(spec.width, out_size, bias=False)
        self.additive = config.output_mix == "additive"
        if self.additive:
            # LoRA's zero B: the mix adds exactly 0 before the first step, yet d loss / d up =
            # (d loss / d h) norm(g_N)^T is not zero, so the side path trains from step 1.
            nn.init.zeros_(self.upsample.weight)
            self.register_parameter("alpha_offset", None)
        else:
            # alpha = alpha_init + alpha_lr * alpha_offset (see `alpha`).
            self.alpha_offset = nn.Parameter(torch.zeros(()))
        self.gradient_checkpointing = config.gradient_checkpointing

    @property
    def alpha(self) -> torch.Tensor | None:
        """The paper mix's alpha (a 0-dim tensor; None for the additive mix).

        The multiplier `alpha_lr` lives in the parametrisation, not in an optimizer group: the
        offset's gradient is d loss / d alpha, so any optimizer (transformers' Trainer included)
        at the base learning rate steps the offset as it would step alpha, and alpha moves
        `alpha_lr` times as far: exactly a parameter at `alpha_lr` times the learning rate, for
        SGD and Adam alike, with gradient clipping seeing the same norm. At alpha = 1 the side path's gradient is
        scaled by 1 - alpha = 0, so without that speed-up the side network would not train.
        """
        if self.alpha_offset is None:
            return None
        speed = self.config.alpha_lr
        # The offset's gradient is d loss / d alpha itself (not alpha_lr times it), so gradient
        # clipping sees alpha as it did when alpha was a plain parameter: a 100x gradient would
        # dominate the clipped norm and shrink every side parameter's step.
        return self.config.alpha_init + speed * _ScaledGradient.apply(self.alpha_offset, 1.0 / speed)

    @property
    def dtype(self) -> torch.dtype:
        return self.upsample.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.upsample.weight.device

    def _down(self, i: int, h: torch.Tensor) -> torch.Tensor:
        # h may sit on another device when the backbone is spread over several GPUs
        return self.dropout(self.downsamplers[i](h.to(self.device, self.dtype)))

    def _unit(self, i: int, g: torch.Tensor, h: torch.Tensor, cos, sin, mask, cache) -> torch.Tensor:
        # One step of the side path, gate included (the reference code's checkpointing left it out).
        side = self.blocks[i](g, cos, sin, mask, cache, i)
        return self.gates[i](self._down(i + 1, h), side)

    def _attention_mask(self, attention_mask, batch: int, seq: int, past: int) -> torch.Tensor | None:
        """One mask for all side blocks of this forward: None (plain causal) where that is exact,
        else the additive float form of `side_attention_mask` (0 / -inf, [B, 1, S, past + S]),
        which SDPA would otherwise rebuild from the bool mask in every block."""
        if causal_mask_is_exact(attention_mask, past):
            return None
        allowed = side_attention_mask(attention_mask, batch, seq, past, self.device)
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))

    def side_state(self, states: Sequence[torch.Tensor], attention_mask=None, position_ids=None,
                   cache: SideKVCache | None = None) -> torch.Tensor:
        """g_N: [B, S, width]."""
        if len(states) != len(self.blocks) + 1:
            raise ValueError(f"the side network takes {len(self.blocks) + 1} hidden states, got {len(states)}")
        batch, seq = states[0].shape[:2]
        device = self.device
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        past = cache.length() if cache is not None else 0
        if position_ids is None:
            position_ids = side_position_ids(attention_mask, batch, seq, past, device)
        position_ids = position_ids.to(device)
        cos, sin = rotary_tables(position_ids, self.spec.head_dim, self.spec.rope_theta, self.dtype)
        mask = self._attention_mask(attention_mask, batch, seq, past)
        g = self._down(0, states[0])
        checkpointing = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i in range(len(self.blocks)):
            if checkpointing:
                g = checkpoint(self._unit, i, g, states[i + 1], cos, sin, mask, None, use_reentrant=False)
            else:
                g = self._unit(i, g, states[i + 1], cos, sin, mask, cache)
        return g

    def forward(self, states: Sequence[torch.Tensor], last: torch.Tensor, attention_mask=None,
                position_ids=None, cache: SideKVCache | None = None,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """The output mix, [B, S, out_size] in the side dtype, or [n, out_size] at the n positions
        where `select` (bool [B, S]) is True (the mix is per position: training needs it only
        where there is a label). Additive: h_N + up(norm(g_N)); paper: alpha * h_N +
        (1 - alpha) * up(norm(g_N)).

        `last` (h_N) is exactly what the backbone's LM head consumes, so before training the
        mix equals it bit for bit: x + 0 == x with the zero upsampler, 1 * x + 0 * y == x at
        alpha = 1.
        """
        g = self.side_state(states, attention_mask, position_ids, cache)
        if select is not None:
            g, last = g[select.to(g.device)], last[select.to(last.device)]
        last = last.to(self.device, self.dtype)
        side = self.upsample(self.final_norm(g))
        if self.additive:
            return last + side
        return self.alpha * last + (1 - self.alpha) * side
