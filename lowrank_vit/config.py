"""`MixedRankConfig`: every choice the compressor makes, in one frozen, validated dataclass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eval.errors import UserInputError, require_positive

METHODS = ("aa-mixed", "aa-uniform", "asvd", "svd")
# Roles of the linear layers inside one transformer block (see `model.find_targets`).
ROLES = ("attn_qkv", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class MixedRankConfig:
    """How to compress the linear layers of a transformer.

    keep: fraction of the targeted layers' weight parameters kept, in (0, 1]
        (0.4 = "60 % fewer parameters"). Biases are unchanged and not counted.
    method:
        "aa-mixed"   activation-aware (whitened) truncation, ranks chosen per layer by a global
                     greedy under the budget, then sequential layer-wise error compensation
                     (the method of docs/METHODS.md §3): each layer, fed by the already compressed
                     model, is refit to the dense model's outputs in closed form (`refit`) and,
                     with compensate_steps > 0, a residual term is trained by Adam on top;
        "aa-uniform" whitened truncation, the same parameter fraction in every layer;
        "asvd"       SVD of W scaled by mean|x|^0.5 per input channel, uniform fraction;
        "svd"        plain truncated SVD of W, uniform fraction.
        The three baselines take no residual term and no compensation: all their budget goes
        to the principal term.
    residual_rank: rank of the compact residual term (a second low-rank pair, starting at
        zero) that gradient-descent compensation trains; its parameters count in the budget.
        Only reserved when there are training steps (aa-mixed with compensate_steps > 0).
    compensate_steps: Adam steps of layer-wise compensation per layer (0 = no gradient descent;
        the default, because at an equal budget the closed-form refit alone measured better:
        docs/RESULTS.md).
    compensate_factors: also train the principal factors during compensation (not only the
        residual term).
    refit: at the start of each layer's compensation, replace its principal factors by the exact
        rank-r least-squares map from the compressed model's inputs to the dense outputs (closed
        form: whitened truncation of the least-squares weight); the residual is trained after it.
    lr: Adam learning rate of compensation.
    calib_images: how many calibration samples (images, or token blocks for a causal LM)
        `compress` uses from the batches it is given.
    targets: which linear roles to compress: "attn_qkv" (query/key/value), "attn_out"
        (attention output), "mlp_in" (MLP up / gate), "mlp_out" (MLP down).
    min_rank: smallest rank any compressed layer gets.
    int8: after compression, store the low-rank factors as int8 (symmetric, one scale per row).
    seed: seeds the residual term's initialisation.
    """

    keep: float = 0.5
    method: str = "aa-mixed"
    residual_rank: int = 4
    compensate_steps: int = 0
    compensate_factors: bool = False
    refit: bool = True
    lr: float = 1e-3
    calib_images: int = 256
    targets: tuple[str, ...] = ROLES
    min_rank: int = 1
    int8: bool = False
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.targets, str | list):
            object.__setattr__(self, "targets", (self.targets,) if isinstance(self.targets, str) else tuple(self.targets))
        if not isinstance(self.keep, int | float) or not 0.0 < float(self.keep) <= 1.0:
            raise UserInputError(f"keep must be a fraction in (0, 1] (0.4 keeps 40 % of the targeted parameters); "
                                 f"got {self.keep!r}", field="keep")
        if self.method not in METHODS:
            raise UserInputError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}", field="method")
        for name in ("residual_rank", "compensate_steps"):
            require_positive(name, getattr(self, name), minimum=0)
        for name in ("calib_images", "min_rank"):
            require_positive(name, getattr(self, name))
        if not self.lr > 0:
            raise UserInputError(f"lr must be > 0; got {self.lr!r}", field="lr")
        if not self.targets:
            raise UserInputError(f"targets must name at least one of {', '.join(ROLES)}", field="targets")
        unknown = [t for t in self.targets if t not in ROLES]
        if unknown:
            raise UserInputError(f"targets names unknown role(s) {unknown}; expected some of {', '.join(ROLES)}",
                                 field="targets")

    @property
    def compensates(self) -> bool:
        """True when this config runs layer-wise error compensation (and reserves the residual)."""
        return self.method == "aa-mixed" and (self.compensate_steps > 0 or self.refit)

    @property
    def effective_residual_rank(self) -> int:
        """The residual term exists only when there are training steps to fit it."""
        return self.residual_rank if self.method == "aa-mixed" and self.compensate_steps > 0 else 0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MixedRankConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserInputError(f"unknown MixedRankConfig field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**{**d, "targets": tuple(d.get("targets", ROLES))})
