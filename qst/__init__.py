"""Quantized Side Tuning (QST): a small trainable side network on a frozen 4-bit LM.

    from qst import QSTConfig, QSTForCausalLM
    model = QSTForCausalLM.from_base("ref-lm", QSTConfig(r=16, downsample="adapter"))

See `qst.config` for the hyperparameters, `qst.layer` for the side network, `qst.model` for the
wrappers (save / load / generate) and `qst.cache` for the on-disk backbone feature cache.
"""

from qst.cache import BackboneFeatureCache, BackboneFeatures
from qst.config import DOWNSAMPLERS, SIDE_INITS, QSTConfig
from qst.layer import SideBlockSpec, SideNetwork, downsampler_parameter_count
from qst.model import QSTCache, QSTForCausalLM, QSTForSequenceClassification

__all__ = [
    "DOWNSAMPLERS",
    "SIDE_INITS",
    "BackboneFeatureCache",
    "BackboneFeatures",
    "QSTCache",
    "QSTConfig",
    "QSTForCausalLM",
    "QSTForSequenceClassification",
    "SideBlockSpec",
    "SideNetwork",
    "downsampler_parameter_count",
]
