"""Where the five DISP selections act, per architecture: one `BlockLayout` entry each.

The five selections of one decoder layer (ANCHORS §2, LLaMA naming):
  attn_in  (S1, hidden wide)        input columns of q, k, v
  attn_out (S2, hidden wide)        output rows of o
  mlp_in   (S3, hidden wide)        input columns of gate and up
  mlp_mid  (S4, intermediate wide)  output rows of gate/up and input columns of down
  mlp_out  (S5, hidden wide)        output rows of down
Heads, embeddings, norms and the LM head stay whole. Adding an architecture means adding one
`BlockLayout` to `LAYOUTS` (keyed by `config.model_type`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from eval.errors import UserInputError

MASK_NAMES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")


@dataclass(frozen=True)
class BlockLayout:
    """Module paths inside one decoder layer (relative to the layer) and the layer list's path."""

    layers: str  # dotted path of the decoder-layer ModuleList, from the CausalLM model
    attn: str  # the attention module, called with the layer's keyword arguments
    attn_in: tuple[str, ...]  # S1: linears reading the attention input
    attn_out: str  # S2: the linear writing the attention output
    mlp_in: tuple[str, ...]  # S3 columns, S4 rows
    mlp_out: str  # S4 columns, S5 rows
    attn_norm: str
    mlp_norm: str
    mlp: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (layer, normed input) -> MLP output
    pre_norm: Callable[[object], bool] = lambda config: True  # norm before (True) or after the sublayer
    norm_kind: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm); SliceGPT supports "rms" only


def _gated_mlp(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return layer.mlp(h)  # transformers' own module: down(act(gate(h)) * up(h)), any Linear widths


def _opt_mlp(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return layer.fc2(layer.activation_fn(layer.fc1(h)))


LLAMA_STYLE = BlockLayout(
    layers="model.layers",
    attn="self_attn",
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.o_proj",
    mlp_in=("mlp.gate_proj", "mlp.up_proj"),
    mlp_out="mlp.down_proj",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    mlp=_gated_mlp,
)

OPT_STYLE = BlockLayout(
    layers="model.decoder.layers",
    attn="self_attn",
    attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_out="self_attn.out_proj",
    mlp_in=("fc1",),
    mlp_out="fc2",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    mlp=_opt_mlp,
    pre_norm=lambda config: bool(getattr(config, "do_layer_norm_before", True)),
    norm_kind="layer",
)

# Keyed by `config.model_type`. Mistral and Qwen2 share Llama's block (GQA included: the k/v
# widths are read from the weights, never derived from the hidden size).
LAYOUTS: dict[str, BlockLayout] = {
    "llama": LLAMA_STYLE,
    "mistral": LLAMA_STYLE,
    "qwen2": LLAMA_STYLE,
    "opt": OPT_STYLE,
}


def layout_for(config) -> BlockLayout:
    """The layout for a transformers config; an unsupported model type is a clear error."""
    # a pruned model's config is of type "slimtune_pruned"; its layers are its base model's
    model_type = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
    if model_type not in LAYOUTS:
        raise UserInputError(
            f"DISP pruning does not support model type {model_type!r}; supported: {', '.join(sorted(LAYOUTS))}"
        )
    return LAYOUTS[model_type]


def decoder_layers(model: nn.Module, layout: BlockLayout) -> nn.ModuleList:
    return model.get_submodule(layout.layers)


@dataclass(frozen=True)
class LayerGeometry:
    """Dense widths of one decoder layer, read from its weights (so GQA is sized correctly)."""

    hidden: int
    intermediate: int
    attn_in_rows: int  # sum of q, k, v output widths: (heads + 2·kv_heads)·head_dim
    attn_out_cols: int  # o's input width: heads·head_dim
    n_mlp_in: int  # number of linears reading the MLP input (gate+up: 2; fc1: 1)

    def width(self, mask: str) -> int:
        return self.intermediate if mask == "mlp_mid" else self.hidden

    def block_params(self, n: dict[str, torch.Tensor | int]) -> torch.Tensor | int:
        """Weight parameters of attention + MLP kept when each mask keeps `n[mask]` channels.

        Exactly what the export keeps: q/k/v columns × S1, o rows × S2, gate/up columns × S3 times
        rows × S4, down columns × S4 times rows × S5. Differentiable when `n` holds tensors.
        """
        return (
            n["attn_in"] * self.attn_in_rows
            + n["attn_out"] * self.attn_out_cols
            + self.n_mlp_in * n["mlp_in"] * n["mlp_mid"]
            + n["mlp_mid"] * n["mlp_out"]
        )

    def dense_block_params(self) -> int:
        return self.block_params({m: self.width(m) for m in MASK_NAMES})


def layer_geometry(layer: nn.Module, layout: BlockLayout) -> LayerGeometry:
    attn_in = [layer.get_submodule(p) for p in layout.attn_in]
    mlp_in = [layer.get_submodule(p) for p in layout.mlp_in]
    return LayerGeometry(
        hidden=attn_in[0].in_features,
        intermediate=mlp_in[0].out_features,
        attn_in_rows=sum(lin.out_features for lin in attn_in),
        attn_out_cols=layer.get_submodule(layout.attn_out).in_features,
        n_mlp_in=len(mlp_in),
    )


def model_geometry(model: nn.Module, layout: BlockLayout | None = None) -> list[LayerGeometry]:
    layout = layout or layout_for(model.config)
    return [layer_geometry(layer, layout) for layer in decoder_layers(model, layout)]
