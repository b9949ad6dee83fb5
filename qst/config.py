"""`QSTConfig`: every hyperparameter of a Quantized Side Tuning side network, validated once.

The side network (see `qst.layer`) reads the frozen backbone's hidden states h_0 .. h_N:

    g_0 = down_0(h_0)
    g_i = (1 - beta_i) * down_i(h_i) + beta_i * side_i(g_{i-1}),   beta_i = sigmoid(gamma_i)
    h   = alpha * h_N + (1 - alpha) * up(norm(g_N))          -> the backbone's frozen LM head

`output_mix` picks that last line. "paper" (above, the default): alpha starts at 1, so the
model's output equals the backbone's before the first step, but the side network's gradient is
scaled by (1 - alpha) = 0 until alpha moves; alpha therefore moves `alpha_lr` (100) times
faster than the learning rate (alpha = alpha_init + alpha_lr * offset, so any optimizer does
this), and may start lower (`alpha_init`). "additive": h = h_N + up(norm(g_N)) with
`up` zero-initialised, as LoRA starts its B at zero: the same exact start, and `up` gets a
gradient from the first step on. docs/RESULTS.md ("QST output mix") compares them.

`r` shrinks the width d of the backbone to d // r on the side path; `downsample` picks how each
h_i is brought down to that width (docs/METHODS.md §1, the paper's Table 6).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from eval.errors import UserInputError, require_positive, require_positive_number
from eval.tuning_methods import QST_ADAPTER_RANK, QST_REDUCTION

DOWNSAMPLERS = ("adapter", "lora", "linear", "maxpool", "avgpool")
POOLING_DOWNSAMPLERS = ("maxpool", "avgpool")
SIDE_INITS = ("random", "pruned")
OUTPUT_MIXES = ("additive", "paper")
# Saved configs from before `output_mix` / `alpha_lr` existed: the paper's mix, alpha at the side lr.
LEGACY_DEFAULTS = {"output_mix": "paper", "alpha_lr": 1.0, "side_head_dim": None}


@dataclasses.dataclass(frozen=True)
class QSTConfig:
    """Hyperparameters of the side network (frozen; validated on construction).

    - `r`: reduction factor; side width = hidden_size // r (must divide it for pooling).
    - `downsample`: `"adapter"` (d -> k, swish, k -> d/r, LayerNorm), `"lora"` (d -> k -> d/r),
      `"linear"` (d -> d/r), `"maxpool"` / `"avgpool"` (groups of r channels, no parameters).
    - `adapter_rank`: k of `adapter` and `lora`.
    - `gate_init`: starting gamma of the gates (beta = sigmoid(gamma); 0 -> 0.5).
    - `gate_per_channel`: one gamma per side channel (True) or one scalar per layer.
    - `output_mix`: `"additive"` (h_N + up(norm(g_N)), `up` zero-initialised) or `"paper"`
      (alpha * h_N + (1 - alpha) * up(norm(g_N)), alpha learned).
    - `alpha_init`: (paper mix) starting alpha; 1 starts training exactly at the backbone's output.
    - `alpha_lr`: (paper mix; the additive mix ignores it) alpha's speed as a multiple of the
      learning rate, built into its parametrisation (alpha = alpha_init + alpha_lr * offset, the
      offset a parameter starting at 0). 100 by default: at 1, alpha moves about one learning
      rate per step, so
      the side network, whose gradient is scaled by (1 - alpha), barely trains (docs/RESULTS.md,
      "QST output mix").
    - `dropout`: dropout on each downsampler's output.
    - `side_init`: `"random"`, or `"pruned"` (side blocks start from the backbone's blocks,
      structurally pruned by weight-norm importance, as LST did).
    - `side_layers`: backbone layer indices (0-based) whose outputs feed a side block; None = all.
    - `gradient_checkpointing`: recompute each side unit (downsampler, block and gate) in backward.
    - `rope_theta`: base of the rotary position embedding of the side attention.
    - `side_head_dim`: None keeps the backbone's head count in the side attention (head dim =
      width / heads: 4 wide at r = 16 on 64-wide heads); a number gives fewer, wider heads of that
      dim (width / side_head_dim heads; it must divide the side width). `side_init="pruned"`
      copies the backbone's heads, so it takes None only.
    """

    r: int = QST_REDUCTION  # the defaults eval.memory_estimate assumes too
    downsample: str = "adapter"
    adapter_rank: int = QST_ADAPTER_RANK
    gate_init: float = 0.0
    gate_per_channel: bool = True
    output_mix: str = "paper"
    alpha_init: float = 1.0
    alpha_lr: float = 100.0
    dropout: float = 0.0
    side_init: str = "random"
    side_layers: tuple[int, ...] | None = None
    gradient_checkpointing: bool = False
    rope_theta: float = 10000.0
    side_head_dim: int | None = None

    def __post_init__(self):
        def finite(name: str, value: Any) -> None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UserInputError(f"QSTConfig.{name} must be a finite number, got {value!r}")

        require_positive("QSTConfig.r", self.r)
        require_positive("QSTConfig.adapter_rank", self.adapter_rank)
        if self.downsample not in DOWNSAMPLERS:
            raise UserInputError(f"QSTConfig.downsample must be one of {DOWNSAMPLERS}, got {self.downsample!r}")
        if self.side_init not in SIDE_INITS:
            raise UserInputError(f"QSTConfig.side_init must be one of {SIDE_INITS}, got {self.side_init!r}")
        finite("gate_init", self.gate_init)
        if self.output_mix not in OUTPUT_MIXES:
            raise UserInputError(f"QSTConfig.output_mix must be one of {OUTPUT_MIXES}, got {self.output_mix!r}")
        finite("alpha_init", self.alpha_init)
        require_positive_number("QSTConfig.alpha_lr", self.alpha_lr)
        if self.output_mix != "paper" and self.alpha_init != 1.0:
            raise UserInputError(
                f"QSTConfig.alpha_init belongs to output_mix='paper'; the {self.output_mix!r} mix has no alpha "
                "(leave it at 1, or set output_mix='paper')"
            )
        require_positive_number("QSTConfig.rope_theta", self.rope_theta)
        if self.side_head_dim is not None:
            require_positive("QSTConfig.side_head_dim", self.side_head_dim)
            if self.side_init == "pruned":
                raise UserInputError("side_init='pruned' copies the backbone's attention heads, so it keeps their "
                                     f"count; side_head_dim={self.side_head_dim} needs side_init='random' (or "
                                     "side_head_dim=None)")
        finite("dropout", self.dropout)
        if not 0 <= self.dropout < 1:
            raise UserInputError(f"QSTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("gate_per_channel", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise UserInputError(f"QSTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.side_layers is not None:
            layers = self.side_layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise UserInputError(f"QSTConfig.side_layers must be None or a list of layer indices, got {layers!r}")
            layers = tuple(layers)
            if not layers or any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers):
                raise UserInputError(
                    f"QSTConfig.side_layers must be a non-empty list of non-negative layer indices, got {layers!r}"
                )
            if list(layers) != sorted(set(layers)):
                raise UserInputError(f"QSTConfig.side_layers must be increasing with no repeats, got {layers!r}")
            object.__setattr__(self, "side_layers", layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["side_layers"] = list(self.side_layers) if self.side_layers is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QSTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserInputError(f"unknown QSTConfig fields {unknown}; expected some of {sorted(known)}")
        return cls(**{**LEGACY_DEFAULTS, **d})
