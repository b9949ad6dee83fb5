"""Decoder layouts: where each transformers decoder family keeps its modules, as data.

Every method that reads a backbone's weights by name (QST's pruned side initialisation, DISP and
the pruning baselines, the low-rank target search, the tuning baselines' adapters) looks the
names up here, so adding a family is one `DecoderLayout` entry in `LAYOUTS`:

    layout = decoder_layout(model)                 # or decoder_layout(model.config)
    for layer in decoder_layers(model, layout):
        q, k, v = attention_inputs(layout)         # paths inside one layer: "self_attn.q_proj", ...

Paths are dotted `get_submodule` names: `layers`, `embed_tokens`, `final_norm` and `lm_head` from
the *ForCausalLM model, all others from one decoder layer. Shapes are never written here: they
are read from the weights (grouped-query k/v widths, Qwen3's explicit head_dim, pruned widths).
Each method states what it needs (`Needs`), and an unsupported family is one clear error that
names the supported model types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eval.errors import UserInputError


@dataclass(frozen=True)
class DecoderLayout:
    """One decoder family's module names (see the module docstring for what paths start from)."""

    model_types: tuple[str, ...]
    layers: str  # the nn.ModuleList of decoder layers
    embed_tokens: str
    final_norm: str
    lm_head: str
    attn: str  # the attention module (called with the layer's keyword arguments)
    o: str  # attention output projection
    down: str  # MLP output projection (OPT: fc2)
    up: str | None = None  # MLP input without a gate (OPT's fc1) or the gated MLP's up projection
    q: str | None = None  # separate q/k/v projections ...
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # ... or one fused projection, rows [q; k; v] (Phi-3)
    gate: str | None = None  # gated MLP: down(act(gate(x)) * up(x))
    gate_up: str | None = None  # fused gate and up, rows [gate; up] (Phi-3)
    mlp: str | None = None  # the MLP module; None when the linears sit on the layer itself (OPT)
    activation_module: str | None = None  # the activation, when there is no MLP module to call
    attn_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"  # None: one norm feeds both (parallel blocks)
    qk_norms: tuple[str, ...] = ()  # per-head norms over head_dim, inside attention (Qwen3)
    norm_kind: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm)
    norm_eps: str | None = "rms_norm_eps"  # config attribute of the norms' epsilon (None: the module default)
    activation: str = "hidden_act"  # config attribute naming the MLP activation
    heads: str = "num_attention_heads"  # config attributes of the head counts
    kv_heads: str | None = "num_key_value_heads"
    residual: str = "sequential"  # "sequential" (x + attn, then + mlp) or "parallel" (x + attn + mlp)
    linear: str = "linear"  # "linear" (nn.Linear, [out, in]) or "conv1d" (GPT-2's Conv1D, [in, out])
    pre_norm_flag: str | None = None  # config attribute that, when False, makes the block post-norm (OPT)


_LLAMA = dict(
    layers="model.layers", embed_tokens="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    attn="self_attn", q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    mlp="mlp", gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
)

_ENTRIES = (
    # Mistral and Qwen2 share Llama's block, grouped-query attention included.
    DecoderLayout(model_types=("llama", "mistral", "qwen2"), **_LLAMA),
    # Qwen3: Llama's block plus RMSNorms over each head's q and k (head_dim wide, not hidden).
    DecoderLayout(model_types=("qwen3",), qk_norms=("self_attn.q_norm", "self_attn.k_norm"), **_LLAMA),
    DecoderLayout(
        model_types=("phi3",), layers="model.layers", embed_tokens="model.embed_tokens", final_norm="model.norm",
        lm_head="lm_head", attn="self_attn", qkv="self_attn.qkv_proj", o="self_attn.o_proj", mlp="mlp",
        gate_up="mlp.gate_up_proj", down="mlp.down_proj",
    ),
    DecoderLayout(
        model_types=("opt",), layers="model.decoder.layers", embed_tokens="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm", lm_head="lm_head", attn="self_attn", q="self_attn.q_proj",
        k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", up="fc1", down="fc2",
        activation_module="activation_fn", attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm",
        norm_kind="layer", norm_eps=None, activation="activation_function", kv_heads=None,
        pre_norm_flag="do_layer_norm_before",
    ),
    DecoderLayout(
        model_types=("phi",), layers="model.layers", embed_tokens="model.embed_tokens",
        final_norm="model.final_layernorm", lm_head="lm_head", attn="self_attn", q="self_attn.q_proj",
        k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.dense", mlp="mlp", up="mlp.fc1", down="mlp.fc2",
        mlp_norm=None, norm_kind="layer", norm_eps="layer_norm_eps", residual="parallel",
    ),
    DecoderLayout(
        model_types=("gpt_neox",), layers="gpt_neox.layers", embed_tokens="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", attn="attention",
        qkv="attention.query_key_value", o="attention.dense", mlp="mlp", up="mlp.dense_h_to_4h",
        down="mlp.dense_4h_to_h", norm_kind="layer", norm_eps="layer_norm_eps", kv_heads=None,
        residual="parallel",  # use_parallel_residual, true for every released GPT-NeoX / Pythia
    ),
    DecoderLayout(
        model_types=("gpt2",), layers="transformer.h", embed_tokens="transformer.wte", final_norm="transformer.ln_f",
        lm_head="lm_head", attn="attn", qkv="attn.c_attn", o="attn.c_proj", mlp="mlp", up="mlp.c_fc",
        down="mlp.c_proj", attn_norm="ln_1", mlp_norm="ln_2", norm_kind="layer", norm_eps="layer_norm_epsilon",
        activation="activation_function", heads="n_head", kv_heads=None, linear="conv1d",
    ),
)

