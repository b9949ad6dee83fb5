"""What QST needs to know about its frozen backbone, read from the model itself.

`inspect_backbone` runs one probe pass and checks the one thing the side path relies on: the
backbone's LM head consumes `last_hidden_state` of its base model (so the QST logits equal the
backbone's before training, with no per-architecture code). `load_backbone` turns what a user
passes as `base` (a name, a path or a loaded model) into the model QST wraps.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from eval.bnb import quantization_of
from eval.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """Dimensions of the backbone, read from one probe pass (saved, and checked on load)."""

    model_type: str
    hidden_size: int  # d of h_0 .. h_N
    head_input_size: int  # d_out of the LM head's input (differs from d e.g. for OPT-350m)
    num_layers: int  # N
    num_heads: int
    ffn_size: int
    vocab_size: int


def _config_value(config, names: tuple[str, ...]):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def inspect_backbone(model: nn.Module) -> BackboneSpec:
    """Check that `model` is a decoder-only LM whose LM head reads `last_hidden_state`."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        raise UserInputError(f"QST needs a decoder-only causal LM with a transformers config, got {type(model).__name__}")
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or base is model or head is None:
        raise UserInputError(
            f"{type(model).__name__} has no separate base model and LM head; QST expects a transformers "
            "*ForCausalLM model (Llama, OPT, Mistral, Qwen2, Phi, GPT-NeoX, GPT-2, ...)"
        )
    vocab = int(head.weight.shape[0]) if hasattr(head, "weight") else int(config.vocab_size)
    probe = (torch.arange(1, 6, device=module_device(model)) % vocab)[None]
    with torch.no_grad():
        try:
            out = base(input_ids=probe, output_hidden_states=True, use_cache=False, return_dict=True)
        except TypeError as e:
            raise UserInputError(f"{type(model).__name__} cannot return hidden states ({e}); QST needs them") from e
        full = model(input_ids=probe, use_cache=False).logits
    states = getattr(out, "hidden_states", None)
    last = getattr(out, "last_hidden_state", None)
    if not states or len(states) < 2 or last is None:
        raise UserInputError(
            f"{type(model).__name__} did not return hidden states with output_hidden_states=True; "
            "QST needs the embedding output and every layer's output"
        )
    if not torch.allclose(head(last).float(), full.float(), rtol=1e-3, atol=1e-3):
        raise UserInputError(
            f"{type(model).__name__}'s logits are not its LM head applied to last_hidden_state (the "
            "architecture transforms the head's output, e.g. logit soft-capping); QST cannot mix its output"
        )
    num_heads = _config_value(config, ("num_attention_heads", "n_head"))
    if not num_heads:
        raise UserInputError(f"the backbone config ({config.model_type}) has no num_attention_heads")
    hidden = int(states[0].shape[-1])
    ffn = _config_value(config, ("intermediate_size", "ffn_dim", "n_inner")) or 4 * hidden
    return BackboneSpec(
        model_type=str(config.model_type), hidden_size=hidden, head_input_size=int(last.shape[-1]),
        num_layers=len(states) - 1, num_heads=int(num_heads), ffn_size=int(ffn), vocab_size=int(full.shape[-1]),
    )


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def load_backbone(base, quantize, dtype, device):
    """(model, tokenizer or None, name or path, quantization actually in use)."""
    if isinstance(base, nn.Module):
        config = getattr(base, "config", None)
        if config is None:
            raise UserInputError(f"QST needs a transformers decoder-only causal LM, got {type(base).__name__}")
        return base, None, getattr(config, "_name_or_path", None) or None, quantization_of(base)
    if not isinstance(base, (str, os.PathLike)):
        raise UserInputError(f"base must be a model name, a path or a loaded model, got {type(base).__name__}")
    from eval.models import load_causal_lm

    model, tokenizer = load_causal_lm(os.fspath(base), quantize=quantize, dtype=dtype, device=device)
    return model, tokenizer, os.fspath(base), quantize
