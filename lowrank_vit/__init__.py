"""Activation-aware mixed-rank compression of vision transformers (and causal-LM linears).

    from lowrank_vit import MixedRankConfig, compress, save_pretrained, load_compressed
    report = compress(model, calib_batches, MixedRankConfig(keep=0.4))   # in place
    model.save_pretrained("out/model")      # compress() made it a `slimtune_lowrank` model
    model = AutoModelForImageClassification.from_pretrained("out/model")   # or load_compressed

Importing the package registers the saved model type (`slimtune_lowrank`) with transformers'
Auto classes (causal LMs and image classifiers alike); no trust_remote_code.

Pieces: `eval.calibration` (XᵀX per layer, float64, hooks) → `decompose` (whitened / ASVD / plain SVD)
→ `allocate` (global greedy ranks under the budget) → `LowRankLinear` → `compensate`
(sequential layer-wise error compensation) → optional `quantize` (int8 factors).
"""

from eval.model_specs import register_spec_loader
from lowrank_vit.config import METHODS, ROLES, MixedRankConfig
from lowrank_vit.layer import LowRankLinear
from lowrank_vit.model import (
    FAMILY,
    compress,
    count_weights,
    find_targets,
    load_compressed,
    save_pretrained,
)

__all__ = ["METHODS", "ROLES", "MixedRankConfig", "LowRankLinear", "compress", "count_weights", "find_targets", "load_compressed", "save_pretrained"]

FAMILY.register()  # AutoConfig knows "slimtune_lowrank" from here on


def _load_spec(path, base=None, device="cpu"):
    import lowrank_vit  # through the package attribute, so a replaced load_compressed is the one used
    from eval.model_specs import check_causal_lm

    model = lowrank_vit.load_compressed(path, device=device)
    check_causal_lm(model, path)  # the commands that take specs score language models
    return model


register_spec_loader("lowrank", _load_spec, model_types=(FAMILY.model_type,))  # `lowrank:DIR` in the commands
