"""Masks acting on the frozen dense model during hypernetwork training, and the DISP loss.

A mask multiplies exactly the signal whose channels the export removes, so the masked dense model
computes what the exported model computes (checked by the tests):
  attn_in  × input of q, k, v        attn_out × output of o (bias included)
  mlp_in   × input of gate, up       mlp_mid  × input of down      mlp_out × output of down
Hooks read the masks from a `MaskState`, so one set of hooks serves every training step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pruning.arch import (
    MASK_NAMES,
    BlockLayout,
    LayerGeometry,
    decoder_layers,
    layout_for,
    model_geometry,
)
from pruning.config import DispConfig
from pruning.hypernetwork import HyperNetwork, sample_masks


class MaskState:
    """The masks currently applied: per layer, mask name -> [width] tensor (or None: no masking)."""

    def __init__(self):
        self.masks: list[dict[str, torch.Tensor]] | None = None


def _scale_input(state: MaskState, layer: int, name: str):
    def hook(module, args):
        if state.masks is None:
            return None
        return (args[0] * state.masks[layer][name].to(args[0].dtype),) + tuple(args[1:])
    return hook


def _scale_output(state: MaskState, layer: int, name: str):
    def hook(module, args, output):
        if state.masks is None:
            return None
        return output * state.masks[layer][name].to(output.dtype)
    return hook


def install_mask_hooks(model: nn.Module, state: MaskState, layout: BlockLayout | None = None) -> list:
    """Hooks that multiply each selection's signal by `state.masks`; returns their handles."""
    layout = layout or layout_for(model.config)
    handles = []
    for i, layer in enumerate(decoder_layers(model, layout)):
        for path in layout.attn_in:
            handles.append(layer.get_submodule(path).register_forward_pre_hook(_scale_input(state, i, "attn_in")))
        handles.append(layer.get_submodule(layout.attn_out).register_forward_hook(_scale_output(state, i, "attn_out")))
        for path in layout.mlp_in:
            handles.append(layer.get_submodule(path).register_forward_pre_hook(_scale_input(state, i, "mlp_in")))
        out = layer.get_submodule(layout.mlp_out)
        handles.append(out.register_forward_pre_hook(_scale_input(state, i, "mlp_mid")))
        handles.append(out.register_forward_hook(_scale_output(state, i, "mlp_out")))
    return handles


@contextlib.contextmanager
def masks_applied(model: nn.Module, state: MaskState, layout: BlockLayout | None = None):
    """Install the mask hooks on `model` for the duration of the block."""
    handles = install_mask_hooks(model, state, layout)
    try:
        yield state
    finally:
        for h in handles:
            h.remove()


def kept_block_params(geometry: list[LayerGeometry], masks: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Attention + MLP weight parameters the masks keep (differentiable through straight-through masks)."""
    return sum(g.block_params({m: layer[m].sum() for m in MASK_NAMES}) for g, layer in zip(geometry, masks))


def budget_regulariser(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """log(max(r, p) / min(r, p)) = |log r − log p|: zero at the target, positive on either side."""
    ratio = ratio.clamp_min(1e-12)
    return torch.maximum(ratio, torch.full_like(ratio, target)).log() - torch.minimum(
        ratio, torch.full_like(ratio, target)).log()


@dataclass
class DispOutput:
    loss: torch.Tensor
    ce: torch.Tensor
    reg: torch.Tensor
    kept_ratio: torch.Tensor
    logits: torch.Tensor | None = None


class DispTrainingModel(nn.Module):
    """Frozen dense LM + trainable hypernetwork; `forward(input_ids)` returns the DISP loss.

    Each call samples one set of hard masks (straight-through), applies them to the LM through
    hooks, and returns CE + λ·log(max(P/P_total, p)/min(P/P_total, p)).
    """

    def __init__(self, model: nn.Module, config: DispConfig, hypernet: HyperNetwork | None = None):
        super().__init__()
        self.layout = layout_for(model.config)
        self.lm = model
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.geometry = model_geometry(model, self.layout)
        self.dense_params = sum(g.dense_block_params() for g in self.geometry)
        self.disp_config = config
        self.hypernet = hypernet or HyperNetwork(
            [{m: g.width(m) for m in MASK_NAMES} for g in self.geometry],
            z_dim=config.z_dim, gru_hidden=config.gru_hidden, offset=config.offset, seed=config.seed,
        )
        self.state = MaskState()
        self._hooks = install_mask_hooks(self.lm, self.state, self.layout)

    @property
    def config(self):  # what the shared loop and reports expect of a model
        return self.lm.config

    @property
    def device(self):
        return next(self.hypernet.parameters()).device

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.eval()  # the frozen LM never uses dropout: masks are learnt for the deterministic model
        return self

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, **_) -> DispOutput:
        logits = self.hypernet()
        # noise from torch's global RNG, which the shared loop seeds and checkpoints (exact resume)
        masks = sample_masks(logits, self.disp_config.estimator, self.disp_config.tau)
        self.state.masks = masks
        try:
            out = self.lm(input_ids=input_ids, attention_mask=attention_mask,
                          labels=input_ids if labels is None else labels)
        finally:
            self.state.masks = None
        ratio = kept_block_params(self.geometry, masks) / self.dense_params
        reg = budget_regulariser(ratio, self.disp_config.kept)
        loss = out.loss + self.disp_config.lam * reg
        return DispOutput(loss=loss, ce=out.loss.detach(), reg=reg.detach(), kept_ratio=ratio.detach())

