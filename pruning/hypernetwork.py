"""The DISP hypernetwork and the straight-through estimators that turn its logits into masks.

Hypernetwork (docs/METHODS.md §2): a fixed random input, one `z_dim` vector per mask (5 per layer, in
layer order attn_in, attn_out, mlp_in, mlp_mid, mlp_out) → bidirectional GRU (hidden `gru_hidden`
per direction) → per-step LayerNorm(2·gru_hidden) + GELU → one Linear(2·gru_hidden → width) per
mask. Its outputs plus `offset` are the mask logits ℓ; P(keep channel) grows with ℓ.

Estimators (forward value: a hard 0/1 mask; backward: a surrogate gradient):
- `reinmax_bernoulli`: ReinMax (Liu et al., 2023, "Bridging Discrete and Backpropagation:
  Straight-Through and Beyond"), Algorithm 2, for a two-class categorical with logits (ℓ, 0):
      π0 = σ(ℓ);  D ~ Bernoulli(π0)
      π1 = (D + σ(ℓ/τ)) / 2, carried with the gradient of the softmax at π1: dπ1/dℓ = π1(1 − π1)
      π2 = 2·π1 − π0/2
      mask = D + π2 − stopgrad(π2)
  so d mask/dℓ = 2·π1(1 − π1) − ½·π0(1 − π0) (Heun's second-order step instead of ST's Euler).
  The "keep" component of the categorical is all a binary mask needs; the drop component is 1 − it.
- `gumbel_sigmoid`: the reference code's estimator: soft = σ((ℓ + g)/τ) with logistic noise
  g = log u − log(1 − u); mask = 1[soft > 0.5] + soft − stopgrad(soft).

Deterministic export (`hard_mask`): keep iff ℓ > 0, i.e. the mode of ReinMax's Bernoulli(σ(ℓ))
and the median of the Gumbel-sigmoid (its noise is symmetric about 0): no noise, same rule for
both estimators, and the rule training converges to as |ℓ| grows.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruning.arch import MASK_NAMES


def reinmax_bernoulli(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 sample of Bernoulli(σ(logits)) with ReinMax's second-order gradient."""
    pi0 = torch.sigmoid(logits)
    sample = (torch.rand(logits.shape, generator=generator, device=logits.device) < pi0.detach()).to(logits.dtype)
    p1 = ((sample + torch.sigmoid(logits / tau)) / 2).detach()
    # value p1, gradient p1(1 − p1): the softmax re-parametrisation softmax(stopgrad(ln π1 − θ) + θ)
    # of the paper, written without the log (which is −inf where p1 underflows to 0).
    pi1 = p1 + p1 * (1 - p1) * (logits - logits.detach())
    pi2 = 2 * pi1 - pi0 / 2
    return sample + (pi2 - pi2.detach())  # exactly 0 or 1 forward


def gumbel_sigmoid(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hard 0/1 mask from a Gumbel-sigmoid relaxation, straight-through (the reference code)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(logits.dtype)
    return hard + (soft - soft.detach())


ESTIMATOR_FUNCTIONS = {"reinmax": reinmax_bernoulli, "gumbel": gumbel_sigmoid}


def hard_mask(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Deterministic export mask: keep iff logit > threshold (0 unless the budget fit moved it)."""
    return (logits > threshold).to(torch.float32)


class HyperNetwork(nn.Module):
    """Emits the logits of all 5·L masks from a fixed random input (nothing about the data)."""

    def __init__(self, widths: list[dict[str, int]], z_dim: int = 32, gru_hidden: int = 64,
                 offset: float = 3.0, seed: int = 0):
        super().__init__()
        self.widths = [dict(w) for w in widths]  # per layer: mask name -> channels
        self.offset = offset
        n_masks = len(MASK_NAMES) * len(widths)
        g = torch.Generator().manual_seed(seed)
        # Fixed input, saved with the module but never trained: [1, 5L, z_dim].
        self.register_buffer("z", torch.randn(1, n_masks, z_dim, generator=g))
        self.gru = nn.GRU(z_dim, gru_hidden, batch_first=True, bidirectional=True)
        self.norm = nn.LayerNorm(2 * gru_hidden)
        self.act = nn.GELU()
        self.heads = nn.ModuleList(
            nn.Linear(2 * gru_hidden, layer[name]) for layer in self.widths for name in MASK_NAMES
        )

    def forward(self) -> list[dict[str, torch.Tensor]]:
        """Mask logits (offset included): per layer, mask name -> [width]."""
        h, _ = self.gru(self.z)  # [1, 5L, 2·gru_hidden]
        h = self.act(self.norm(h))[0]  # [5L, 2·gru_hidden]
        flat = [head(h[i]) + self.offset for i, head in enumerate(self.heads)]
        k = len(MASK_NAMES)
        return [dict(zip(MASK_NAMES, flat[i * k:(i + 1) * k])) for i in range(len(self.widths))]

    def save(self, path) -> None:
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(path))

    def load(self, path) -> None:
        self.load_state_dict(load_file(str(path)))


def sample_masks(logits: list[dict[str, torch.Tensor]], estimator: str, tau: float,
                 generator: torch.Generator | None = None) -> list[dict[str, torch.Tensor]]:
    """Straight-through hard masks for training (noise drawn from `generator`)."""
    fn = ESTIMATOR_FUNCTIONS[estimator]
    return [{name: fn(lg, tau, generator) for name, lg in layer.items()} for layer in logits]
