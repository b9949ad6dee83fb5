"""Finding the layers to compress, `compress()`, and saving / loading compressed models.

A decoder LM whose family is in `eval.architectures` has its targets read from that table (q/k/v
or fused qkv: attn_qkv; o: attn_out; gate/up or fc1: mlp_in; down or fc2: mlp_out). Other models
(ViT/DeiT, Swin) are searched by module structure: a *block* is an element of an `nn.ModuleList`
that holds `nn.Linear` layers and no further list of such blocks (ViT/DeiT `layers.i`, Swin
`layers.s.blocks.i`). Inside a block, linears in registration order are attention ones when
their path mentions attention ("attn"/"attention") and MLP ones otherwise; the last attention
linear is the attention output projection, the others query/key/value; the last MLP linear is
the MLP output, the others MLP inputs. Embeddings, patch projections, Swin's patch-merging
reductions and classifier / LM heads are not in blocks and are never touched.
"""

from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path

import torch
from torch import nn

from eval import architectures as arch
from eval.calibration import batch_size_of, collect_input_statistics
from eval.errors import UserInputError
from eval.hf_auto import Family
from eval.io import read_json
from lowrank_vit.allocate import budget, greedy_ranks, uniform_ranks
from lowrank_vit.compensate import compensate_sequential
from lowrank_vit.config import MixedRankConfig
from lowrank_vit.decompose import decompose, output_error
from lowrank_vit.layer import LowRankLinear
from lowrank_vit.quantize import quantize_factors_int8

FORMAT = "slimtune-lowrank"
WEIGHTS_NAME = "model.safetensors"
LOWRANK_NAME = "lowrank_config.json"
_ATTENTION = re.compile(r"attn|attention", re.IGNORECASE)


def _linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear | LowRankLinear)]


def _is_block_list(module: nn.Module) -> bool:
    return isinstance(module, nn.ModuleList) and any(_linears(child) for child in module)


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every transformer block: innermost ModuleList elements holding linears."""
    blocks = []
    for name, module in model.named_modules():
        if not _is_block_list(module):
            continue
        for i, child in enumerate(module):
            nested = any(_is_block_list(m) for m in child.modules() if m is not child)
            if _linears(child) and not nested:
                blocks.append((f"{name}.{i}" if name else str(i), child))
    return blocks


def _roles_by_structure(block: nn.Module) -> list[tuple[str, str]]:
    attention, mlp = [], []
    for name, _ in _linears(block):
        (attention if _ATTENTION.search(name) else mlp).append(name)
    labelled = [(n, "attn_qkv") for n in attention[:-1]] + [(n, "attn_out") for n in attention[-1:]]
    return labelled + [(n, "mlp_in") for n in mlp[:-1]] + [(n, "mlp_out") for n in mlp[-1:]]


def _roles_by_table(block: nn.Module, layout: arch.DecoderLayout) -> list[tuple[str, str]]:
    named = arch.linear_roles(layout)  # GPT-2's Conv1D projections are not linears: none targeted
    return [(name, named[name]) for name, _ in _linears(block) if name in named]


def find_targets(model: nn.Module, roles=("attn_qkv", "attn_out", "mlp_in", "mlp_out")) -> dict[str, str]:
    """{module name: role} of the linears to compress, in registration order."""
    layout = arch.find_layout(model)
    if layout is not None:
        blocks = [(f"{layout.layers}.{i}", layer) for i, layer in enumerate(arch.decoder_layers(model, layout))]
    else:
        blocks = find_blocks(model)
    targets = {}
    for block_name, block in blocks:
        labelled = _roles_by_table(block, layout) if layout is not None else _roles_by_structure(block)
        for name, role in labelled:
            if role in roles:
                targets[f"{block_name}.{name}"] = role
    return targets


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def count_weights(model: nn.Module) -> int:
    """Parameters plus the int8 factors' elements and their float scales (quantized factors are buffers)."""
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, LowRankLinear) and m.is_int8:
            total += sum(b.numel() for b in m.buffers(recurse=False))
    return total


