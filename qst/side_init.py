"""The side network's shape, and its LST-style start from the backbone's own blocks.

`side_width`, `side_layer_indices` and `random_block_spec` size the side network from the
backbone (width d / r, the backbone's head count). `side_init="pruned"` (`pruned_block_spec`,
`init_side_from_pruned_backbone`) copies each fed backbone layer into its side block, pruned to
the side width by weight-norm importance; it reads the backbone's weights by name through
`eval.architectures` (4-bit ones dequantized by `eval.bnb`), the only QST code that does.
"""

from __future__ import annotations

import torch
from torch import nn

from eval import architectures as arch
from eval.architectures import DecoderLayout
from eval.bnb import dense_weight
from eval.errors import UserInputError
from qst.backbone import BackboneSpec
from qst.config import POOLING_DOWNSAMPLERS, QSTConfig
from qst.layer import SideBlock, SideBlockSpec, SideNetwork


def side_width(config: QSTConfig, spec: BackboneSpec) -> int:
    d = spec.hidden_size
    if config.downsample in POOLING_DOWNSAMPLERS and d % config.r:
        raise UserInputError(
            f"r={config.r} does not divide the backbone's hidden size {d}; the {config.downsample} "
            f"downsampler pools groups of r channels, so r must divide {d}"
        )
    width = d // config.r
    if config.side_head_dim is None and (width < spec.num_heads or width % spec.num_heads):
        raise UserInputError(
            f"side width {d} // r={config.r} = {width} is not a positive multiple of the backbone's "
            f"{spec.num_heads} attention heads; pick r so that {d} / r is divisible by {spec.num_heads}"
        )
    return width


def side_layer_indices(config: QSTConfig, spec: BackboneSpec) -> tuple[int, ...]:
    if config.side_layers is None:
        return tuple(range(spec.num_layers))
    bad = [i for i in config.side_layers if i >= spec.num_layers]
    if bad:
        raise UserInputError(f"side_layers {bad} are out of range: the backbone has {spec.num_layers} layers (0..{spec.num_layers - 1})")
    return config.side_layers


def side_head_count(config: QSTConfig, width: int, spec: BackboneSpec) -> int:
    """The side attention's heads: the backbone's count, or width / side_head_dim (fewer, wider)."""
    if config.side_head_dim is None:
        return spec.num_heads
    if width % config.side_head_dim:
        raise UserInputError(f"side_head_dim {config.side_head_dim} does not divide the side width {width} "
                             f"(hidden {spec.hidden_size} / r {config.r}); pick a divisor of {width}")
    return width // config.side_head_dim


