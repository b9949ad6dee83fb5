"""DISP-LLM: dimension-independent structural pruning driven by a hypernetwork (docs/METHODS.md §2),
exported as a physically smaller model, plus the magnitude / wanda-sp / slicegpt baselines.

    from pruning import DispConfig, train_disp, prune_model, load_pruned
    result = train_disp(model, calibration_blocks, DispConfig(kept=0.5, steps=300))
    pruned = prune_model(model, result.plan)      # index_select / index_add on the residual
    pruned.save_pretrained("out/model")           # safetensors + config.json with the kept indices
    pruned = load_pruned("out/model")             # no trust_remote_code

Importing the package registers the saved model type (`slimtune_pruned`) with transformers, so
`AutoModelForCausalLM.from_pretrained("out/model")` returns the pruned model too.
"""

from eval.model_specs import register_spec_loader
from pruning.arch import LAYOUTS, MASK_NAMES, BlockLayout, layout_for, model_geometry
from pruning.baselines import (
    BASELINES,
    baseline_prune,
    magnitude_plan,
    slicegpt_prune,
    wanda_sp_plan,
)
from pruning.config import DispConfig
from pruning.hypernetwork import HyperNetwork, gumbel_sigmoid, hard_mask, reinmax_bernoulli
from pruning.masking import DispTrainingModel, budget_regulariser, kept_block_params, masks_applied
from pruning.model import (
    FAMILY,
    PrunedDecoderLayer,
    PruningPlan,
    block_params,
    load_pruned,
    prune_model,
    pruning_plan,
)
from pruning.trainer import (
    DispResult,
    deterministic_masks,
    disp_prune,
    recover_with_lora,
    train_disp,
)

FAMILY.register()  # AutoConfig knows "slimtune_pruned" from here on


def _load_spec(path, base=None, device="cpu"):
    import pruning  # through the package attribute, so a replaced load_pruned is the one used

    return pruning.load_pruned(path, device=device)


register_spec_loader("pruned", _load_spec, model_types=(FAMILY.model_type,))  # `pruned:DIR` in the commands

__all__ = [
    "BASELINES", "LAYOUTS", "MASK_NAMES", "BlockLayout", "DispConfig", "DispResult", "DispTrainingModel",
    "HyperNetwork", "PrunedDecoderLayer", "PruningPlan", "baseline_prune", "block_params", "budget_regulariser",
    "deterministic_masks", "disp_prune", "gumbel_sigmoid", "hard_mask", "kept_block_params", "layout_for",
    "load_pruned", "magnitude_plan", "masks_applied", "model_geometry", "prune_model", "pruning_plan",
    "recover_with_lora", "reinmax_bernoulli", "slicegpt_prune", "train_disp", "wanda_sp_plan",
]