def _take_samples(batches, limit: int) -> list:
    """The first `limit` samples of `batches`, as a list (it is iterated many times)."""
    taken, count = [], 0
    for batch in batches:
        if count >= limit:
            break
        if isinstance(batch, tuple | list) and batch and torch.is_tensor(batch[0]):
            batch = batch[0]  # a DataLoader's (inputs, labels)
        if not (torch.is_tensor(batch) or isinstance(batch, dict)) or (torch.is_tensor(batch) and batch.dim() < 2):
            raise UserInputError(f"a calibration batch must be a tensor of pixel_values [B, 3, H, W] or input_ids "
                                 f"[B, T] (or a dict of model inputs); got {type(batch).__name__}"
                                 + (f" of shape {list(batch.shape)}" if torch.is_tensor(batch) else ""))
        n = batch_size_of(batch)
        if count + n > limit:
            keep = limit - count
            batch = batch[:keep] if torch.is_tensor(batch) else {k: v[:keep] if torch.is_tensor(v) else v for k, v in batch.items()}
            n = keep
        taken.append(batch)
        count += n
    return taken


def compress(model: nn.Module, calib_batches, config: MixedRankConfig, progress: bool = True,
             input_stats: dict | None = None) -> dict:
    """Compress `model`'s targeted linears in place; returns the report (JSON-ready dict).

    calib_batches: iterable of `pixel_values` [B, 3, H, W] (an image classifier) or `input_ids`
    [B, T] (a causal LM) tensors, of dicts of model kwargs, or of (inputs, labels) pairs as a
    DataLoader yields them; the first `config.calib_images` samples are used (the list is kept:
    compensation runs over it once per layer).
    input_stats: the dense model's `eval.calibration.collect_input_statistics` over these same
    batches, to reuse across several compressions of one model (a benchmark); default: collected here.
    """
    start = time.perf_counter()
    targets = find_targets(model, config.targets)
    if not targets:
        raise UserInputError(
            f"{type(model).__name__} has no layers to compress for targets {list(config.targets)}: expected "
            "transformer blocks (an nn.ModuleList of layers holding nn.Linear attention / MLP projections), "
            "as in transformers' ViT, DeiT, Swin or a causal LM"
        )
    batches = _take_samples(calib_batches, config.calib_images)
    if not batches:
        raise UserInputError("no calibration batches were given; expected at least one batch of images or token ids")
    samples = sum(batch_size_of(b) for b in batches)
    params_before = count_weights(model)

    layers, stats, unused = _calibrate(model, targets, batches, input_stats, progress)
    _check_enough_tokens(stats, layers, samples)
    order = sorted(layers, key=lambda n: stats[n].order)
    with torch.no_grad():
        decomps = {n: decompose(config.method, layers[n].weight, stats[n]) for n in order}
    budget_params, ranks = _allocate_ranks(config, layers, decomps)

    # Compensation refits each layer to the dense model's outputs: keep a dense copy for it.
    dense_model = copy.deepcopy(model) if config.compensates and any(r is not None for r in ranks.values()) else None
    generator = torch.Generator().manual_seed(config.seed)  # the residual terms' initialisation, in order
    layer_reports = {name: _factorise(model, name, targets[name], decomps[name], ranks[name], stats[name],
                                      config.effective_residual_rank, generator) for name in order}
    if dense_model is not None:
        _compensate(model, dense_model, order, batches, config, progress, layer_reports)
        del dense_model
    _finish_layers(model, order, config, stats)

    report = _report(config, budget_params, layer_reports, params_before, count_weights(model), samples, stats, unused)
    report["compress_time_s"] = time.perf_counter() - start
    adopt(model, report)  # a transformers model now saves (save_pretrained) and loads (Auto classes) as low-rank
    return report


