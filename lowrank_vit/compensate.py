"""Sequential layer-wise error compensation.

Layers are visited in forward order. Layer ℓ is fed with the inputs the *already compressed*
model produces (every earlier layer is compressed and compensated), and its target is the
*dense* model's output at ℓ. Training the residual term (and optionally the factors) on
‖layer(X_compressed) − Y_dense‖² lets each layer absorb the error that earlier layers pushed
into its inputs, instead of only matching its own weight.

Why a plain loop and not `eval.train.train`: each fit here is a small full-data regression on
cached tensors (no batches of model inputs, no `.loss` output), run dozens of times in a row; it
needs the error before and after and must revert a fit that made the layer worse. The shared
loop's checkpointing, schedules and per-run progress bar are built for whole-model training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lowrank_vit.calibration import capture
from lowrank_vit.layer import LowRankLinear

MAX_TOKENS_PER_STEP = 8192


@dataclass
class CompensationResult:
    error_before: float  # ‖layer(X) − Y‖² / ‖Y‖² on the calibration tokens
    error_after: float
    reverted: bool  # training did not help and the layer was put back


@torch.no_grad()
def relative_error(layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 16384) -> float:
    num = den = 0.0
    for i in range(0, x.shape[0], chunk):
        yi = y[i : i + chunk]
        num += float((layer(x[i : i + chunk]) - yi).double().square().sum())
        den += float(yi.double().square().sum())
    return num / max(den, 1e-300)


def compensate_layer(
    layer: LowRankLinear,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    train_factors: bool = False,
    seed: int = 0,
) -> CompensationResult:
    """Fit `layer` to map x [N, in] to y [N, out] with Adam (mean squared error)."""
    dtype = layer.residual_up.dtype
    layer.float()  # fit in float32 whatever the model's dtype
    x, y = x.float(), y.float()
    before = relative_error(layer, x, y)
    saved = copy.deepcopy(layer.state_dict())
    params = [layer.residual_down, layer.residual_up]
    if train_factors and not layer.is_int8:
        params += [layer.down, layer.up]
    trainable = [p for p in params if p.numel()]
    if not trainable or steps == 0:
        layer.to(dtype)
        return CompensationResult(before, before, False)
    flags = {id(p): p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(any(p is t for t in trainable))
    optimizer = torch.optim.Adam(trainable, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    scale = y.square().mean().clamp_min(1e-12)  # loss in units of the target's energy
    with torch.enable_grad():
        for _ in range(steps):
            if x.shape[0] > MAX_TOKENS_PER_STEP:
                rows = torch.randint(0, x.shape[0], (MAX_TOKENS_PER_STEP,), generator=generator).to(x.device)
                xb, yb = x[rows], y[rows]
            else:
                xb, yb = x, y
            loss = (layer(xb) - yb).square().mean() / scale
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    for p in layer.parameters():
        p.requires_grad_(flags[id(p)])
    after = relative_error(layer, x, y)
    reverted = after > before
    if reverted:
        layer.load_state_dict(saved)
        after = before
    layer.to(dtype)
    return CompensationResult(before, after, reverted)


def compensate_sequential(
    model: torch.nn.Module,
    dense_model: torch.nn.Module,
    names: list[str],
    batches: list,
    steps: int,
    lr: float,
    train_factors: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, CompensationResult]:
    """Compensate the `LowRankLinear` layers among `names` (in forward order) one after another."""
    results = {}
    for i, name in enumerate(tqdm(names, desc="compensate", disable=not progress, leave=False)):
        layer = model.get_submodule(name)
        if not isinstance(layer, LowRankLinear):
            continue  # stayed dense
        x = capture(model, layer, batches, "input")  # [N, in] from the compressed model
        y = capture(dense_model, dense_model.get_submodule(name), batches, "output")  # [N, out] dense target
        results[name] = compensate_layer(layer, x, y, steps, lr, train_factors, seed + i)
    return results
