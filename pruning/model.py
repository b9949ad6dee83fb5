"""The exported pruned model: physically smaller weights, `index_select` / `index_add` on the residual.

The pruned model is the base architecture's own transformers model (so `generate`, the KV cache,
lm-eval's HFLM and `save_pretrained` work as usual) whose decoder layers are `PrunedDecoderLayer`s:
the same children under the same names (so checkpoint keys are the base model's), with smaller
Linear shapes and a forward that reads and writes only each block's kept residual dimensions:

    h = norm(x)                     # the norm runs on the full residual, then selects
    a = attn(h.index_select(-1, attn_in))
    x = x.index_add(-1, attn_out, a)
    h = norm2(x)
    x = x.index_add(-1, mlp_out, mlp(h.index_select(-1, mlp_in)))   # mlp_mid is in the shapes

The kept indices live in `config.json` under `slimtune_pruning` (one entry per layer with
`attn_in`, `attn_out`, `mlp_in`, `mlp_mid`, `mlp_out`), so `load_pruned(dir)` rebuilds the model
with transformers' built-in classes: no `trust_remote_code`. SliceGPT's export reuses the same
layer with a narrower residual (`hidden_size` = kept width) and two k×k shortcut rotations.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from eval.errors import UserInputError

from .arch import MASK_NAMES, BlockLayout, decoder_layers, layout_for, model_geometry

CONFIG_KEY = "slimtune_pruning"


@dataclass
class PruningPlan:
    """What to keep: per layer, mask name -> sorted kept channel indices.

    method: who made the plan ("disp", "magnitude", "wanda-sp", "slicegpt").
    shortcuts: SliceGPT's per-layer residual rotations (attn_shortcut, mlp_shortcut) are present.
    info: anything worth recording with the plan (e.g. the export threshold, slicegpt's width).
    """

    method: str
    layers: list[dict[str, list[int]]]
    shortcuts: bool = False
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        return cls(method=d["method"], layers=[{m: list(map(int, layer[m])) for m in MASK_NAMES} for layer in d["layers"]],
                   shortcuts=bool(d.get("shortcuts", False)), info=dict(d.get("info", {})))

    @classmethod
    def from_masks(cls, method: str, masks: list[dict[str, torch.Tensor]], info: dict | None = None) -> PruningPlan:
        return cls(method, [{m: torch.nonzero(layer[m] > 0.5).flatten().tolist() for m in MASK_NAMES} for layer in masks],
                   info=info or {})

    def widths(self) -> list[dict[str, int]]:
        return [{m: len(layer[m]) for m in MASK_NAMES} for layer in self.layers]


def _is_full(idx: list[int], width: int) -> bool:
    return len(idx) == width  # indices are validated sorted and unique: full means 0..width-1


class PrunedDecoderLayer(nn.Module):
    """A decoder layer that reads and writes only its kept residual dimensions."""

    def __init__(self, layer: nn.Module, layout: BlockLayout, config, indices: dict[str, list[int]],
                 shortcuts: bool = False):
        super().__init__()
        for name, child in layer.named_children():  # same names, so the state-dict keys stay the base model's
            self.add_module(name, child)
        for attr in ("attention_type", "layer_type"):  # read by some models' forward
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.layout = layout
        self.pre_norm = layout.pre_norm(config)
        hidden = config.hidden_size
        for name in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
            # Full-width selections (kept=1.0, SliceGPT) skip the index ops; buffers are rebuilt
            # from config.json on load, so they are not saved with the weights.
            full = _is_full(indices[name], hidden)
            self.register_buffer(f"{name}_idx", None if full else torch.tensor(indices[name], dtype=torch.long),
                                 persistent=False)
        if shortcuts:
            self.attn_shortcut = nn.Linear(hidden, hidden, bias=False)
            self.mlp_shortcut = nn.Linear(hidden, hidden, bias=False)
        else:
            self.attn_shortcut = self.mlp_shortcut = None

    @staticmethod
    def _select(h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return h if idx is None else h.index_select(-1, idx)

    @staticmethod
    def _add(x: torch.Tensor, idx: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return x + y if idx is None else x.index_add(-1, idx, y.to(x.dtype))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = hidden_states
        attn_norm = self.get_submodule(self.layout.attn_norm)
        mlp_norm = self.get_submodule(self.layout.mlp_norm)

        h = attn_norm(x) if self.pre_norm else x
        a, _ = self.get_submodule(self.layout.attn)(hidden_states=self._select(h, self.attn_in_idx), **kwargs)
        residual = x if self.attn_shortcut is None else self.attn_shortcut(x)
        x = self._add(residual, self.attn_out_idx, a)
        if not self.pre_norm:
            x = attn_norm(x)

        h = mlp_norm(x) if self.pre_norm else x
        m = self.layout.mlp(self, self._select(h, self.mlp_in_idx))
        residual = x if self.mlp_shortcut is None else self.mlp_shortcut(x)
        x = self._add(residual, self.mlp_out_idx, m)
        if not self.pre_norm:
            x = mlp_norm(x)
        return x


def _set_linear(layer: nn.Module, path: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    setattr(parent, name, new)


def _slice_linear(layer: nn.Module, path: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    lin = layer.get_submodule(path)
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    if rows is not None:
        w = w.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w = w.index_select(1, cols)
    _set_linear(layer, path, w.contiguous(), None if b is None else b.contiguous())


def validate_plan(plan: PruningPlan, hidden: int, intermediate: list[int], n_layers: int, where: str = "plan") -> None:
    """Index lists must be sorted, unique, in range and non-empty, one entry per layer."""
    if len(plan.layers) != n_layers:
        raise UserInputError(f"{where}: {len(plan.layers)} layer entries for a model with {n_layers} layers")
    for i, layer in enumerate(plan.layers):
        for m in MASK_NAMES:
            idx = layer.get(m)
            width = intermediate[i] if m == "mlp_mid" else hidden
            if idx is None:
                raise UserInputError(f"{where}: layer {i} has no '{m}' index list")
            if not idx or any(b <= a for a, b in zip(idx, idx[1:])) or idx[0] < 0 or idx[-1] >= width:
                raise UserInputError(
                    f"{where}: layer {i} '{m}' must be a non-empty, strictly increasing list of indices in "
                    f"[0, {width}); got {len(idx)} entries spanning [{idx[0] if idx else '-'}, {idx[-1] if idx else '-'}]"
                )


def prune_model(model: nn.Module, plan: PruningPlan, inplace: bool = False) -> nn.Module:
    """Export: a physically smaller copy of `model` keeping the channels in `plan`."""
    layout = layout_for(model.config)
    geometry = model_geometry(model, layout)
    validate_plan(plan, geometry[0].hidden, [g.intermediate for g in geometry], len(geometry))
    if not inplace:
        model = copy.deepcopy(model)
    layers = decoder_layers(model, layout)
    for i, layer in enumerate(layers):
        idx = {m: torch.tensor(plan.layers[i][m], dtype=torch.long, device=model.device) for m in MASK_NAMES}
        for path in layout.attn_in:
            _slice_linear(layer, path, rows=None, cols=idx["attn_in"])
        _slice_linear(layer, layout.attn_out, rows=idx["attn_out"], cols=None)
        for path in layout.mlp_in:
            _slice_linear(layer, path, rows=idx["mlp_mid"], cols=idx["mlp_in"])
        _slice_linear(layer, layout.mlp_out, rows=idx["mlp_out"], cols=idx["mlp_mid"])
        layers[i] = PrunedDecoderLayer(layer, layout, model.config, plan.layers[i], shortcuts=plan.shortcuts).to(model.device)
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    return model


def _empty_structure(model: nn.Module, plan: PruningPlan) -> None:
    """Give `model` the pruned shapes of `plan` (uninitialised weights, filled by loading)."""
    layout = layout_for(model.config)
    layers = decoder_layers(model, layout)
    for i, layer in enumerate(layers):
        n = {m: len(plan.layers[i][m]) for m in MASK_NAMES}
        shapes = [(p, None, n["attn_in"]) for p in layout.attn_in] + [(layout.attn_out, n["attn_out"], None)]
        shapes += [(p, n["mlp_mid"], n["mlp_in"]) for p in layout.mlp_in] + [(layout.mlp_out, n["mlp_out"], n["mlp_mid"])]
        for path, rows, cols in shapes:
            lin = layer.get_submodule(path)
            out_f = lin.out_features if rows is None else rows
            in_f = lin.in_features if cols is None else cols
            _set_linear(layer, path, torch.empty(out_f, in_f, dtype=lin.weight.dtype),
                        None if lin.bias is None else torch.empty(out_f, dtype=lin.weight.dtype))
        layers[i] = PrunedDecoderLayer(layer, layout, model.config, plan.layers[i], shortcuts=plan.shortcuts)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(str(path / shard)))
        return state
    raise UserInputError(f"no model.safetensors (or its index) in {path}; expected a directory written by save_pretrained")


def load_pruned(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild a pruned model saved with `save_pretrained` (no `trust_remote_code`)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} is not a saved pruned model: config.json not found")
    config = AutoConfig.from_pretrained(path)
    if not isinstance(getattr(config, CONFIG_KEY, None), dict):
        raise UserInputError(f"{path}/config.json has no '{CONFIG_KEY}' entry: not a model written by slimtune prune")
    try:
        plan = PruningPlan.from_dict(getattr(config, CONFIG_KEY))
    except (KeyError, TypeError, ValueError) as e:
        raise UserInputError(f"{path}/config.json: malformed '{CONFIG_KEY}' entry ({e})") from e
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    geometry = model_geometry(model)
    validate_plan(plan, geometry[0].hidden, [g.intermediate for g in geometry], len(geometry), where=f"{path}/config.json")
    with no_init_weights():
        _empty_structure(model, plan)
    state = _read_state_dict(path)
    expected = model.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)} vs index lists {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserInputError(f"{path}: the index lists in config.json don't fit the saved weights: " + "; ".join(wrong[:5]))
    result = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if getattr(config, "tie_word_embeddings", False) else set()
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise UserInputError(f"{path}: saved weights don't match the pruned structure "
                             f"(missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    if tied:
        model.tie_weights()
    if dtype is None:  # keep the checkpoint's dtype (e.g. bf16), as from_pretrained does
        dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    model.to(device=device, dtype=dtype)
    model.eval()
    return model


def pruning_plan(model: nn.Module) -> PruningPlan | None:
    """The plan a pruned model was exported with (None for a dense model)."""
    d = getattr(model.config, CONFIG_KEY, None)
    return PruningPlan.from_dict(d) if isinstance(d, dict) else None


def block_params(model: nn.Module) -> int:
    """Attention + MLP weight parameters (and SliceGPT's shortcut rotations) of a dense or pruned model."""
    layout = layout_for(model.config)
    total = 0
    for layer in decoder_layers(model, layout):
        for path in (*layout.attn_in, layout.attn_out, *layout.mlp_in, layout.mlp_out):
            total += layer.get_submodule(path).weight.numel()
        for name in ("attn_shortcut", "mlp_shortcut"):
            if getattr(layer, name, None) is not None:
                total += getattr(layer, name).weight.numel()
    return total
