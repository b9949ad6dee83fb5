"""Speed of a DISP-pruned model against its dense original, without training a hypernetwork.

Speed depends on the kept widths, not on which channels are kept, so a random plan with
DISP's structure (every layer and every one of the five selections its own random channel
subset, so the exported model pays the same `index_select` / `index_add` as a trained one)
measures what a trained DISP model of that size would run at:

    plan = random_disp_plan(model, kept=0.5)             # 50 % of the block parameters removed
    result = pruned_speed(model, kept=0.5, batch=8, seq=512)
    result["speedup"]                                     # pruned tokens/s over dense tokens/s

`measure_pruned_speed` does the same from a named architecture with random weights (e.g.
llama-2-7b in bf16 on CUDA) and is an `eval.measure.run_in_fresh_process` target.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from eval.errors import UserInputError, require_positive
from eval.speed import side_by_side_throughput
from pruning.arch import MASK_NAMES, layout_for, model_geometry
from pruning.baselines import shared_widths
from pruning.model import PruningPlan, block_params, prune_model


def random_disp_plan(model: nn.Module, kept: float, seed: int = 0) -> PruningPlan:
    """A plan keeping `kept` of the block parameters, every selection an independent random subset.

    Widths: the same fraction of every residual and intermediate selection, chosen so the kept
    block parameters are closest to `kept` (as the shared-set baselines size theirs); the
    channels themselves differ per layer and per selection, as DISP's do.
    """
    if not isinstance(kept, (int, float)) or not 0 < kept <= 1:
        raise UserInputError(f"kept must be a fraction in (0, 1], got {kept!r}")
    geometry = model_geometry(model, layout_for(model.config))
    n_hidden, n_mid = shared_widths(geometry, float(kept))
    generator = torch.Generator().manual_seed(seed)

    def pick(width: int, n: int) -> list[int]:
        return sorted(torch.randperm(width, generator=generator)[:n].tolist())

    layers = []
    for g, mid in zip(geometry, n_mid):
        layers.append({m: pick(g.width(m), mid if m == "mlp_mid" else n_hidden) for m in MASK_NAMES})
    return PruningPlan("random-disp", layers, info={"kept_target": float(kept), "seed": seed,
                                                    "kept_residual": n_hidden, "kept_intermediate": n_mid})


def pruned_speed(model: nn.Module, kept: float = 0.5, batch: int = 8, seq: int = 512, rounds: int = 5,
                 seed: int = 0) -> dict[str, Any]:
    """Forward tokens/s of `model` and of its random DISP-style pruned copy, in alternating rounds."""
    for name, value in (("batch", batch), ("seq", seq), ("rounds", rounds)):
        require_positive(name, value)
    plan = random_disp_plan(model, kept, seed=seed)
    pruned = prune_model(model, plan)  # a physically smaller copy (the export `slimtune prune` saves)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator).to(model.device)
    speed = side_by_side_throughput({"dense": model, "pruned": pruned}, {"input_ids": ids}, items=ids.numel(),
                                    rounds=rounds)
    dense_block, pruned_block = block_params(model), block_params(pruned)
    return {
        "kept_target": float(kept),
        "block_params_dense": dense_block,
        "block_params_pruned": pruned_block,
        "block_params_kept": pruned_block / dense_block,
        "params_dense": sum(p.numel() for p in model.parameters()),
        "params_pruned": sum(p.numel() for p in pruned.parameters()),
        "tokens_per_s_dense": speed["dense"],
        "tokens_per_s_pruned": speed["pruned"],
        "speedup": speed["pruned"] / speed["dense"],
        "batch": batch,
        "seq": seq,
        "rounds": rounds,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(model.device),
    }


def measure_pruned_speed(arch: str, kept: float = 0.5, batch: int = 8, seq: int = 512, rounds: int = 5,
                         device: str = "cpu", dtype: str = "bfloat16", seed: int = 0) -> dict[str, Any]:
    """`pruned_speed` on a random-weight model of a named architecture (a fresh-process target)."""
    from eval.measure import mark_setup_done
    from eval.models import build_model_from_arch

    torch.manual_seed(seed)
    model = build_model_from_arch(arch, dtype=dtype, device=device)
    mark_setup_done()
    result = pruned_speed(model, kept=kept, batch=batch, seq=seq, rounds=rounds, seed=seed)
    result["arch"] = arch
    if model.device.type == "cuda":
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(model.device)
    return result
