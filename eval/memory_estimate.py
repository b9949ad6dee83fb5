"""Analytic training-memory estimate: CUDA context, weights, gradients, optimizer states, activations.

Two sets of assumptions:

* ``"course"`` — the lightweight-tuning course's worked example (docs/METHODS.md §4): 16-bit weights,
  fp32 gradients when every parameter trains (16-bit when only a fraction does), Adam at 4 bytes
  per trainable parameter, and activations = one hidden state per layer
  (bytes · batch · seq · hidden · layers, i.e. what full activation checkpointing keeps).
  With ``param_count=6.515e9`` (the course's 13.03 GB of 16-bit weights) it reproduces the
  course's 67.22 GB for full fine-tuning of LLaMA-2-7B at seq 4096, batch 1, and 15.88 GB when
  2 % of the parameters train.
* ``"detailed"`` (default) — what this suite's training code actually holds, no gradient
  checkpointing. Parameters are counted exactly from a meta-device instance of the model; 4-bit
  NF4 weights cost 0.5 byte plus their double-quantised block constants; PyTorch keeps each
  gradient and both AdamW moments in its parameter's dtype (PEFT adapters and QST's side network
  train in fp32: 16 bytes per trainable parameter); activations follow the per-layer model in
  `_decoder_layer_activation_values` (what autograd saves per token), plus the logits and the loss.

The total is the sum of the figures shown (each rounded to 0.01 GB, 1 GB = 1e9 bytes), so a
printed breakdown always adds up. Unrounded bytes come back in ``breakdown_bytes``/``total_bytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from eval.bnb import nf4_bytes_per_weight
from eval.errors import UserInputError, require_positive
from eval.tuning_methods import (
    CHECKPOINTING_METHODS,
    LORA_METHODS,
    LORA_RANK,
    METHODS,
    QST_ADAPTER_RANK,
    QST_REDUCTION,
    QUANTIZED_METHODS,
    SIDE_TUNING_METHODS,
    downsampler_parameter_count,
)

GB = 1e9
ASSUMPTIONS = ("detailed", "course")
COMPONENTS = ("cuda_context", "weights", "gradients", "optimizer", "activations")

DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}

# Adam moments: PyTorch's AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype.
ADAM_STATES = 2


@dataclass(frozen=True)
class _Shape:
    """The dimensions of a decoder-only transformer that the estimate needs."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    gated_mlp: bool  # LLaMA-style gate/up/down (3 matrices) vs OPT-style fc1/fc2 (2)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


