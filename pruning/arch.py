"""Where the five DISP selections act: DISP's view of the shared decoder layouts.

The five selections of one decoder layer (docs/METHODS.md §2, LLaMA naming):
  attn_in  (S1, hidden wide)        input columns of q, k, v
  attn_out (S2, hidden wide)        output rows of o
  mlp_in   (S3, hidden wide)        input columns of gate and up
  mlp_mid  (S4, intermediate wide)  output rows of gate/up and input columns of down
  mlp_out  (S5, hidden wide)        output rows of down
Heads, embeddings, norms (Qwen3's per-head q/k norms included: they act on head_dim, which no
selection touches) and the LM head stay whole. Fused projections (Phi-3) need nothing more: S1
selects the columns of the fused qkv like those of q, k and v; S4 selects the rows of each of the
fused gate_up's two row blocks [gate; up]. The module names come from
`eval.architectures.LAYOUTS`: a family added there with a sequential block of nn.Linear layers
is supported here without further code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from eval import architectures as arch
from eval.architectures import DecoderLayout

MASK_NAMES = ("attn_in", "attn_out", "mlp_in", "mlp_mid", "mlp_out")


def _disp_supports(layout: DecoderLayout) -> bool:
    """Sequential blocks of nn.Linear with two norms."""
    return layout.residual == "sequential" and layout.linear == "linear" and layout.mlp_norm is not None


@dataclass(frozen=True)
class BlockLayout:
    """One decoder layout seen as the five selections (paths relative to one decoder layer)."""

    decoder: DecoderLayout

    @property
    def layers(self) -> str:  # dotted path of the decoder-layer ModuleList, from the CausalLM model
        return self.decoder.layers

    @property
    def attn(self) -> str:  # the attention module, called with the layer's keyword arguments
        return self.decoder.attn

    @property
    def attn_in(self) -> tuple[str, ...]:  # S1: linears reading the attention input
        return arch.attention_inputs(self.decoder)

    @property
    def attn_out(self) -> str:  # S2: the linear writing the attention output
        return self.decoder.o

    @property
    def mlp_in(self) -> tuple[str, ...]:  # S3 columns, S4 rows
        return arch.mlp_inputs(self.decoder)

    @property
    def mlp_out(self) -> str:  # S4 columns, S5 rows
        return self.decoder.down

    @property
    def mlp_halves(self) -> int:  # intermediate-wide row blocks in each mlp_in linear (fused [gate; up]: 2)
        return arch.mlp_halves(self.decoder)

    def mlp_in_blocks(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """An mlp_in linear's weight as its intermediate-wide row blocks (fused gate_up: gate, up)."""
        return list(weight.chunk(self.mlp_halves, dim=0))

    def mlp_in_rows(self, mlp_mid: torch.Tensor, intermediate: int) -> torch.Tensor:
        """The rows of an mlp_in linear that S4 keeps: the kept channels in each row block."""
        return torch.cat([mlp_mid + half * intermediate for half in range(self.mlp_halves)])

    @property
    def attn_norm(self) -> str:
        return self.decoder.attn_norm

    @property
    def mlp_norm(self) -> str:
        return self.decoder.mlp_norm

    @property
    def norm_kind(self) -> str:  # "rms" (RMSNorm) or "layer" (LayerNorm); SliceGPT supports "rms" only
        return self.decoder.norm_kind

    def mlp(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """(layer, normed input) -> MLP output, any Linear widths."""
        return arch.mlp_forward(layer, self.decoder, h)

    def pre_norm(self, config) -> bool:
        """Norm before (True) or after the sublayer."""
        return arch.is_pre_norm(self.decoder, config)


# Keyed by `config.model_type`: the shared table's families that DISP supports.
LAYOUTS: dict[str, BlockLayout] = {t: BlockLayout(d) for t, d in arch.LAYOUTS.items() if _disp_supports(d)}


def layout_for(config) -> BlockLayout:
    """The layout for a transformers config; an unsupported model type is a clear error."""
    # a pruned model's config is of type "slimtune_pruned"; its layers are its base model's
    return BlockLayout(arch.decoder_layout(config, purpose="DISP pruning", needs=_disp_supports))


def decoder_layers(model: nn.Module, layout: BlockLayout) -> nn.ModuleList:
    return arch.decoder_layers(model, layout.decoder)


@dataclass(frozen=True)
class LayerGeometry:
    """Dense widths of one decoder layer, read from its weights (so GQA is sized correctly)."""

    hidden: int
    intermediate: int
    attn_in_rows: int  # sum of q, k, v output widths: (heads + 2·kv_heads)·head_dim
    attn_out_cols: int  # o's input width: heads·head_dim
    n_mlp_in: int  # intermediate-wide row blocks reading the MLP input (gate+up or fused gate_up: 2; fc1: 1)

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
        intermediate=mlp_in[0].out_features // layout.mlp_halves,
        attn_in_rows=sum(lin.out_features for lin in attn_in),
        attn_out_cols=layer.get_submodule(layout.attn_out).in_features,
        n_mlp_in=len(mlp_in) * layout.mlp_halves,
    )


def model_geometry(model: nn.Module, layout: BlockLayout | None = None) -> list[LayerGeometry]:
    layout = layout or layout_for(model.config)
    return [layer_geometry(layer, layout) for layer in decoder_layers(model, layout)]
