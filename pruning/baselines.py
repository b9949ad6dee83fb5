"""Structured-pruning baselines at the same block-parameter budget as DISP.

- `magnitude`: one shared set of residual dimensions, scored by the norm of every weight that
  reads or writes the dimension (norm gains folded into the columns they scale), plus per-layer
  intermediate channels scored by the norm of their gate/up rows and down column.
- `wanda-sp`: the same structure, channels scored by |W| times the L2 norm of the matching input
  activation over the calibration tokens (Wanda's score summed over the channel's weights).
- `slicegpt`: norm gains folded into the linears, PCA of each sublayer's residual input
  (float64, XᵀX + 1 % of its mean diagonal as damping), rotate, keep the first k principal
  dimensions of the residual everywhere; the residual needs a k×k rotation per sublayer
  (attn_shortcut, mlp_shortcut), counted in its block parameters. Llama-style models only.

The shared-set baselines keep the same fraction r of residual and intermediate channels, with r
chosen so that the kept block parameters are closest to the budget; SliceGPT chooses k likewise.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eval.calibration import collect_input_statistics
from eval.errors import UserInputError
from pruning.arch import (
    MASK_NAMES,
    BlockLayout,
    LayerGeometry,
    decoder_layers,
    layout_for,
    model_geometry,
)
from pruning.model import CONFIG_KEY, PruningPlan, empty_structure

BASELINES = ("magnitude", "wanda-sp", "slicegpt")


# ---------------------------------------------------------------------------------------------
# Shared residual set (magnitude, wanda-sp)


def shared_widths(geometry: list[LayerGeometry], kept: float) -> tuple[int, list[int]]:
    """(kept residual dims, kept intermediate channels per layer) closest to `kept` of the block params."""
    dense = sum(g.dense_block_params() for g in geometry)
    hidden = geometry[0].hidden
    best = None
    for n_h in range(1, hidden + 1):
        r = n_h / hidden
        n_mid = [max(1, round(r * g.intermediate)) for g in geometry]
        params = sum(g.block_params({"attn_in": n_h, "attn_out": n_h, "mlp_in": n_h, "mlp_mid": m, "mlp_out": n_h})
                     for g, m in zip(geometry, n_mid))
        err = abs(params / dense - kept)
        if best is None or err < best[0]:
            best = (err, n_h, n_mid)
    return best[1], best[2]


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.topk(scores, k).indices.tolist())


def _shared_plan(method: str, hidden_scores: torch.Tensor, mid_scores: list[torch.Tensor],
                 geometry: list[LayerGeometry], kept: float) -> PruningPlan:
    n_h, n_mid = shared_widths(geometry, kept)
    residual = _top(hidden_scores, n_h)
    layers = [{"attn_in": residual, "attn_out": residual, "mlp_in": residual, "mlp_mid": _top(s, m), "mlp_out": residual}
              for s, m in zip(mid_scores, n_mid)]
    return PruningPlan(method, layers, info={"kept_residual": n_h, "kept_intermediate": n_mid})


def _norm_gain(layer: nn.Module, path: str, width: int) -> torch.Tensor:
    w = getattr(layer.get_submodule(path), "weight", None)
    return torch.ones(width) if w is None else w.detach().float().cpu()


def _weights(layer: nn.Module, paths) -> list[torch.Tensor]:
    return [layer.get_submodule(p).weight.detach().float().cpu() for p in paths]


def _mlp_in_weights(layer: nn.Module, layout: BlockLayout) -> list[torch.Tensor]:
    """The MLP input weights as [intermediate, hidden] blocks (gate, up; a fused gate_up split)."""
    return [block for w in _weights(layer, layout.mlp_in) for block in layout.mlp_in_blocks(w)]


def magnitude_plan(model: nn.Module, kept: float) -> PruningPlan:
    layout = layout_for(model.config)
    geometry = model_geometry(model, layout)
    hidden_sq = torch.zeros(geometry[0].hidden)
    mid_scores = []
    for layer, g in zip(decoder_layers(model, layout), geometry):
        g_attn = _norm_gain(layer, layout.attn_norm, g.hidden) ** 2
        g_mlp = _norm_gain(layer, layout.mlp_norm, g.hidden) ** 2
        hidden_sq += sum((w ** 2).sum(0) for w in _weights(layer, layout.attn_in)) * g_attn
        hidden_sq += sum((w ** 2).sum(0) for w in _mlp_in_weights(layer, layout)) * g_mlp
        hidden_sq += (_weights(layer, [layout.attn_out])[0] ** 2).sum(1)
        down = _weights(layer, [layout.mlp_out])[0]
        hidden_sq += (down ** 2).sum(1)
        mid_sq = sum((w * g_mlp.sqrt() ** 1).pow(2).sum(1) for w in _mlp_in_weights(layer, layout)) + (down ** 2).sum(0)
        mid_scores.append(mid_sq.sqrt())
    return _shared_plan("magnitude", hidden_sq.sqrt(), mid_scores, geometry, kept)


def _calibration_batches(blocks: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [blocks[start:start + batch_size] for start in range(0, blocks.shape[0], batch_size)]


def _input_norms(model: nn.Module, layout: BlockLayout, blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Per layer, the L2 norm over calibration tokens of each input channel of attn_in / attn_out / mlp_in / mlp_out."""
    sites = {"attn_in": layout.attn_in[0], "attn_out": layout.attn_out, "mlp_in": layout.mlp_in[0], "mlp_out": layout.mlp_out}
    layers = decoder_layers(model, layout)
    modules = {(i, site): layer.get_submodule(path) for i, layer in enumerate(layers) for site, path in sites.items()}
    stats = collect_input_statistics(model, modules, _calibration_batches(blocks, batch_size), ("sq_norm",),
                                     device=model.device, desc="calibration activations")
    return [{site: stats[i, site].sq_norm.sqrt().float() for site in sites} for i in range(len(layers))]