# Keyed by transformers' `config.model_type`.
LAYOUTS: dict[str, DecoderLayout] = {t: layout for layout in _ENTRIES for t in layout.model_types}

Needs = Callable[[DecoderLayout], bool]  # what a method needs of a layout (None: any layout)


def model_type_of(config) -> str | None:
    """The architecture's model type; a slimtune model (pruned, low-rank) reports its base model's."""
    return getattr(config, "base_model_type", None) or getattr(config, "model_type", None)


def find_layout(model_or_config) -> DecoderLayout | None:
    """The layout of a model or config, or None for a family not in the table (e.g. a ViT)."""
    config = getattr(model_or_config, "config", model_or_config)
    return LAYOUTS.get(model_type_of(config))


def supported_model_types(needs: Needs | None = None) -> list[str]:
    return sorted(t for t, layout in LAYOUTS.items() if needs is None or needs(layout))


def decoder_layout(model_or_config, purpose: str = "this method", needs: Needs | None = None) -> DecoderLayout:
    """The layout of a model or config; an unsupported family is a UserInputError naming the supported ones."""
    config = getattr(model_or_config, "config", model_or_config)
    layout = find_layout(config)
    if layout is None or (needs is not None and not needs(layout)):
        raise UserInputError(
            f"{purpose} does not support model type {model_type_of(config)!r}; supported: "
            f"{', '.join(supported_model_types(needs))}"
        )
    return layout


def decoder_layers(model: nn.Module, layout: DecoderLayout | None = None) -> nn.ModuleList:
    return model.get_submodule((layout or decoder_layout(model)).layers)


# --- the per-layer verbs: paths inside one decoder layer ------------------------------------


def attention_inputs(layout: DecoderLayout) -> tuple[str, ...]:
    """The projections that read the attention input: (q, k, v), or the fused (qkv,)."""
    return (layout.qkv,) if layout.qkv else (layout.q, layout.k, layout.v)


def mlp_inputs(layout: DecoderLayout) -> tuple[str, ...]:
    """The projections that read the MLP input: (gate, up), the fused (gate_up,), or (up,)."""
    if layout.gate_up:
        return (layout.gate_up,)
    return (layout.gate, layout.up) if layout.gate else (layout.up,)


def mlp_halves(layout: DecoderLayout) -> int:
    """Intermediate-wide row blocks stacked in each MLP input projection (fused gate_up: 2)."""
    return 2 if layout.gate_up else 1


def block_linears(layout: DecoderLayout) -> tuple[str, ...]:
    """Every attention and MLP projection of one layer, inputs before outputs."""
    return (*attention_inputs(layout), layout.o, *mlp_inputs(layout), layout.down)


def linear_roles(layout: DecoderLayout) -> dict[str, str]:
    """{path: role} of the block's projections: attn_qkv, attn_out, mlp_in, mlp_out."""
    roles = dict.fromkeys(attention_inputs(layout), "attn_qkv") | {layout.o: "attn_out"}
    return roles | dict.fromkeys(mlp_inputs(layout), "mlp_in") | {layout.down: "mlp_out"}


def is_gated(layout: DecoderLayout) -> bool:
    return bool(layout.gate or layout.gate_up)


def is_pre_norm(layout: DecoderLayout, config) -> bool:
    """Norm before each sublayer (True) or after the residual add (OPT-350m: False)."""
    return layout.pre_norm_flag is None or bool(getattr(config, layout.pre_norm_flag, True))


def attention_module(layer: nn.Module, layout: DecoderLayout) -> nn.Module:
    return layer.get_submodule(layout.attn)


def mlp_output_module(layer: nn.Module, layout: DecoderLayout) -> nn.Module:
    """The module whose output is the MLP's output: the MLP module, else its output projection."""
    return layer.get_submodule(layout.mlp or layout.down)


def mlp_forward(layer: nn.Module, layout: DecoderLayout, h: torch.Tensor) -> torch.Tensor:
    """The layer's MLP applied to (already normed) `h`, whatever the linears' widths."""
    if layout.mlp:
        return layer.get_submodule(layout.mlp)(h)  # transformers' own module
    act = layer.get_submodule(layout.activation_module)
    return layer.get_submodule(layout.down)(act(layer.get_submodule(layout.up)(h)))


def head_counts(config, layout: DecoderLayout) -> tuple[int, int]:
    """(query heads, key/value heads) from the config; kv = query heads without grouped-query attention."""
    heads = int(getattr(config, layout.heads))
    kv = getattr(config, layout.kv_heads, None) if layout.kv_heads else None
    return heads, int(kv or heads)