def random_block_spec(config: QSTConfig, spec: BackboneSpec) -> SideBlockSpec:
    """LLaMA-style side block: RMSNorm, SwiGLU FFN, no biases, RoPE."""
    width = side_width(config, spec)
    return SideBlockSpec(
        width=width, num_heads=side_head_count(config, width, spec), ffn_width=max(1, spec.ffn_size // config.r),
        rope_theta=config.rope_theta,
    )


def _side_init_supports(layout: DecoderLayout) -> bool:
    """The pruned initialisation copies the nn.Linear projections and two norms of sequential blocks."""
    return layout.residual == "sequential" and layout.linear == "linear" and layout.mlp_norm is not None


def _prune_layout(backbone: nn.Module) -> DecoderLayout:
    try:
        layout = arch.decoder_layout(backbone.config, purpose="side_init='pruned'", needs=_side_init_supports)
    except UserInputError as e:
        raise UserInputError(f"{e}; use side_init='random'") from None
    if not arch.is_pre_norm(layout, backbone.config):
        raise UserInputError(f"side_init='pruned' needs a pre-norm {backbone.config.model_type} "
                             f"({layout.pre_norm_flag}=True); use side_init='random'")
    return layout


def pruned_block_spec(config: QSTConfig, spec: BackboneSpec, backbone: nn.Module) -> SideBlockSpec:
    """The side block mirrors the backbone block's flavour (FFN kind, activation, biases, norm)."""
    layout = _prune_layout(backbone)
    layer = arch.decoder_layers(backbone, layout)[0]
    has_bias = any(getattr(layer.get_submodule(n), "bias", None) is not None for n in arch.block_linears(layout))
    norm = layer.get_submodule(layout.attn_norm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return SideBlockSpec(
        width=side_width(config, spec), num_heads=spec.num_heads, ffn_width=max(1, spec.ffn_size // config.r),
        ffn_kind="gated" if arch.is_gated(layout) else "plain", activation=str(getattr(backbone.config, layout.activation)),
        bias=has_bias, norm=layout.norm_kind, norm_eps=float(eps), rope_theta=config.rope_theta,
    )


def _bias(module: nn.Module) -> torch.Tensor | None:
    return module.bias.detach().float() if getattr(module, "bias", None) is not None else None


def _normed(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp_min(1e-12)


_PROJECTIONS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")  # DecoderLayout fields


def _block_weights(layer: nn.Module, layout: DecoderLayout, config) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Float32 (weight [out, in], bias or None) of one layer's projections by role: q, k, v, o,
    up, down, and gate when gated. Fused projections are split: qkv rows are [q; k; v]
    (heads·hd, kv·hd, kv·hd), gate_up rows are [gate; up] (Phi-3)."""
    found = {}
    for role in _PROJECTIONS:
        if getattr(layout, role):
            module = layer.get_submodule(getattr(layout, role))
            found[role] = (dense_weight(module), _bias(module))
    if "qkv" in found:
        heads, kv = arch.head_counts(config, layout)
        hd = found["qkv"][0].shape[0] // (heads + 2 * kv)
        found.update(_split(found.pop("qkv"), ("q", "k", "v"), [heads * hd, kv * hd, kv * hd]))
    if "gate_up" in found:
        half = found["gate_up"][0].shape[0] // 2
        found.update(_split(found.pop("gate_up"), ("gate", "up"), [half, half]))
    return found


def _split(weight_bias, names: tuple[str, ...], sizes: list[int]) -> dict:
    weight, bias = weight_bias
    biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
    return dict(zip(names, zip(weight.split(sizes), biases)))


def _residual_importance(layers, layout: DecoderLayout, config) -> torch.Tensor:
    """Importance of each residual channel [d]: the norms of the weights that read it (input
    columns of q, k, v, gate, up) and write it (output rows of o, down), each matrix's norms
    scaled to mean 1, summed over the layers. One channel set for every side block keeps the
    side residual stream consistent from block to block."""
    score = None
    for layer in layers:  # one layer's dense weights at a time
        w = {role: weight for role, (weight, _) in _block_weights(layer, layout, config).items()}
        parts = [w[r].norm(dim=0) for r in ("q", "k", "v", "up", "gate") if r in w]
        parts += [w[r].norm(dim=1) for r in ("o", "down")]
        layer_score = sum(_normed(p) for p in parts)
        score = layer_score if score is None else score + layer_score
    return score


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, in increasing order."""
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


@torch.no_grad()
def _copy_pruned_block(block: SideBlock, layer: nn.Module, layout: DecoderLayout, config, keep: torch.Tensor,
                       side: SideBlockSpec) -> None:
    # Qwen3's per-head q/k norms are not copied: the side block has none (an initialisation only).
    heads, hd_side = side.num_heads, side.head_dim
    weights = _block_weights(layer, layout, config)
    (q, q_bias), (k, k_bias), (v, v_bias), (o, o_bias) = (weights[r] for r in ("q", "k", "v", "o"))
    hd = q.shape[0] // heads
    kv_heads = k.shape[0] // hd
    kv_of = torch.arange(heads) // (heads // kv_heads)  # grouped-query: q head -> its k/v head
    # Per head, keep the hd_side query/key dims (shared: they meet in the dot product) and the
    # hd_side value/output dims with the largest weight norms.
    qk_score = q.view(heads, hd, -1).norm(dim=-1) + k.view(kv_heads, hd, -1).norm(dim=-1)[kv_of]
    vo_score = v.view(kv_heads, hd, -1).norm(dim=-1)[kv_of] + o.view(o.shape[0], heads, hd).norm(dim=0)
    qk_dims, vo_dims = _top(qk_score, hd_side), _top(vo_score, hd_side)  # [H, hd_side]
    rows_q = (torch.arange(heads)[:, None] * hd + qk_dims).reshape(-1)
    rows_k = (kv_of[:, None] * hd + qk_dims).reshape(-1)
    rows_v = (kv_of[:, None] * hd + vo_dims).reshape(-1)
    cols_o = (torch.arange(heads)[:, None] * hd + vo_dims).reshape(-1)
    attn = block.attn
    _set_linear(attn.q_proj, q[rows_q][:, keep], _pick(q_bias, rows_q))
    _set_linear(attn.k_proj, k[rows_k][:, keep], _pick(k_bias, rows_k))
    _set_linear(attn.v_proj, v[rows_v][:, keep], _pick(v_bias, rows_v))
    _set_linear(attn.o_proj, o[keep][:, cols_o], _pick(o_bias, keep))

    (up, up_bias), (down, down_bias) = weights["up"], weights["down"]
    gate, gate_bias = weights.get("gate", (None, None))
    ffn_score = up.norm(dim=1) + down.norm(dim=0) + (gate.norm(dim=1) if gate is not None else 0)
    ffn = _top(ffn_score, side.ffn_width)
    mlp = block.mlp
    _set_linear(mlp.up_proj, up[ffn][:, keep], _pick(up_bias, ffn))
    _set_linear(mlp.down_proj, down[keep][:, ffn], _pick(down_bias, keep))
    if gate is not None:
        _set_linear(mlp.gate_proj, gate[ffn][:, keep], _pick(gate_bias, ffn))
    for side_norm, name in ((block.attn_norm, layout.attn_norm), (block.mlp_norm, layout.mlp_norm)):
        norm = layer.get_submodule(name)
        side_norm.weight.copy_(norm.weight.detach().float()[keep])
        if getattr(side_norm, "bias", None) is not None and getattr(norm, "bias", None) is not None:
            side_norm.bias.copy_(norm.bias.detach().float()[keep])


def _pick(bias: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias[index]


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))


def init_side_from_pruned_backbone(side: SideNetwork, backbone: nn.Module, layer_indices: tuple[int, ...]) -> None:
    """LST-style start: side block j copies backbone layer layer_indices[j], pruned to the side
    width by weight-norm importance (residual channels, per-head dims, FFN channels)."""
    layout = _prune_layout(backbone)
    all_layers = arch.decoder_layers(backbone, layout)
    layers = [all_layers[i] for i in layer_indices]
    keep = _top(_residual_importance(layers, layout, backbone.config), side.spec.width)
    for block, layer in zip(side.blocks, layers, strict=True):
        _copy_pruned_block(block, layer, layout, backbone.config, keep, side.spec)