def wanda_sp_plan(model: nn.Module, kept: float, blocks: torch.Tensor, batch_size: int = 4) -> PruningPlan:
    layout = layout_for(model.config)
    geometry = model_geometry(model, layout)
    norms = _input_norms(model, layout, blocks, batch_size)
    hidden_scores = torch.zeros(geometry[0].hidden)
    mid_scores = []
    for layer, x in zip(decoder_layers(model, layout), norms):
        attn_in, mlp_in = _weights(layer, layout.attn_in), _mlp_in_weights(layer, layout)
        o, down = _weights(layer, [layout.attn_out, layout.mlp_out])
        # reading a residual dim j: Σ_i |W_ij|·‖x_j‖; writing it: Σ_k |W_jk|·‖x_k‖ over the writer's inputs
        hidden_scores += sum(w.abs().sum(0) for w in attn_in) * x["attn_in"]
        hidden_scores += sum(w.abs().sum(0) for w in mlp_in) * x["mlp_in"]
        hidden_scores += o.abs() @ x["attn_out"] + down.abs() @ x["mlp_out"]
        mid_scores.append(down.abs().sum(0) * x["mlp_out"] + sum(w.abs() @ x["mlp_in"] for w in mlp_in))
    return _shared_plan("wanda-sp", hidden_scores, mid_scores, geometry, kept)


# ---------------------------------------------------------------------------------------------
# SliceGPT


def slicegpt_width(geometry: list[LayerGeometry], kept: float, multiple_of: int = 1) -> int:
    """Kept residual width k: k·(all linear widths) + 2k² (shortcuts) per layer, closest to the budget.

    k is a multiple of `multiple_of` (transformers' configs require hidden_size % heads == 0).
    """
    dense = sum(g.dense_block_params() for g in geometry)

    def params(k: int) -> int:
        return sum(g.block_params({"attn_in": k, "attn_out": k, "mlp_in": k, "mlp_mid": g.intermediate, "mlp_out": k})
                   + 2 * k * k for g in geometry)

    return min(range(multiple_of, geometry[0].hidden + 1, multiple_of), key=lambda k: abs(params(k) / dense - kept))


def _pca_basis(xtx: torch.Tensor, n_tokens: int, damping: float = 0.01) -> torch.Tensor:
    """Eigenvectors of the (damped) second-moment matrix, by decreasing eigenvalue: [d, d] float64."""
    cov = xtx / max(n_tokens, 1)
    cov = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(-1)


def _residual_second_moments(model: nn.Module, layout: BlockLayout, blocks: torch.Tensor, batch_size: int):
    """XᵀX (float64) of the residual entering each sublayer (2 per layer) and the final norm."""
    sites = []
    for layer in decoder_layers(model, layout):
        sites += [layer.get_submodule(layout.attn_norm), layer.get_submodule(layout.mlp_norm)]
    sites.append(model.get_submodule(layout.decoder.final_norm))
    stats = collect_input_statistics(model, dict(enumerate(sites)), _calibration_batches(blocks, batch_size), ("xtx",),
                                     desc="calibration PCA")
    return [stats[i].xtx for i in range(len(sites))], stats[0].count