def _calibrate(model: nn.Module, targets: dict[str, str], batches: list, input_stats: dict | None,
               progress: bool) -> tuple[dict[str, nn.Module], dict, list[str]]:
    """(targeted layers, their input statistics, the unused ones left out): collected over
    `batches`, or taken from `input_stats`. A layer no forward pass calls is left dense."""
    layers = {name: model.get_submodule(name) for name in targets}
    if input_stats is None:
        stats = collect_input_statistics(model, layers, batches, ("xtx", "abs_mean"), progress=progress)
    else:
        missing = sorted(set(layers) - set(input_stats))
        if missing:
            raise UserInputError(f"input_stats lacks targeted layers {missing[:3]}; collect them for this model and targets")
        stats = {n: input_stats[n] for n in layers}
    unused = [n for n, s in stats.items() if s.count == 0]
    for name in unused:  # never called in a forward pass: nothing to calibrate on
        del layers[name], stats[name]
    return layers, stats, unused


def _allocate_ranks(config: MixedRankConfig, layers: dict[str, nn.Module], decomps: dict) -> tuple[int, dict]:
    """(the parameter budget, {layer: rank or None for dense}): greedy over the whitened gains
    for aa-mixed, the same fraction in every layer otherwise."""
    shapes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    budget_params = budget(shapes, config.keep)
    if config.method == "aa-mixed":
        gains = {n: d.normalized_gains() for n, d in decomps.items()}
        return budget_params, greedy_ranks(shapes, gains, budget_params, config.effective_residual_rank, config.min_rank)
    return budget_params, uniform_ranks(shapes, config.keep, config.min_rank)


def _factorise(model: nn.Module, name: str, role: str, decomp, rank: int | None, stats, residual: int,
               generator: torch.Generator) -> dict:
    """Replace linear `name` by its rank-`rank` `LowRankLinear` (none when `rank` is None); its report entry."""
    dense = model.get_submodule(name)
    shape = (dense.out_features, dense.in_features)
    entry = {"role": role, "shape": list(shape), "rank": rank, "residual_rank": 0, "params_dense": shape[0] * shape[1]}
    if rank is None:
        entry.update(params=entry["params_dense"], output_error=0.0)
    else:
        up, down = decomp.factors(rank)
        with torch.no_grad():
            entry["output_error"] = output_error(dense.weight, up @ down, stats.xtx)
        bias = dense.bias.detach() if dense.bias is not None else None
        new = LowRankLinear.from_factors(up.to(dense.weight), down.to(dense.weight), bias, residual, generator)
        new.train(dense.training)
        _replace(model, name, new)
        entry.update(residual_rank=residual, params=new.weight_parameters())
    if decomp.jitter:
        entry["cholesky_jitter"] = decomp.jitter
    return entry


def _compensate(model: nn.Module, dense_model: nn.Module, order: list[str], batches: list,
                config: MixedRankConfig, progress: bool, layer_reports: dict) -> None:
    """Sequential layer-wise error compensation; each layer's before / after error goes in its entry."""
    results = compensate_sequential(model, dense_model, order, batches, config.compensate_steps, config.lr,
                                    config.compensate_factors, config.seed, progress, config.refit)
    for name, r in results.items():
        layer_reports[name]["compensation"] = {"error_before": r.error_before, "error_after": r.error_after,
                                               "reverted": r.reverted}


def _finish_layers(model: nn.Module, order: list[str], config: MixedRankConfig, stats: dict) -> None:
    """Merge the residual terms (exact: one pair of thin matmuls at inference), then int8 if asked."""
    for name in order:
        module = model.get_submodule(name)
        if isinstance(module, LowRankLinear):
            module.merge_residual()
    if config.int8:
        quantize_factors_int8(model, {n: stats[n].xtx / stats[n].count for n in order})


