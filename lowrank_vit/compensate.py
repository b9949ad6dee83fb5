"""Sequential layer-wise error compensation.

Layers are visited in forward order. Layer ℓ is fed with the inputs the *already compressed*
model produces (every earlier layer is compressed and compensated), and its target is the
*dense* model's output at ℓ. Fitting ‖layer(X_compressed) − Y_dense‖² lets each layer absorb
the error that earlier layers pushed into its inputs, instead of only matching its own weight.

Two ways to fit, used in this order:
1. `refit_principal` (default on): the exact minimiser over rank-r weights, in closed form.
2. Adam on the residual term (and optionally the factors), `steps` > 0. Since step 1 already
   reaches the optimum of this objective at rank r, gradient descent can only add what the
   residual's extra rank brings, and that rank is paid from the same budget; measured on
   ref-vit it did worse than giving those parameters to the principal term, so it is off by
   default and kept as an option (docs/RESULTS.md).

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

from eval.calibration import capture
from lowrank_vit.decompose import cholesky_with_jitter
from lowrank_vit.layer import LowRankLinear

MAX_TOKENS_PER_STEP = 4096
REFIT_RIDGE = 1e-4  # × mean diag(XᵀX); see refit_principal


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


@torch.no_grad()
def refit_principal(layer: LowRankLinear, x: torch.Tensor, y: torch.Tensor, ridge: float | None = None) -> None:
    """Replace the principal factors by the exact rank-r least-squares fit of x -> y.

    With T = y − bias − residual(x) [N, out] and XᵀX = L·Lᵀ (x the compressed model's inputs),
    min over rank-r W′ of ‖x·W′ᵀ − T‖² = const + ‖(W′ − W_ls)·L‖², W_ls the unconstrained
    least-squares solution; so the optimum is the rank-r SVD truncation of
    W_ls·L = (Tᵀx)·L⁻ᵀ, unwhitened by L⁻¹ (the same whitened truncation as `decompose`, applied
    to the weight that best maps the *compressed* inputs to the *dense* outputs).

    A small ridge (`ridge` × mean diagonal of XᵀX, default REFIT_RIDGE) is added: without it the
    least-squares weight puts huge entries on near-null input directions (noise that happens to
    correlate with the target). Harmless in float, but it wrecks int8 (ref-vit at keep 0.4:
    top-1 98.3 % → 16.7 % with int8 factors, back to 98.3 % with ridge 1e-4, float unchanged).
    """
    xd = x.double()
    target = y.double()
    if layer.bias is not None:
        target = target - layer.bias.double()
    if layer.residual_rank:
        target = target - (xd @ layer.residual_down.double().T) @ layer.residual_up.double().T
    xtx = xd.T @ xd
    ridge = REFIT_RIDGE if ridge is None else ridge
    if ridge:
        xtx = xtx + ridge * xtx.diagonal().mean() * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    L, _ = cholesky_with_jitter(xtx)
    m = torch.linalg.solve_triangular(L.T, target.T @ xd, upper=True, left=False)  # (Tᵀx)·L⁻ᵀ [out, in]
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    r = layer.rank
    root = s[:r].sqrt()
    down = torch.linalg.solve_triangular(L, root[:, None] * vt[:r], upper=False, left=False)  # √Σ Vᵀ L⁻¹
    layer.up.copy_(u[:, :r] * root)
    layer.down.copy_(down)


def compensate_layer(
    layer: LowRankLinear,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    train_factors: bool = False,
    seed: int = 0,
    refit: bool = False,
) -> CompensationResult:
    """Fit `layer` to map x [N, in] to y [N, out]: optionally refit the principal factors in
    closed form, then train the residual (and optionally the factors) with Adam (mean squared error)."""
    dtype = layer.residual_up.dtype
    layer.float()  # fit in float32 whatever the model's dtype
    x, y = x.float(), y.float()
    before = relative_error(layer, x, y)
    saved = copy.deepcopy(layer.state_dict())
    if refit and not layer.is_int8:
        refit_principal(layer, x, y)
    params = [layer.residual_down, layer.residual_up]
    if train_factors and not layer.is_int8:
        params += [layer.down, layer.up]
    trainable = [p for p in params if p.numel()]
    if not trainable or steps == 0:
        after = relative_error(layer, x, y)
        if after > before:
            layer.load_state_dict(saved)
        layer.to(dtype)
        return CompensationResult(before, min(before, after), after > before)
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
    refit: bool = False,
) -> dict[str, CompensationResult]:
    """Compensate the `LowRankLinear` layers among `names` (in forward order) one after another."""
    results = {}
    for i, name in enumerate(tqdm(names, desc="compensate", disable=not progress, leave=False)):
        layer = model.get_submodule(name)
        if not isinstance(layer, LowRankLinear):
            continue  # stayed dense
        x = capture(model, layer, batches, "input")  # [N, in] from the compressed model
        y = capture(dense_model, dense_model.get_submodule(name), batches, "output")  # [N, out] dense target
        results[name] = compensate_layer(layer, x, y, steps, lr, train_factors, seed + i, refit)
    return results
