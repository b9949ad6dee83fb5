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
from eval.hf_auto import Family
from pruning.arch import MASK_NAMES, BlockLayout, decoder_layers, layout_for, model_geometry

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
    """A decoder layer that reads and writes only its kept residual dimensions.

    Build one with `pruned_layer`, whose instances are also instances of the layer class they
    replace: transformers records `output_hidden_states` by hooking the modules of that class.
    """

    def __init__(self, layer: nn.Module, layout: BlockLayout, config, indices: dict[str, list[int]],
                 shortcuts: bool = False):
        nn.Module.__init__(self)  # not the replaced class's __init__: its children are moved over below
        for name, child in layer.named_children():  # same names, so the state-dict keys stay the base model's
            self.add_module(name, child)
        for attr in ("attention_type", "layer_type"):  # read by some models' forward
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.layout = layout
        self.pre_norm = layout.pre_norm(config)
        hidden = config.hidden_size
        # Full-width selections (kept=1.0, SliceGPT) skip the index ops. The lists come from
        # config.json; their tensors are made on first use on the activations' device (not
        # buffers: transformers builds models on the meta device and would leave them empty).
        self._indices = {name: None if _is_full(indices[name], hidden) else list(indices[name])
                         for name in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
        self._index_tensors: dict[tuple[str, torch.device], torch.Tensor] = {}
        if shortcuts:
            self.attn_shortcut = nn.Linear(hidden, hidden, bias=False)
            self.mlp_shortcut = nn.Linear(hidden, hidden, bias=False)
        else:
            self.attn_shortcut = self.mlp_shortcut = None

    def _index(self, name: str, device: torch.device) -> torch.Tensor | None:
        if self._indices[name] is None:
            return None
        key = (name, device)
        if key not in self._index_tensors:
            with torch.inference_mode(False):  # made during an evaluation, still usable in training later
                self._index_tensors[key] = torch.tensor(self._indices[name], dtype=torch.long, device=device)
        return self._index_tensors[key]

    @staticmethod
    def _select(h: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return h if idx is None else h.index_select(-1, idx)

    @staticmethod
    def _add(x: torch.Tensor, idx: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return x + y if idx is None else x.index_add(-1, idx, y.to(x.dtype))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        x = hidden_states
        dev = x.device
        attn_norm = self.get_submodule(self.layout.attn_norm)
        mlp_norm = self.get_submodule(self.layout.mlp_norm)

        h = attn_norm(x) if self.pre_norm else x
        a, _ = self.get_submodule(self.layout.attn)(hidden_states=self._select(h, self._index("attn_in", dev)), **kwargs)
        residual = x if self.attn_shortcut is None else self.attn_shortcut(x)
        x = self._add(residual, self._index("attn_out", dev), a)
        if not self.pre_norm:
            x = attn_norm(x)

        h = mlp_norm(x) if self.pre_norm else x
        m = self.layout.mlp(self, self._select(h, self._index("mlp_in", dev)))
        residual = x if self.mlp_shortcut is None else self.mlp_shortcut(x)
        x = self._add(residual, self._index("mlp_out", dev), m)
        if not self.pre_norm:
            x = mlp_norm(x)
        return x


_PRUNED_CLASSES: dict[type, type] = {}


def pruned_layer(layer: nn.Module, layout: BlockLayout, config, indices: dict[str, list[int]],
                 shortcuts: bool = False) -> PrunedDecoderLayer:
    """`layer` as a PrunedDecoderLayer that is still an instance of `type(layer)` (for
    transformers' output hooks); PrunedDecoderLayer's forward comes first in its MRO."""
    base = type(layer)
    if base not in _PRUNED_CLASSES:
        _PRUNED_CLASSES[base] = type(f"Pruned{base.__name__}", (PrunedDecoderLayer, base), {"__module__": __name__})
    return _PRUNED_CLASSES[base](layer, layout, config, indices, shortcuts=shortcuts)


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
            _slice_linear(layer, path, rows=layout.mlp_in_rows(idx["mlp_mid"], geometry[i].intermediate),
                          cols=idx["mlp_in"])
        _slice_linear(layer, layout.mlp_out, rows=idx["mlp_out"], cols=idx["mlp_mid"])
        layers[i] = pruned_layer(layer, layout, model.config, plan.layers[i], shortcuts=plan.shortcuts).to(model.device)
    setattr(model.config, CONFIG_KEY, plan.to_dict())
    FAMILY.adopt(model)
    return model


def empty_structure(model: nn.Module, plan: PruningPlan) -> None:
    """Give `model` the pruned shapes of `plan` (uninitialised weights, filled by loading), and
    the pruned model type (so `save_pretrained` writes `model_type: slimtune_pruned`)."""
    layout = layout_for(model.config)
    layers = decoder_layers(model, layout)
    for i, layer in enumerate(layers):
        n = {m: len(plan.layers[i][m]) for m in MASK_NAMES}
        shapes = [(p, None, n["attn_in"]) for p in layout.attn_in] + [(layout.attn_out, n["attn_out"], None)]
        shapes += [(p, n["mlp_mid"] * layout.mlp_halves, n["mlp_in"]) for p in layout.mlp_in]
        shapes += [(layout.mlp_out, n["mlp_out"], n["mlp_mid"])]
        for path, rows, cols in shapes:
            lin = layer.get_submodule(path)
            out_f = lin.out_features if rows is None else rows
            in_f = lin.in_features if cols is None else cols
            _set_linear(layer, path, torch.empty(out_f, in_f, dtype=lin.weight.dtype),
                        None if lin.bias is None else torch.empty(out_f, dtype=lin.weight.dtype))
        layers[i] = pruned_layer(layer, layout, model.config, plan.layers[i], shortcuts=plan.shortcuts)
    if hasattr(model.config, "to_dict") and hasattr(model, "save_pretrained"):
        FAMILY.adopt(model)


def _plan_of(config, where: str) -> PruningPlan:
    entry = getattr(config, CONFIG_KEY, None)
    if not isinstance(entry, dict):
        raise UserInputError(f"{where} has no '{CONFIG_KEY}' entry: not a model written by slimtune prune")
    try:
        return PruningPlan.from_dict(entry)
    except (KeyError, TypeError, ValueError) as e:
        raise UserInputError(f"{where}: malformed '{CONFIG_KEY}' entry ({e})") from e


def _build_from_config(model: nn.Module) -> None:
    """The pruned model class's `__init__` ends here: the dense base model gets the shapes of the
    config's plan (weights are filled by loading)."""
    plan = _plan_of(model.config, "the config")
    geometry = model_geometry(model)
    validate_plan(plan, geometry[0].hidden, [g.intermediate for g in geometry], len(geometry), where="config.json")
    empty_structure(model, plan)


def _write_card(model: nn.Module, directory) -> None:
    from eval.model_card import write_model_card

    plan = _plan_of(model.config, "the config")
    card = dict(getattr(model, "slimtune_card", None) or {})
    dense = card.pop("dense_block_params", None)
    kept = block_params(model)
    budget = card.pop("budget", None) or (f"{kept:,} attention + MLP weights kept" + (
        f" of {dense:,} ({100 * kept / dense:.1f} %)" if dense else ""))
    write_model_card(
        directory, title=f"{plan.method} pruned {model.config.base_model_type} model", tags=["pruning", plan.method],
        method=f"structured pruning ({plan.method}): physically smaller linears, index_select / index_add on the "
        "residual; the kept channel indices are in config.json under `slimtune_pruning`",
        pipeline_tag="text-generation", budget=budget,
        settings={"method": plan.method, **plan.info, **card.pop("settings", {})},
        load="import pruning  # registers model_type 'slimtune_pruned' with transformers\n"
        "from transformers import AutoModelForCausalLM\n"
        "model = AutoModelForCausalLM.from_pretrained(DIR)  # no trust_remote_code",
        **card,
    )


FAMILY = Family("slimtune_pruned", "pruning", build=_build_from_config, card=_write_card)


def load_pruned(path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path)` (after `import pruning`), in eval mode, on
    `device`; the checkpoint's dtype unless `dtype`. Also reads directories written before the
    `slimtune_pruned` model type existed (a plain base config with the `slimtune_pruning` entry)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserInputError(f"{path} is not a saved pruned model: config.json not found")
    raw = json.loads((path / "config.json").read_text())
    _plan_of(_as_attributes(raw), f"{path}/config.json")
    from eval.io import verify_safetensors

    index = path / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    for shard in shards:  # a truncated file is named, not a transformers traceback
        verify_safetensors(path / shard, "weights file")
    config = None
    if raw.get("model_type") != FAMILY.model_type:  # the earlier format
        config = FAMILY.config_from_base_dict(raw, (raw.get("architectures") or [""])[0])
    # mismatched shapes are reported by _check_loading (naming the tensors) instead of raised
    model, info = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype or "auto",
                                                       output_loading_info=True, ignore_mismatched_sizes=True)
    _check_loading(info, path)
    return model.to(device).eval()


def _as_attributes(d: dict):
    """The dict's keys as attributes (to read a raw config.json like a config)."""
    from types import SimpleNamespace

    return SimpleNamespace(**d)


def _check_loading(info: dict, path: Path) -> None:
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        raise UserInputError(f"{path}: the index lists in config.json don't fit the saved weights: "
                             + "; ".join(str(m) for m in mismatched[:5]))
    missing, unexpected = list(info.get("missing_keys") or []), list(info.get("unexpected_keys") or [])
    if missing or unexpected:
        raise UserInputError(f"{path}: saved weights don't match the pruned structure "
                             f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")


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