def estimate_memory(
    arch_or_config: Any,
    method: str = "full",
    batch: int = 1,
    seq: int = 2048,
    dtype: str = "bfloat16",
    trainable_fraction: float | None = None,
    *,
    trainable_params: int | None = None,
    assumptions: str = "detailed",
    device: str = "cuda",
    param_count: float | None = None,
    lora_rank: int = LORA_RANK,
    lora_targets: tuple[str, ...] | None = None,
    qst_reduction: int = QST_REDUCTION,
    qst_adapter_rank: int = QST_ADAPTER_RANK,
    attention: str = "sdpa",
    cuda_context_gb: float | None = None,
    labelled_tokens: int | None = None,
) -> dict:
    """Estimate the memory to train `arch_or_config` with `method` at `batch` × `seq` tokens.

    `arch_or_config`: an architecture name from `eval.models.ARCHITECTURES`, a local model
    directory, a transformers config, or a dict of config fields. `dtype` is the backbone's
    (and the activations') dtype. `trainable_fraction` overrides the trainable share
    (for "full": train only that fraction, as in the course's 2 % example; for LoRA/QST:
    replaces the counted adapter/side size); `trainable_params` gives the count directly
    (adapter, prefix, prompt and bitfit need one of the two, else they count as 0). `attention`: "sdpa" (fused kernel, no
    seq × seq score matrix kept) or "eager" (the scores are kept: heads · seq² per layer).
    `labelled_tokens`: positions per batch that predict a label; the LM head, its logits and
    the loss are counted only there (QST always trains so; `slimtune bench` trains every method
    so). None: every position (plain language-model training).
    Returns ``{"breakdown_gb": {component: GB}, "total_gb", "breakdown_bytes", "total_bytes",
    "params", "trainable_params", "assumptions"}``.
    """
    method = _check_choice(method, METHODS, "method")
    assumptions = _check_choice(assumptions, ASSUMPTIONS, "assumptions")
    attention = _check_choice(attention, ("sdpa", "eager"), "attention")
    if dtype not in DTYPE_BYTES:
        raise UserInputError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    for name, value in (("batch", batch), ("seq", seq), ("lora_rank", lora_rank),
                        ("qst_reduction", qst_reduction), ("qst_adapter_rank", qst_adapter_rank)):
        require_positive(name, value)
    if trainable_fraction is not None and not 0 < trainable_fraction <= 1:
        raise UserInputError(f"trainable_fraction must be in (0, 1], got {trainable_fraction!r}")
    if trainable_params is not None:
        if trainable_fraction is not None:
            raise UserInputError("give trainable_fraction or trainable_params, not both")
        if trainable_params < 0:
            raise UserInputError(f"trainable_params must be >= 0, got {trainable_params!r}")
    if labelled_tokens is not None and (not isinstance(labelled_tokens, int) or not 0 <= labelled_tokens <= batch * seq):
        raise UserInputError(f"labelled_tokens must be an integer in [0, batch * seq = {batch * seq}], got {labelled_tokens!r}")
    if param_count is not None and param_count <= 0:
        raise UserInputError(f"param_count must be positive, got {param_count!r}")

    config = resolve_config(arch_or_config)
    shape = _shape(config)
    if shape.hidden % qst_reduction:
        raise UserInputError(f"qst_reduction {qst_reduction} must divide the hidden size {shape.hidden}")
    counts = _parameter_counts(config, lora_targets, lora_rank)
    counts["side"] = qst_side_parameters(shape, qst_reduction, qst_adapter_rank)
    if param_count is not None:  # scale every group to the given total
        scale = param_count / counts["total"]
        counts = {k: v * scale if k in ("total", "quantizable") else v for k, v in counts.items()}
    trainable = _trainable_count(method, counts, trainable_fraction, trainable_params)

    if assumptions == "course":
        parts = _course(shape, counts, method, batch, seq, DTYPE_BYTES[dtype], trainable, qst_reduction)
    else:
        parts = _detailed(shape, counts, method, batch, seq, DTYPE_BYTES[dtype], trainable,
                          qst_reduction, qst_adapter_rank, lora_rank, attention,
                          labelled=batch * seq if labelled_tokens is None else labelled_tokens,
                          on_cuda=str(device).startswith("cuda"))

    on_cuda = str(device).startswith("cuda")
    context_gb = cuda_context_gb if cuda_context_gb is not None else (1.0 if on_cuda else 0.0)
    parts["cuda_context"] = context_gb * GB
    breakdown_bytes = {k: float(parts[k]) for k in COMPONENTS}
    breakdown_gb = {k: round(v / GB, 2) for k, v in breakdown_bytes.items()}
    return {
        "breakdown_gb": breakdown_gb,
        "total_gb": round(sum(breakdown_gb.values()), 2),
        "breakdown_bytes": breakdown_bytes,
        "total_bytes": sum(breakdown_bytes.values()),
        "params": int(counts["total"]),
        "trainable_params": int(trainable),
        "assumptions": assumptions,
    }


# --------------------------------------------------------------------------- the two models


def _trainable_count(method, counts, fraction, trainable_params) -> float:
    """How many parameters train: given directly, as a fraction, or counted for the method."""
    if trainable_params is not None:
        return float(trainable_params)
    if fraction is not None:
        return counts["total"] * fraction
    if method == "full":
        return float(counts["total"])
    if method in LORA_METHODS:
        return float(counts["lora"])
    if method in SIDE_TUNING_METHODS:
        return float(counts["side"])
    return 0.0  # adapter, prefix, prompt, bitfit: only known when given


