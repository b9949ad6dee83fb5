"""The tuning methods `slimtune bench` compares, their default recipes, and QST's downsampler size.

One table that the code building the methods (`qst.baselines`, `qst.config`, `qst.layer`) and the
analytic memory estimate (`eval.memory_estimate`) both read, so the estimate always describes
what bench trains. It lives in `eval` because `eval` never imports the method packages.
"""

from __future__ import annotations

METHODS = ("full", "lora", "qlora", "qlora-gc", "lst", "qst", "adapter", "prefix", "prompt", "bitfit")
DEFAULT_METHODS = ("full", "lora", "qlora", "qst")
QUANTIZED_METHODS = ("qlora", "qlora-gc", "qst")  # trained on a 4-bit NF4 backbone
LORA_METHODS = ("lora", "qlora", "qlora-gc")  # the same LoRA adapters (qlora-gc: QLoRA's gradient checkpointing)
# Methods that recompute each decoder layer's activations in backward instead of keeping them.
CHECKPOINTING_METHODS = ("qlora-gc",)
SIDE_TUNING_METHODS = ("qst", "lst")  # QST's side network; lst is the same on an unquantized backbone

LORA_RANK = 16  # the common LoRA recipe (rank 16, alpha 32)
# QST (docs/METHODS.md §1): reduction factor r (side width = d / r) and the rank k of the
# adapter downsampler.
QST_REDUCTION = 16
QST_ADAPTER_RANK = 16

# `slimtune bench --protocol`: the learning rates tried per method when --lrs is not given
# (ascending; a factor of about 3 apart around each method's usual range: full fine-tuning
# lowest, adapters higher, QST's small side network trained from scratch highest). QLoRA's grid
# starts at 1e-3: on def-kind's validation split 3e-4 was far behind and 3e-3, the top of the first
# grid, was chosen (docs/results/protocol.md), so the grid moved up one step.
PROTOCOL_LRS = {
    "full": (1e-4, 3e-4, 1e-3),
    "lora": (3e-4, 1e-3, 3e-3),
    "qlora": (1e-3, 3e-3, 1e-2),
    "qlora-gc": (1e-3, 3e-3, 1e-2),
    "lst": (1e-3, 3e-3, 1e-2),
    "qst": (1e-3, 3e-3, 1e-2),
    "adapter": (3e-4, 1e-3, 3e-3),
    "prefix": (1e-3, 3e-3, 1e-2),
    "prompt": (1e-3, 3e-3, 1e-2),
    "bitfit": (1e-3, 3e-3, 1e-2),
}


def downsampler_parameter_count(kind: str, d: int, width: int, rank: int) -> int:
    """Parameters of one QST downsampler d -> width (the formula the tests check `qst.layer`'s
    modules against): "adapter" is d -> k with bias, swish, k -> width with bias, LayerNorm."""
    return {
        "linear": d * width,
        "lora": rank * (d + width),
        "adapter": (d * rank + rank) + (rank * width + width) + 2 * width,
        "maxpool": 0,
        "avgpool": 0,
    }[kind]
