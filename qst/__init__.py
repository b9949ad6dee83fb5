"""Quantized Side Tuning (QST): a small trainable side network on a frozen 4-bit LM.

    from qst import QSTConfig, QSTForCausalLM
    model = QSTForCausalLM.from_base("ref-lm", QSTConfig(r=16, downsample="adapter"))

See `qst.config` for the hyperparameters, `qst.layer` for the side network, `qst.model` for the
wrappers (save / load), `qst.generation` for `generate`, `qst.trainer` for transformers' `Trainer`, `qst.backbone` and `qst.side_init` for
reading the backbone and starting the side network from it, and `qst.cache` for the on-disk
backbone feature cache.

Public names are imported on first use, so that `import qst` (done by the CLI to list its
options) does not load torch and transformers.
"""

from __future__ import annotations

import importlib

from eval.model_specs import register_spec_loader

_EXPORTS = {
    "BackboneFeatureCache": "qst.cache",
    "BackboneFeatures": "qst.cache",
    "DOWNSAMPLERS": "qst.config",
    "SIDE_INITS": "qst.config",
    "QSTConfig": "qst.config",
    "SideBlockSpec": "qst.layer",
    "SideNetwork": "qst.layer",
    "downsampler_parameter_count": "eval.tuning_methods",  # shared with eval.memory_estimate
    "QSTCache": "qst.generation",
    "QSTForCausalLM": "qst.model",
    "QSTGenerationCache": "qst.generation",
    "QSTForSequenceClassification": "qst.model",
    "QSTTrainer": "qst.trainer",
    "TuneSettings": "qst.pipeline",
    "run_tune": "qst.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'qst' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _load_spec(path, base=None, device="cpu"):
    from qst.model import QSTForCausalLM

    return QSTForCausalLM.from_pretrained(path, base=base, device=device)


# `qst:DIR` (or a directory holding qst_config.json) in the commands; eval.model_specs imports nothing heavy
register_spec_loader("qst", _load_spec, marker_files=("qst_config.json",))