def _course(shape, counts, method, batch, seq, nbytes, trainable, reduction) -> dict:
    """The course's arithmetic (docs/METHODS.md §4), extended to LoRA/QLoRA/QST in the same spirit."""
    total = counts["total"]
    quantized = method in QUANTIZED_METHODS
    weights = total * (0.5 if quantized else nbytes)  # "QLoRA stores P in 4 bits (0.5P)"
    # fp32 gradients when everything trains (mixed precision); otherwise in the 16-bit dtype.
    grad_bytes = 4 if trainable >= total else nbytes
    hidden_states = nbytes * batch * seq * shape.hidden * shape.layers
    if method in SIDE_TUNING_METHODS:
        # The side network keeps its own (hidden / r)-wide states; the backbone runs without
        # grad, so of it only one layer's hidden state is alive at a time (the transient).
        hidden_states = nbytes * batch * seq * (shape.hidden // reduction * shape.layers + shape.hidden)
    if method != "full":
        weights += trainable * nbytes  # the added adapter / side weights
    return {
        "weights": weights,
        "gradients": trainable * grad_bytes,
        "optimizer": trainable * 4,  # the course's Adam: 26.06 GB for 13.03 GB of 16-bit weights
        "activations": hidden_states,
    }


def _detailed(shape, counts, method, batch, seq, nbytes, trainable, reduction, adapter_rank,
              lora_rank, attention, labelled, on_cuda) -> dict:
    tokens = batch * seq
    total, quantizable = counts["total"], counts["quantizable"]
    fp32 = 4
    quantized = method in QUANTIZED_METHODS
    if quantized:
        # Linear weights of the decoder layers in NF4; embeddings, norms and the LM head stay as
        # they are, except that prepare_model_for_kbit_training (QLoRA) upcasts them to fp32.
        rest_bytes = fp32 if method in LORA_METHODS else nbytes
        weights = quantizable * nf4_bytes_per_weight() + (total - quantizable) * rest_bytes
    else:
        weights = total * nbytes

    if method == "full":
        train_bytes = nbytes  # parameters train in their own dtype
    elif method == "bitfit":
        train_bytes = nbytes  # the biases live in the backbone's dtype
        weights += trainable * nbytes
    else:
        # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype); so do the hand-written
        # adapters and QST's side network.
        train_bytes = fp32
        weights += trainable * fp32

    act = nbytes  # activations are in the compute dtype
    logits = labelled * shape.vocab * (act + 4 + 4)  # logits, their fp32 upcast, saved log-softmax
    scores = shape.heads * seq if attention == "eager" else 0  # per token per layer
    if method in SIDE_TUNING_METHODS:
        side = _side_shape(shape, reduction)
        # The side network keeps its parameters' dtype, fp32: on CUDA eval.train's bf16 autocast
        # computes it in `act`, on CPU (no autocast) its activations are fp32 too.
        side_act = act if on_cuda else fp32
        per_token = (
            (shape.layers + 1) * (2 * adapter_rank + 5 * side.hidden)  # downsampler, norm, gate
            + shape.layers * (_decoder_layer_activation_values(side) + scores)  # side blocks
        )
        # h_0..h_N in the backbone's dtype, and the downsamplers' inputs: the same states cast
        # to the side dtype (a second copy when the dtypes differ: the 4-bit backbone on CPU).
        states = (shape.layers + 1) * shape.hidden * (act + (side_act if side_act != act else 0))
        # Only at labelled positions: upsample output and output mix (side dtype), LM-head input.
        mix = labelled * shape.hidden * (2 * side_act + act)
        # The no-grad backbone frees each layer's tensors before the next: one layer's working
        # set at a time (x, its norm, q, k, v, attention output, gate, up, their product).
        transient = tokens * act * (4 * shape.hidden + 2 * shape.kv_width + 3 * shape.ffn
                                    + 2 * scores)
        activations = tokens * (side_act * per_token + states) + mix + transient + logits
    else:
        per_token_layer = _decoder_layer_activation_values(shape) + scores
        if method in LORA_METHODS:
            per_token_layer += counts["lora_modules_per_layer"] * lora_rank  # x @ A, kept for B's grad
        if method in CHECKPOINTING_METHODS:
            # Gradient checkpointing keeps each layer's input and recomputes one layer at a time in backward.
            activations = tokens * act * (shape.layers * shape.hidden + per_token_layer + shape.hidden) + logits
        else:
            activations = tokens * act * (shape.layers * per_token_layer + shape.hidden) + logits
    return {
        "weights": weights,
        "gradients": trainable * train_bytes,
        "optimizer": trainable * train_bytes * ADAM_STATES,
        "activations": activations,
    }


def _decoder_layer_activation_values(shape: _Shape) -> int:
    """Values per token that autograd keeps for one decoder layer (no checkpointing, fused attention).

    Attention: norm input and output (2d), q and k after rotary (d + d_kv), v (d_kv), the
    attention output that feeds o_proj (d) → 4d + 2 d_kv. MLP: norm input and output (2d), and
    gate, up, act(gate), act(gate)·up (4 f) for a gated MLP; fc1 output and its ReLU (2 f) for OPT.
    """
    mlp = 4 * shape.ffn if shape.gated_mlp else 2 * shape.ffn
    return 4 * shape.hidden + 2 * shape.kv_width + 2 * shape.hidden + mlp


def _side_shape(shape: _Shape, reduction: int) -> _Shape:
    """QST's side blocks: width d/r, FFN width ffn/r, the same head count (head_dim shrinks),
    full-width keys and values (no grouped-query sharing), always a gated MLP."""
    return _Shape(
        hidden=shape.hidden // reduction, ffn=max(1, shape.ffn // reduction), layers=shape.layers,
        heads=shape.heads, kv_heads=shape.heads, vocab=shape.vocab, gated_mlp=True,
    )


def qst_side_parameters(shape: _Shape, reduction: int = QST_REDUCTION,
                        adapter_rank: int = QST_ADAPTER_RANK) -> int:
    """QST's trainable parameters (docs/METHODS.md §1): 28.68 M for LLaMA-2-7B at r = 16 (paper: 28.6 M).

    (L + 1) adapter downsamplers d → k → d/r with biases and a LayerNorm; L side decoder blocks
    of width d/r (q, k, v, o; gated MLP of width ffn/r; two RMSNorm scales); L per-channel gates;
    the final RMSNorm, the upsampler d/r → d (no bias) and α.
    """
    d, side = shape.hidden, _side_shape(shape, reduction)
    ds, f = side.hidden, side.ffn
    downsampler = downsampler_parameter_count("adapter", d, ds, adapter_rank)
    block = 4 * ds * ds + 3 * ds * f + 2 * ds
    gate = ds
    return (shape.layers + 1) * downsampler + shape.layers * (block + gate) + ds + ds * d + 1


# --------------------------------------------------------------------------- configs and counts


def resolve_config(arch_or_config: Any):
    """A transformers config from an architecture name, "ref-lm", a model directory or hub id
    (read offline from the local cache), a dict of config fields, or a config."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(arch_or_config, PretrainedConfig):
        return arch_or_config
    if isinstance(arch_or_config, dict):
        fields = dict(arch_or_config)
        model_type = fields.pop("model_type", "llama")
        return AutoConfig.for_model(model_type, **fields)
    from pathlib import Path

    from eval.models import ARCHITECTURES, architecture_config

    name = str(arch_or_config)
    if name in ARCHITECTURES:
        return architecture_config(name)
    if name == "ref-lm":
        from eval.reference import reference_path

        name = str(reference_path("lm"))
    if Path(name).is_dir() or "/" in name:
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            raise UserInputError(f"cannot read a model config from {name!r}: {str(e).splitlines()[0]}") from e
    raise UserInputError(
        f"unknown architecture or model {name!r}; expected one of {', '.join(ARCHITECTURES)}, "
        "'ref-lm', a model directory or a cached hub id"
    )


def _shape(config) -> _Shape:
    hidden = config.hidden_size
    heads = config.num_attention_heads
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", None) or 4 * hidden
    gated = getattr(config, "model_type", "llama") not in ("opt", "gpt2", "gpt_neox", "phi")
    return _Shape(
        hidden=hidden, ffn=ffn, layers=config.num_hidden_layers, heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        vocab=config.vocab_size, gated_mlp=gated,
    )


def _parameter_counts(config, lora_targets, lora_rank) -> dict:
    """Exact counts from a meta-device instance (no memory is allocated).

    ``total``: all parameters; ``quantizable``: Linear weights inside the decoder layers (what
    bitsandbytes quantises: not embeddings, norms or the LM head); ``lora``: LoRA A and B on
    `lora_targets` (module-name suffixes; default: every Linear in the decoder layers).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    quantizable = lora = 0
    targeted = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or "lm_head" in name or ".layers." not in f".{name}":
            continue
        quantizable += module.weight.numel()
        suffix = name.rsplit(".", 1)[-1]
        if lora_targets is None or suffix in lora_targets:
            lora += lora_rank * (module.in_features + module.out_features)
            targeted.add(suffix)
    return {
        "total": total,
        "quantizable": quantizable,
        "lora": lora,
        "lora_modules_per_layer": len(targeted),
    }


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UserInputError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
    return value


def check_seq(config, seq: int, name: str) -> None:
    """--seq must fit the model's context (`max_position_embeddings`), when it declares one."""
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and seq > context:
        raise UserInputError(f"--seq {seq} is longer than {name}'s context of {context} tokens "
                             f"(max_position_embeddings); use --seq {context} or less")


def fits(estimate: dict, available_bytes: float) -> bool:
    """Whether an estimate fits in `available_bytes` (used by bench before it starts)."""
    return math.isfinite(estimate["total_bytes"]) and estimate["total_bytes"] <= available_bytes
