"""Speed of a low-rank-compressed ViT against its dense original, without calibration data.

Speed depends on the ranks, not on the factors' values, so a copy whose every block linear is
a `LowRankLinear` of the uniform rank that removes a given share of the block weights, with
random factors, runs at the speed of a compressed model of that budget:

    result = lowrank_speed(model, removed=(0.5, 0.6), batch=32)
    result["speedup"]["0.5"]                  # images/s at -50 % over dense images/s

`measure_vit_speed` does the same on a ViT-B/16-shaped classifier with random weights (a
`eval.measure.run_in_fresh_process` target), for `slimtune bench --scaling`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from eval.errors import UserInputError, require_positive
from eval.speed import side_by_side_throughput
from lowrank_vit.layer import LowRankLinear
from lowrank_vit.model import find_targets

# ViT-B/16 (Dosovitskiy et al., 2021, Table 1): what transformers' ViTConfig defaults to.
VIT_B_16 = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_labels": 1000}


def uniform_rank(in_features: int, out_features: int, removed: float) -> int:
    """The rank r whose factors r * (in + out) keep (1 - removed) of the in * out weights."""
    return max(1, round((1 - removed) * in_features * out_features / (in_features + out_features)))


def uniform_lowrank_copy(model: nn.Module, removed: float, seed: int = 0) -> nn.Module:
    """A copy of `model` whose block linears are random-factor `LowRankLinear`s of uniform rank."""
    if not isinstance(removed, (int, float)) or not 0 < removed < 1:
        raise UserInputError(f"removed must be a fraction in (0, 1), got {removed!r}")
    compressed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for name in find_targets(compressed):
        dense = compressed.get_submodule(name)
        rank = uniform_rank(dense.in_features, dense.out_features, removed)
        like = dict(dtype=dense.weight.dtype)
        up = torch.randn(dense.out_features, rank, generator=generator).to(**like)
        down = torch.randn(rank, dense.in_features, generator=generator).to(**like)
        layer = LowRankLinear.from_factors(up / rank ** 0.5, down / dense.in_features ** 0.5, dense.bias)
        compressed.set_submodule(name, layer.to(dense.weight.device))
    return compressed.eval()


def lowrank_speed(model: nn.Module, removed=(0.5, 0.6), batch: int = 32, rounds: int = 5,
                  seed: int = 0) -> dict[str, Any]:
    """Images/s of `model` and of its uniform low-rank copies, measured side by side."""
    require_positive("batch", batch)
    config = model.config
    models = {"dense": model.eval(), **{str(r): uniform_lowrank_copy(model, r, seed) for r in removed}}
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=generator)
    param = next(model.parameters())
    inputs = {"pixel_values": pixels.to(device=param.device, dtype=param.dtype)}
    speed = side_by_side_throughput(models, inputs, items=batch, rounds=rounds)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return {
        "removed": [float(r) for r in removed],
        "params": params,
        "images_per_s": speed,
        "speedup": {str(r): speed[str(r)] / speed["dense"] for r in removed},
        "batch": batch,
        "rounds": rounds,
        "dtype": str(param.dtype).removeprefix("torch."),
        "device": str(param.device),
    }


def measure_vit_speed(removed=(0.5, 0.6), batch: int = 32, rounds: int = 5, device: str = "cpu",
                      dtype: str = "float32", seed: int = 0) -> dict[str, Any]:
    """`lowrank_speed` on a ViT-B/16 classifier with random weights (a fresh-process target)."""
    from transformers import ViTConfig, ViTForImageClassification

    from eval.measure import mark_setup_done

    torch.manual_seed(seed)
    with torch.device(device):
        model = ViTForImageClassification(ViTConfig(**VIT_B_16)).to(getattr(torch, dtype))
    mark_setup_done()
    result = lowrank_speed(model, removed=tuple(removed), batch=batch, rounds=rounds, seed=seed)
    result["model"] = "ViT-B/16 (random weights)"
    return result


REPORT_NAME = "bench_scaling_vit"


def run_vit_speed(out_dir, removed=(0.5, 0.6), batch: int = 32, rounds: int = 5, device: str = "cpu",
                  dtype: str = "float32", seed: int = 0, log=print) -> dict[str, Any]:
    """`measure_vit_speed` in a fresh process; writes bench_scaling_vit.{json,md} under `out_dir`."""
    from eval.measure import machine_info, machine_line, run_in_fresh_process
    from eval.report import markdown_table, write_report

    log(f"bench --scaling: ViT-B/16 images/s, dense and {', '.join(f'-{100 * r:.0f} %' for r in removed)}")
    raw = run_in_fresh_process(f"{__name__}:measure_vit_speed", dict(
        removed=list(removed), batch=batch, rounds=rounds, device=device, dtype=dtype, seed=seed))
    data = {**raw, "machine": machine_info()}
    if raw.get("error"):
        markdown = f"# ViT-B/16 low-rank speed\n\nFailed: {raw['error']}\n"
    else:
        rows = [{"model": name if name == "dense" else f"-{100 * float(name):.0f} % (uniform rank)",
                 "params M": raw["params"][name] / 1e6, "images/s": raw["images_per_s"][name],
                 "speedup": 1.0 if name == "dense" else raw["speedup"][name]} for name in raw["images_per_s"]]
        markdown = "\n".join([
            "# ViT-B/16 low-rank speed",
            "",
            f"ViT-B/16 with random weights in {raw['dtype']} on `{raw['device']}`, batch {raw['batch']}; every "
            "block linear a random-factor low-rank layer of the uniform rank that removes the given share of "
            f"its weights; all models timed side by side in {raw['rounds']} alternating rounds in one process.",
            "",
            markdown_table(rows, list(rows[0]), floatfmt=".4g"),
            machine_line(data["machine"]),
        ]) + "\n"
    paths = write_report(out_dir, REPORT_NAME, data, markdown)
    return {"data": data, "markdown": markdown, "paths": paths}


__all__ = ["VIT_B_16", "uniform_rank", "uniform_lowrank_copy", "lowrank_speed", "measure_vit_speed",
           "run_vit_speed"]
