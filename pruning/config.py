"""`DispConfig`: every knob of a DISP-LLM pruning run, validated once on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from eval.errors import UserInputError, require_positive

ESTIMATORS = ("reinmax", "gumbel")


@dataclass(frozen=True)
class DispConfig:
    """How to prune with DISP-LLM (docs/METHODS.md §2).

    kept: fraction of the attention + MLP weight parameters that the pruned model keeps, in (0, 1].
    lam: weight λ of the two-sided log-ratio parameter regulariser (the paper's experiments: 6; chosen
        on ref-lm v2's validation split against 16 at 30 % and 50 % removed, docs/results/disp.md).
    steps: hypernetwork training steps. lr / weight_decay: AdamW on the hypernetwork.
    z_dim: size of each fixed random input vector (one per mask, 5 × layers of them).
    gru_hidden: hidden size of each direction of the bidirectional GRU (its outputs are 2× this).
    tau: temperature of the relaxed Bernoulli (Gumbel-sigmoid) or of ReinMax's π1 term.
    offset: added to every mask logit, so that training starts with (almost) every channel kept.
    estimator: "reinmax" (the paper) or "gumbel" (the reference code's Gumbel-sigmoid).
    seed: seeds the hypernetwork's initialisation, its fixed input and its sampling noise.
    """

    kept: float = 0.5
    lam: float = 6.0
    steps: int = 10_000
    lr: float = 1e-3
    weight_decay: float = 0.05
    z_dim: int = 32
    gru_hidden: int = 64
    tau: float = 0.4
    offset: float = 3.0
    estimator: str = "reinmax"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.kept <= 1.0:
            raise UserInputError(f"kept must be a fraction in (0, 1] of the block parameters to keep; got {self.kept}",
                                 field="kept")
        if self.lam < 0:
            raise UserInputError(f"lam (the regulariser weight) must be >= 0; got {self.lam}", field="lam")
        for name in ("steps", "z_dim", "gru_hidden"):
            require_positive(name, getattr(self, name))
        if self.lr <= 0:
            raise UserInputError(f"lr must be > 0; got {self.lr}", field="lr")
        if self.weight_decay < 0:
            raise UserInputError(f"weight_decay must be >= 0; got {self.weight_decay}", field="weight_decay")
        if self.tau <= 0:
            raise UserInputError(f"tau (temperature) must be > 0; got {self.tau}", field="tau")
        if self.estimator not in ESTIMATORS:
            raise UserInputError(f"estimator must be one of {', '.join(ESTIMATORS)}; got {self.estimator!r}",
                                 field="estimator")

    def to_dict(self) -> dict:
        return asdict(self)
