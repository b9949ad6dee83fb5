"""DISP end to end: train the hypernetwork on calibration blocks, export deterministic masks,
optionally recover with LoRA. Training goes through the shared loop (`eval.train.train`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from pruning.arch import MASK_NAMES, LayerGeometry, decoder_layers, layout_for
from pruning.config import DispConfig
from pruning.hypernetwork import HyperNetwork, hard_mask
from pruning.masking import DispTrainingModel, kept_block_params
from pruning.model import PruningPlan, prune_model


def calibration_batches(blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token blocks [n, T] -> a list of {"input_ids": [B, T]} (the LM predicts its own next tokens)."""
    return [{"input_ids": blocks[i:i + batch_size]} for i in range(0, blocks.shape[0], batch_size)]


def _nonempty(mask: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    if mask.sum() == 0:  # a block must read and write at least one dimension to exist at all
        mask = mask.clone()
        mask[logits.argmax()] = 1.0
    return mask


def masks_at_threshold(logits: list[dict[str, torch.Tensor]], threshold: float) -> list[dict[str, torch.Tensor]]:
    return [{m: _nonempty(hard_mask(layer[m], threshold), layer[m]) for m in MASK_NAMES} for layer in logits]


def deterministic_masks(logits: list[dict[str, torch.Tensor]], geometry: list[LayerGeometry], kept: float,
                        tolerance: float = 0.01) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Noise-free export masks: keep iff logit > 0; returns (masks, threshold used).

    Training steers the *sampled* masks' parameter count to the target; the noise-free mode can
    land off it while some logits are still near 0. Only then (ratio off `kept` by more than
    `tolerance`·kept) one global threshold on all logits is moved, by bisection over the logit
    values, to the value whose kept ratio is closest to `kept` (recorded in the plan's info).
    """
    logits = [{m: lg.detach().float().cpu() for m, lg in layer.items()} for layer in logits]
    dense = sum(g.dense_block_params() for g in geometry)

    def ratio(t: float) -> float:
        return float(kept_block_params(geometry, masks_at_threshold(logits, t))) / dense

    if abs(ratio(0.0) - kept) <= tolerance * kept:
        return masks_at_threshold(logits, 0.0), 0.0
    values = torch.cat([lg for layer in logits for lg in layer.values()]).unique().sort().values
    candidates = [float(values[0]) - 1.0] + values.tolist()  # threshold c keeps logits > c
    lo, hi = 0, len(candidates) - 1  # ratio decreases with the index; find the first index at or under kept
    while lo < hi:
        mid = (lo + hi) // 2
        if ratio(candidates[mid]) <= kept:
            hi = mid
        else:
            lo = mid + 1
    best = min({lo, max(lo - 1, 0)}, key=lambda i: abs(ratio(candidates[i]) - kept))
    return masks_at_threshold(logits, candidates[best]), candidates[best]


@dataclass
class DispResult:
    """What `train_disp` produced: the plan, the trained hypernetwork and its training curves."""

    plan: PruningPlan
    hypernet: HyperNetwork
    losses: list[float] = field(default_factory=list)
    ce: list[float] = field(default_factory=list)
    kept_ratio: list[float] = field(default_factory=list)
    train_time_s: float = 0.0
    export_kept_ratio: float = 0.0


def train_disp(model: nn.Module, blocks: torch.Tensor, config: DispConfig, batch_size: int = 4,
               out_dir=None, desc: str = "disp hypernetwork") -> DispResult:
    """Train the DISP hypernetwork on `blocks` [n, T] against the frozen `model`; export a plan."""
    from eval.train import TrainConfig, train

    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    trainer_model = DispTrainingModel(model, config)
    trainer_model.to(model.device)
    history: dict[str, list[float]] = {"ce": [], "kept_ratio": []}

    def loss_fn(m, batch):
        out = m(**batch)
        history["ce"].append(float(out.ce))
        history["kept_ratio"].append(float(out.kept_ratio))
        return out.loss

    train_config = TrainConfig(max_steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                               warmup_ratio=0.0, schedule="constant", seed=config.seed,
                               checkpoint_every=max(50, config.steps // 10) if out_dir else None,
                               mixed_precision="no")
    start = time.perf_counter()
    try:
        result = train(trainer_model, calibration_batches(blocks, batch_size), train_config, loss_fn=loss_fn,
                       out_dir=out_dir, desc=desc)
    finally:
        trainer_model.remove_hooks()
    train_time = time.perf_counter() - start
    for name, p in model.named_parameters():  # hand the model back as it came: frozen only during training
        p.requires_grad_(trainable[name])

    with torch.no_grad():
        logits = trainer_model.hypernet()
    geometry = trainer_model.geometry
    masks, threshold = deterministic_masks(logits, geometry, config.kept)
    ratio = float(kept_block_params(geometry, masks)) / trainer_model.dense_params
    plan = PruningPlan.from_masks("disp", masks, info={"export_threshold": threshold, "estimator": config.estimator,
                                                      "steps": config.steps})
    return DispResult(plan=plan, hypernet=trainer_model.hypernet, losses=result.losses, ce=history["ce"],
                      kept_ratio=history["kept_ratio"], train_time_s=train_time, export_kept_ratio=ratio)


def disp_prune(model: nn.Module, blocks: torch.Tensor, config: DispConfig, batch_size: int = 4,
               out_dir=None) -> tuple[nn.Module, DispResult]:
    """Train DISP on `blocks` and return (the exported pruned model, the training result)."""
    result = train_disp(model, blocks, config, batch_size=batch_size, out_dir=out_dir)
    return prune_model(model, result.plan), result


def lora_target_modules(model: nn.Module) -> list[str]:
    """Names (last path component) of the attention and MLP linears, for PEFT's target_modules."""
    layout = layout_for(model.config)
    return sorted({p.rpartition(".")[2] for p in (*layout.attn_in, layout.attn_out, *layout.mlp_in, layout.mlp_out)})


def recover_with_lora(model: nn.Module, blocks: torch.Tensor, steps: int, lr: float = 2e-4, rank: int = 8,
                      batch_size: int = 4, seed: int = 0, desc: str = "lora recovery",
                      batches: list[dict] | None = None) -> nn.Module:
    """Recovery fine-tuning (the paper's follow-up): LoRA on every attention/MLP linear of the pruned
    model, trained with the shared loop on LM loss, then merged back (same shapes, same config).
    `batches` (input_ids / attention_mask / labels, e.g. a task's `eval.tasks.lm_batches`) replace
    the calibration `blocks` as the training data."""
    from peft import LoraConfig, get_peft_model

    from eval.train import TrainConfig, train

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules=lora_target_modules(model)))
    if batches is None:
        batches = [{"input_ids": b["input_ids"], "labels": b["input_ids"]}
                   for b in calibration_batches(blocks, batch_size)]
    train(peft_model, batches, TrainConfig(max_steps=steps, lr=lr, warmup_ratio=0.05, schedule="cosine", seed=seed),
          desc=desc)
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def kept_widths(model: nn.Module) -> list[dict[str, int]]:
    """Per layer, the width each selection keeps, read from a pruned (or dense) model's weights."""
    layout = layout_for(model.config)
    out = []
    for layer in decoder_layers(model, layout):
        out.append({
            "attn_in": layer.get_submodule(layout.attn_in[0]).in_features,
            "attn_out": layer.get_submodule(layout.attn_out).out_features,
            "mlp_in": layer.get_submodule(layout.mlp_in[0]).in_features,
            "mlp_mid": layer.get_submodule(layout.mlp_out).in_features,
            "mlp_out": layer.get_submodule(layout.mlp_out).out_features,
        })
    return out

