"""Truncated decompositions of one weight W [out, in], with inputs X [N, in] (rows are tokens).

All three are "SVD of W·T, truncate, undo T":
    whitened  T = L, the Cholesky factor of XᵀX = L·Lᵀ (SVD-LLM). The layer's output error is
              ‖X(W − W′)ᵀ‖_F² = tr((W − W′) XᵀX (W − W′)ᵀ) = ‖(W − W′)L‖_F², so truncating the SVD
              of W·L = U Σ Vᵀ at rank r gives error = Σ_{i>r} σᵢ²: the exact optimum at rank r
              (Eckart–Young in the whitened space).
    asvd      T = diag(mean|x|^0.5) (ASVD's activation-aware channel scaling).
    svd       T = I (plain truncated SVD; ignores the activations).
Factors at rank r: up = U_r √Σ_r [out, r], down = √Σ_r V_rᵀ T⁻¹ [r, in] (√Σ on both sides keeps the
two factors' ranges balanced, which matters for int8).
Everything in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eval.calibration import InputStats


@dataclass
class Decomposition:
    u: torch.Tensor  # [out, k]
    s: torch.Tensor  # [k], descending
    vt: torch.Tensor  # [k, in], rows already mapped back through T⁻¹ (vt = Vᵀ T⁻¹)
    jitter: float = 0.0  # added to XᵀX's diagonal (whitened only) when it was not positive definite

    @property
    def max_rank(self) -> int:
        return self.s.shape[0]

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(up [out, rank], down [rank, in]) whose product is the rank-`rank` truncation."""
        root = self.s[:rank].sqrt()
        return self.u[:, :rank] * root, root[:, None] * self.vt[:rank]

    def normalized_gains(self) -> torch.Tensor:
        """σᵢ² / Σσ²: for the whitened kind, each singular value's share of ‖XWᵀ‖²."""
        energy = self.s.square()
        return energy / energy.sum().clamp_min(1e-300)


def cholesky_with_jitter(xtx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Lower-triangular L with L·Lᵀ = XᵀX + jitter·I; jitter is 0 unless XᵀX is not positive definite.

    The jitter grows from 1e-10 to 1e-1 times the mean diagonal until the factorisation succeeds.
    """
    L, info = torch.linalg.cholesky_ex(xtx)
    if int(info) == 0:
        return L, 0.0
    scale = float(xtx.diagonal().mean()) or 1.0
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    for exponent in range(-10, 0):
        jitter = scale * 10.0**exponent
        L, info = torch.linalg.cholesky_ex(xtx + jitter * eye)
        if int(info) == 0:
            return L, jitter
    raise RuntimeError("XᵀX stayed singular after adding 0.1 × its mean diagonal; the calibration inputs are degenerate")


def whitened_svd(weight: torch.Tensor, xtx: torch.Tensor) -> Decomposition:
    """Activation-aware truncation basis: SVD of W·L with L·Lᵀ = XᵀX."""
    w = weight.detach().to(torch.float64)
    L, jitter = cholesky_with_jitter(xtx.to(w.device, torch.float64))
    u, s, vt = torch.linalg.svd(w @ L, full_matrices=False)
    # Vᵀ L⁻¹ without inverting L: solve Z·L = Vᵀ for Z.
    vt = torch.linalg.solve_triangular(L, vt, upper=False, left=False)
    return Decomposition(u, s, vt, jitter)


def asvd(weight: torch.Tensor, abs_mean: torch.Tensor, alpha: float = 0.5) -> Decomposition:
    """ASVD: scale input channels by mean|x|^alpha, SVD, unscale."""
    w = weight.detach().to(torch.float64)
    scale = abs_mean.to(w.device, torch.float64).pow(alpha)
    scale = scale.clamp_min(scale.max().clamp_min(1e-12) * 1e-6)  # dead channels: avoid dividing by 0
    u, s, vt = torch.linalg.svd(w * scale, full_matrices=False)
    return Decomposition(u, s, vt / scale)


def plain_svd(weight: torch.Tensor) -> Decomposition:
    u, s, vt = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    return Decomposition(u, s, vt)


def decompose(method: str, weight: torch.Tensor, stats: InputStats) -> Decomposition:
    """The decomposition a compression method uses for one layer."""
    if method in ("aa-mixed", "aa-uniform"):
        return whitened_svd(weight, stats.xtx)
    if method == "asvd":
        return asvd(weight, stats.abs_mean)
    if method == "svd":
        return plain_svd(weight)
    raise ValueError(f"unknown method {method!r}")


def output_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """Relative calibration output error ‖X(W − W′)ᵀ‖² / ‖XWᵀ‖², from XᵀX (no activations kept)."""
    w = weight.to(torch.float64)
    delta = w - approx.to(torch.float64)
    num = torch.einsum("oi,ij,oj->", delta, xtx, delta)
    den = torch.einsum("oi,ij,oj->", w, xtx, w)
    return float(num / den.clamp_min(1e-300))