def _report(config: MixedRankConfig, budget_params: int, layer_reports: dict, params_before: int,
            params_after: int, samples: int, stats: dict, unused: list[str]) -> dict:
    targeted_before = sum(e["params_dense"] for e in layer_reports.values())
    targeted_after = sum(e["params"] for e in layer_reports.values())
    return {
        "method": config.method,
        "config": config.to_dict(),
        "budget": budget_params,
        "targeted_params_before": targeted_before,
        "targeted_params_after": targeted_after,
        "keep_achieved": targeted_after / targeted_before,
        "params_before": params_before,
        "params_after": params_after,
        "calib_samples": samples,
        "calib_tokens_per_layer": min(s.count for s in stats.values()),
        "ranks": {n: ("dense" if e["rank"] is None else e["rank"] + e["residual_rank"]) for n, e in layer_reports.items()},
        "layers": layer_reports,
        "skipped_unused_layers": unused,
    }


def _check_enough_tokens(stats, layers, samples: int) -> None:
    # XᵀX needs at least as many tokens as input features to be full rank (and whitening to mean anything).
    widest = max(m.in_features for m in layers.values())
    tokens = min(s.count for s in stats.values())
    if tokens < widest:
        per_sample = max(tokens // max(samples, 1), 1)
        needed = math.ceil(widest / per_sample)
        raise UserInputError(
            f"too few calibration samples: {samples} gave {tokens} tokens per layer, but the widest targeted "
            f"layer has {widest} input features; need at least {needed} samples ({per_sample} tokens each), "
            f"more (several times that) for a good estimate"
        )


# ---------------------------------------------------------------------------- save / load


def _lowrank_layers(model: nn.Module) -> dict[str, dict]:
    return {
        name: {"in_features": m.in_features, "out_features": m.out_features, "rank": m.rank,
               "residual_rank": m.residual_rank, "bias": m.bias is not None, "int8": m.is_int8}
        for name, m in model.named_modules() if isinstance(m, LowRankLinear)
    }


CONFIG_KEY = "slimtune_lowrank"  # config.json entry: the low-rank layers and how they were made


def _entry(model: nn.Module) -> dict:
    entry = dict(getattr(model.config, CONFIG_KEY, None) or {})
    entry.update(format=FORMAT, version=2, layers=_lowrank_layers(model))
    return entry


def _build_from_config(model: nn.Module) -> None:
    """The low-rank model class's `__init__` ends here: `LowRankLinear` shells of the saved ranks
    replace the dense linears the config names (weights are filled by loading)."""
    layers = (getattr(model.config, CONFIG_KEY, None) or {}).get("layers")
    if not isinstance(layers, dict):
        raise UserInputError(f"the config has no '{CONFIG_KEY}' entry with the low-rank layers: not a model written by lowrank_vit")
    for name, spec in layers.items():
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise UserInputError(f"config.json names layer {name!r}, which {type(model).__name__} does not have") from e
        new = LowRankLinear(spec["in_features"], spec["out_features"], spec["rank"], spec["residual_rank"],
                            bias=spec["bias"], int8=spec["int8"], dtype=old.weight.dtype)
        _replace(model, name, new)


def _refresh_entry(model: nn.Module) -> None:
    setattr(model.config, CONFIG_KEY, _entry(model))


def _write_card(model: nn.Module, directory) -> None:
    from eval.model_card import write_model_card

    entry = getattr(model.config, CONFIG_KEY, None) or {}
    made = entry.get("compression") or {}
    card = dict(getattr(model, "slimtune_card", None) or {})
    causal = model.config.base_architecture.endswith("ForCausalLM")
    auto = "AutoModelForCausalLM" if causal else "AutoModelForImageClassification"
    before, after = made.get("targeted_params_before"), made.get("targeted_params_after")
    budget = card.pop("budget", None) or (
        f"{after:,} of {before:,} targeted linear weights kept ({100 * after / before:.1f} %)" if before and after
        else f"{len(entry.get('layers', {}))} low-rank layers")
    write_model_card(
        directory, title=f"low-rank {model.config.base_model_type} model ({made.get('method', 'lowrank_vit')})",
        tags=["low-rank", str(made.get("method", "lowrank"))],
        method="activation-aware low-rank factorisation of attention / MLP linears (`LowRankLinear`: "
        "y = (x·downᵀ)·upᵀ + bias); per-layer ranks are in config.json under `slimtune_lowrank`",
        pipeline_tag="text-generation" if causal else "image-classification", budget=budget,
        settings={**(made.get("config") or {}), **card.pop("settings", {})},
        load=f"import lowrank_vit  # registers model_type 'slimtune_lowrank' with transformers\n"
        f"from transformers import {auto}\nmodel = {auto}.from_pretrained(DIR)  # no trust_remote_code",
        **card,
    )


FAMILY = Family("slimtune_lowrank", "lowrank_vit", build=_build_from_config, before_save=_refresh_entry,
                card=_write_card)


def adopt(model: nn.Module, report: dict | None = None) -> None:
    """Give a compressed transformers model the `slimtune_lowrank` type (its `save_pretrained`
    then writes the ranks into config.json), recording how it was compressed."""
    if not (hasattr(model, "save_pretrained") and hasattr(getattr(model, "config", None), "to_dict")):
        return  # not a transformers model: nothing to register
    FAMILY.adopt(model)
    _refresh_entry(model)
    if report is not None:
        getattr(model.config, CONFIG_KEY)["compression"] = {
            k: report[k] for k in ("method", "config", "targeted_params_before", "targeted_params_after") if k in report}


def save_pretrained(model: nn.Module, save_directory, report: dict | None = None) -> Path:
    """`model.save_pretrained(save_directory)`, written atomically, after `adopt` (an alias kept
    for earlier callers): config.json (the base config, `model_type: slimtune_lowrank` and the
    ranks), model.safetensors and a README.md model card."""
    from eval.io import atomic_directory

    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise UserInputError(f"save_pretrained needs a transformers model with a .config; got {type(model).__name__}")
    adopt(model, report)
    save_directory = Path(save_directory)
    with atomic_directory(save_directory) as tmp:
        model.save_pretrained(tmp)
    return save_directory


def load_compressed(directory, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """`AutoModelFor*.from_pretrained(directory)` after `import lowrank_vit` (strict: every weight
    must match), in eval mode on `device`. Also reads the earlier format (a plain base config
    plus lowrank_config.json). No pickle, no remote code."""
    from eval.io import verify_safetensors

    directory = Path(directory)
    raw = read_json(directory / "config.json", "model config")
    verify_safetensors(directory / WEIGHTS_NAME, "weights file")
    config = None
    if raw.get("model_type") != FAMILY.model_type:  # the earlier format
        meta = read_json(directory / LOWRANK_NAME, "compressed-model description")
        if meta.get("format") != FORMAT:
            raise UserInputError(f"{directory / LOWRANK_NAME} is not a slimtune low-rank model description "
                                 f"(format {meta.get('format')!r})")
        arch = meta.get("architecture") or (raw.get("architectures") or [""])[0]
        config = FAMILY.config_from_base_dict(raw, arch, **{CONFIG_KEY: {"format": FORMAT, "layers": meta["layers"],
                                                                          "compression": meta.get("compression")}})
    _, model_class = FAMILY.classes_for(raw if config is None else config.to_dict())
    model, info = model_class.from_pretrained(directory, config=config, dtype=dtype or "auto",
                                              output_loading_info=True, ignore_mismatched_sizes=True)
    bad = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(bad.values()):
        raise UserInputError(f"{directory / WEIGHTS_NAME} does not match the architecture: "
                             + ", ".join(f"{k.replace('_keys', '')} {v[:5]}" for k, v in bad.items() if v))
    return model.to(device).eval()


__all__ = ["FAMILY", "adopt", "compress", "find_targets", "find_blocks", "save_pretrained", "load_compressed", "count_weights"]