def slicegpt_prune(model: nn.Module, kept: float, blocks: torch.Tensor, batch_size: int = 4,
                   width: int | None = None) -> nn.Module:
    """SliceGPT at `kept` of the block parameters (rotations included). Returns a new model.

    `width` forces the kept residual width k instead (k = hidden size: a pure rotation, same logits).
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    layout = layout_for(model.config)
    if layout.norm_kind != "rms":
        raise UserInputError(f"slicegpt supports RMSNorm (Llama-style) models only; {model.config.model_type!r} uses LayerNorm")
    geometry = model_geometry(model, layout)
    d = geometry[0].hidden
    heads = getattr(model.config, layout.decoder.heads)
    k = width or slicegpt_width(geometry, kept, multiple_of=heads)
    acc, n_tokens = _residual_second_moments(model, layout, blocks, batch_size)
    bases = [_pca_basis(a, n_tokens)[:, :k] for a in acc]  # [d, k] each: attn_0, mlp_0, attn_1, ..., final

    def f64(t):
        return t.detach().double().cpu()

    state: dict[str, torch.Tensor] = {}
    paths = layout.decoder  # embeddings, final norm and LM head
    state[f"{paths.embed_tokens}.weight"] = f64(model.get_submodule(paths.embed_tokens).weight) @ bases[0]
    norm_weight = torch.full((k,), math.sqrt(d / k), dtype=torch.float64)
    for i, layer in enumerate(decoder_layers(model, layout)):
        q_attn, q_mlp, q_next = bases[2 * i], bases[2 * i + 1], bases[2 * i + 2]
        prefix = f"{layout.layers}.{i}"
        gain_attn = f64(layer.get_submodule(layout.attn_norm).weight)
        gain_mlp = f64(layer.get_submodule(layout.mlp_norm).weight)
        for path in layout.attn_in:  # read the rotated residual, norm gain folded into the columns
            state[f"{prefix}.{path}.weight"] = (f64(layer.get_submodule(path).weight) * gain_attn) @ q_attn
        for path in layout.mlp_in:
            state[f"{prefix}.{path}.weight"] = (f64(layer.get_submodule(path).weight) * gain_mlp) @ q_mlp
        state[f"{prefix}.{layout.attn_out}.weight"] = q_mlp.T @ f64(layer.get_submodule(layout.attn_out).weight)
        state[f"{prefix}.{layout.mlp_out}.weight"] = q_next.T @ f64(layer.get_submodule(layout.mlp_out).weight)
        for path, q in ((layout.attn_out, q_mlp), (layout.mlp_out, q_next)):
            bias = layer.get_submodule(path).bias
            if bias is not None:
                state[f"{prefix}.{path}.bias"] = q.T @ f64(bias)
        for path in (*layout.attn_in, *layout.mlp_in):
            bias = layer.get_submodule(path).bias
            if bias is not None:
                state[f"{prefix}.{path}.bias"] = f64(bias)
        for path in layout.decoder.qk_norms:  # per-head norms over head_dim: the rotation leaves them as they are
            state[f"{prefix}.{path}.weight"] = f64(layer.get_submodule(path).weight)
        # residual x̃ (basis q_attn) -> basis q_mlp: x̃ @ (q_attnᵀ q_mlp); nn.Linear stores the transpose
        state[f"{prefix}.attn_shortcut.weight"] = (q_attn.T @ q_mlp).T
        state[f"{prefix}.mlp_shortcut.weight"] = (q_mlp.T @ q_next).T
        state[f"{prefix}.{layout.attn_norm}.weight"] = norm_weight
        state[f"{prefix}.{layout.mlp_norm}.weight"] = norm_weight
    state[f"{paths.final_norm}.weight"] = norm_weight
    head = model.get_output_embeddings()
    state[f"{paths.lm_head}.weight"] = (f64(head.weight) * f64(model.get_submodule(paths.final_norm).weight)) @ bases[-1]

    # A Llama of residual width k: RMSNorm over k dims with gain √(d/k) and eps·d/k equals the
    # dense model's RMS over d dims (the dropped dims counted as zero), so the norms stay exact.
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.head_dim = getattr(model.config, "head_dim", None) or d // heads
    config.hidden_size = k
    setattr(config, paths.norm_eps, getattr(model.config, paths.norm_eps) * d / k)
    config.tie_word_embeddings = False
    plan = PruningPlan("slicegpt", [{m: list(range(g.intermediate if m == "mlp_mid" else k)) for m in MASK_NAMES}
                                    for g in geometry], shortcuts=True, info={"kept_residual": k, "dense_hidden": d})
    setattr(config, CONFIG_KEY, plan.to_dict())
    with no_init_weights():
        sliced = AutoModelForCausalLM.from_config(config)
        empty_structure(sliced, plan)
    dtype = model.get_submodule(paths.embed_tokens).weight.dtype
    missing, unexpected = sliced.load_state_dict({n: t.to(dtype) for n, t in state.items()}, strict=False)
    if unexpected or [m for m in missing if not m.endswith("inv_freq")]:
        raise RuntimeError(f"slicegpt export mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return sliced.to(model.device).eval()


def baseline_prune(method: str, model: nn.Module, kept: float, blocks: torch.Tensor | None = None,
                   batch_size: int = 4) -> nn.Module:
    """Prune `model` with a baseline at `kept` of the block parameters; returns a new model."""
    from pruning.model import prune_model

    if method == "magnitude":
        return prune_model(model, magnitude_plan(model, kept))
    if method == "wanda-sp":
        return prune_model(model, wanda_sp_plan(model, kept, blocks, batch_size))
    if method == "slicegpt":
        return slicegpt_prune(model, kept, blocks, batch_size)
    raise UserInputError(f"unknown pruning baseline {method!r}; expected one of {', '.join(BASELINES)}")


def rotate_residual(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> nn.Module:
    """A copy of `model` whose residual stream is written in one principal basis Q; same logits.

    SliceGPT's rotation without its slicing and without per-sublayer bases: norm gains folded
    into the linears that read the norms (gains set to 1; RMSNorm without a gain commutes with
    an orthogonal Q), Q [d, d] the eigenvectors of the residual's second moment summed over every
    sublayer input and the final norm (calibration `blocks`, float64, 1 % damping), by decreasing
    eigenvalue; then x̃ = x·Q: embeddings E·Q, readers W·Q, writers Qᵀ·W (and their biases),
    LM head (H·g)·Q. Coordinate i of the new residual is the i-th principal direction, so a
    coordinate-selecting method (DISP) run on the copy selects principal directions: the
    diagnostic of how much of SliceGPT's lead its rotation explains. Same architecture and
    parameter count (embeddings are untied). Llama-style (RMSNorm) models only.
    """
    import copy

    layout = layout_for(model.config)
    if layout.norm_kind != "rms":
        raise UserInputError(f"rotate_residual supports RMSNorm (Llama-style) models only; "
                             f"{model.config.model_type!r} uses LayerNorm")
    acc, n_tokens = _residual_second_moments(model, layout, blocks, batch_size)
    q = _pca_basis(sum(acc), n_tokens)  # [d, d] float64
    rotated = copy.deepcopy(model)
    paths = layout.decoder

    def assign(module: nn.Module, name: str, value: torch.Tensor) -> None:
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(value.to(old.dtype).to(old.device), requires_grad=old.requires_grad))

    def f64(t: torch.Tensor) -> torch.Tensor:
        return t.detach().double().cpu()

    embed = rotated.get_submodule(paths.embed_tokens)
    head = rotated.get_output_embeddings()
    final_norm = rotated.get_submodule(paths.final_norm)
    head_weight = (f64(head.weight) * f64(final_norm.weight)) @ q
    assign(embed, "weight", f64(embed.weight) @ q)
    assign(head, "weight", head_weight)  # a Parameter of its own: the embeddings are untied
    rotated.config.tie_word_embeddings = False
    assign(final_norm, "weight", torch.ones_like(f64(final_norm.weight)))
    for layer in decoder_layers(rotated, layout):
        for norm_path, readers in ((layout.attn_norm, layout.attn_in), (layout.mlp_norm, layout.mlp_in)):
            norm = layer.get_submodule(norm_path)
            for path in readers:
                linear = layer.get_submodule(path)
                assign(linear, "weight", (f64(linear.weight) * f64(norm.weight)) @ q)
            assign(norm, "weight", torch.ones_like(f64(norm.weight)))
        for path in (layout.attn_out, layout.mlp_out):
            linear = layer.get_submodule(path)
            assign(linear, "weight", q.T @ f64(linear.weight))
            if linear.bias is not None:
                assign(linear, "bias", q.T @ f64(linear.bias))
    return rotated.eval()
