"""The tuning methods QST is compared with, each built the way its users build it.

`build_tuning_model(method, ...)` loads the backbone (16-bit, or 4-bit NF4 for `qlora` and
`qst`) and makes only that method's parameters trainable:

| method  | what trains                                                        | built with |
|---------|--------------------------------------------------------------------|------------|
| full    | every parameter                                                    | transformers |
| lora    | LoRA A, B (rank 16, α 32) on every Linear of the decoder layers    | PEFT |
| qlora   | the same LoRA, on a 4-bit NF4 backbone                             | PEFT `prepare_model_for_kbit_training` |
| qlora-gc | QLoRA with gradient checkpointing (the QLoRA paper's recipe)      | PEFT + transformers' checkpointing |
| lst     | QST's side network on a 16-bit backbone (Ladder Side Tuning)       | `qst` |
| qst     | QST's side network on a 4-bit NF4 backbone                         | `qst` |
| adapter | Houlsby bottleneck adapters after attention and after the MLP      | here (PEFT has none) |
| prefix  | per-layer key/value prefixes, 16 virtual tokens                    | PEFT |
| prompt  | 16 soft-prompt input embeddings                                    | PEFT |
| bitfit  | bias terms only                                                    | here (PEFT has none) |

Choices that keep the comparison fair (documented in docs/RESULTS.md):
- Every method computes the LM head, its logits and the loss only at the positions that predict
  a label (QST's forward does so itself; the others train with `labelled_positions_loss`), so
  no method pays for [batch, seq, vocab] logits the loss does not read. The loss is the same
  mean next-token cross-entropy over labelled tokens as `labels=` with -100 ignored.
- No gradient checkpointing except in `qlora-gc`. `prepare_model_for_kbit_training` turns it on
  by default; `qlora` passes `use_gradient_checkpointing=False`, since checkpointing trades step
  time for memory and moves QLoRA along both axes the benchmark compares. `qlora-gc` keeps it
  on (non-reentrant), as the QLoRA paper trains: the memory point users compare against.
- LoRA and QLoRA adapt the same matrices ("all-linear": every Linear of the decoder layers).
- BitFit on a model without biases (LLaMA, Mistral): BitFit's definition is "train only the
  bias terms", so we give every Linear of the decoder layers a zero-initialised bias and train
  those (the model's function at step 0 is unchanged). The norm scales are *not* trained. On
  models with biases (OPT) the existing biases train, LayerNorm biases included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from eval import architectures as arch
from eval.errors import UserInputError, require_positive
from eval.tuning_methods import DEFAULT_METHODS, LORA_RANK, METHODS, QUANTIZED_METHODS  # noqa: F401 - DEFAULT_METHODS: bench reads it here
from qst.backbone import module_device


@dataclass(frozen=True)
class BaselineConfig:
    """Hyper-parameters of the baselines; the defaults are the common recipes."""

    lora_rank: int = LORA_RANK  # the rank eval.memory_estimate assumes too
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str | tuple[str, ...] = "all-linear"
    adapter_size: int = 16  # Houlsby bottleneck width
    num_virtual_tokens: int = 16  # prefix and prompt tuning
    qst_options: dict = field(default_factory=dict)  # extra QSTConfig fields

    def __post_init__(self):
        for name in ("lora_rank", "lora_alpha", "adapter_size", "num_virtual_tokens"):
            require_positive(f"BaselineConfig.{name}", getattr(self, name))
        if not 0 <= self.lora_dropout < 1:
            raise UserInputError(f"BaselineConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


def check_methods(methods: str | list[str] | tuple[str, ...]) -> list[str]:
    """Parse `"full,lora"` / `"all"` / a list into known method names, in order, without repeats."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names: list[str] = []
    for m in methods:
        expanded = METHODS if m == "all" else (m,)
        for name in expanded:
            if name not in METHODS:
                raise UserInputError(
                    f"unknown tuning method {name!r}; expected a comma-separated list of {', '.join(METHODS)}, or 'all'"
                )
            if name not in names:
                names.append(name)
    if not names:
        raise UserInputError(f"no tuning method given; expected some of {', '.join(METHODS)}, or 'all'")
    return names


def backbone_quantization(method: str) -> str | None:
    """`"nf4"` for the methods that train on a 4-bit backbone, else None."""
    return "nf4" if method in QUANTIZED_METHODS else None


def load_backbone(method: str, model: str | None = "ref-lm", arch: str | None = None,
                  device: str = "cpu", dtype: str | None = None):
    """The frozen starting point of `method`: `(model, tokenizer)`; tokenizer is None for `arch`.

    `model` is anything `eval.models.load_causal_lm` opens; `arch` builds random weights of a
    named architecture instead (memory and speed only). `dtype` is the dtype the backbone
    computes in: a 16-bit (or fp32) backbone's weights, or what a 4-bit backbone computes in and
    keeps its unquantized parts in; None: float32, and for 4-bit `eval.bnb.compute_dtype(device)`
    (bfloat16 except on CPUs without bf16 hardware). `slimtune bench` passes one dtype to every
    method of a run, so that no ratio mixes precisions.
    """
    from eval.models import build_model_from_arch, load_causal_lm

    quantize = backbone_quantization(method)
    if arch is not None:
        return build_model_from_arch(arch, dtype=dtype, device=device, quantize=quantize), None
    return load_causal_lm(model, quantize=quantize, dtype=dtype, device=device)


def build_tuning_model(method: str, model: str | None = "ref-lm", arch: str | None = None,
                       device: str = "cpu", dtype: str | None = None,
                       config: BaselineConfig | None = None):
    """Load the backbone for `method` and make it trainable the way `method` does: `(model, tokenizer)`."""
    (method,) = check_methods([method])
    backbone, tokenizer = load_backbone(method, model=model, arch=arch, device=device, dtype=dtype)
    return make_trainable(method, backbone, config or BaselineConfig()), tokenizer


def make_trainable(method: str, backbone: nn.Module, config: BaselineConfig) -> nn.Module:
    """Wrap or modify a loaded backbone so that only `method`'s parameters require grad."""
    builders = {
        "full": _full, "lora": _lora, "qlora": _qlora, "qlora-gc": _qlora_gc, "lst": _side_tuning, "qst": _side_tuning,
        "adapter": _adapter, "prefix": _prefix, "prompt": _prompt, "bitfit": _bitfit,
    }
    if method not in builders:
        check_methods([method])
    return builders[method](backbone, config)


# --------------------------------------------------------------------------- one per method


def _full(model, config):
    model.requires_grad_(True)
    return model


def _lora_config(config: BaselineConfig):
    from peft import LoraConfig

    return LoraConfig(
        task_type="CAUSAL_LM", r=config.lora_rank, lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_targets if isinstance(config.lora_targets, str) else list(config.lora_targets),
    )


def _lora(model, config):
    from peft import get_peft_model

    return get_peft_model(model, _lora_config(config))


def _qlora(model, config, gradient_checkpointing: bool = False):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if not getattr(model, "is_loaded_in_4bit", False):
        raise UserInputError("qlora needs a 4-bit backbone (load it with quantize='nf4')")
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )
    return get_peft_model(model, _lora_config(config))


def _qlora_gc(model, config):
    """QLoRA as its paper trains: every decoder layer recomputed in backward (transformers'
    gradient checkpointing, turned on by `prepare_model_for_kbit_training`)."""
    return _qlora(model, config, gradient_checkpointing=True)


def _side_tuning(model, config):
    from qst import QSTConfig, QSTForCausalLM

    return QSTForCausalLM.from_base(model, QSTConfig(**config.qst_options))  # records the model's own quantization


def _prefix(model, config):
    from peft import PrefixTuningConfig, get_peft_model

    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens))


def _prompt(model, config):
    from peft import PromptTuningConfig, get_peft_model

    peft_model = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=config.num_virtual_tokens))
    return VirtualTokenLogitsTrimmer(peft_model, config.num_virtual_tokens)


class VirtualTokenLogitsTrimmer(nn.Module):
    """PEFT's prompt tuning returns logits for the virtual tokens too ([B, n_virtual + T, V]).

    Scoring code reads logits position by position against `input_ids`, so this drops the first
    `n_virtual` positions ([B, T, V]); the loss PEFT computes (labels padded for the virtual
    tokens) is passed through unchanged.
    """

    def __init__(self, peft_model: nn.Module, num_virtual_tokens: int):
        super().__init__()
        self.peft_model = peft_model
        self.num_virtual_tokens = num_virtual_tokens

    @property
    def config(self):
        return self.peft_model.config

    @property
    def device(self):
        return self.peft_model.device

    def forward(self, *args, **kwargs):
        output = self.peft_model(*args, **kwargs)
        output.logits = output.logits[:, self.num_virtual_tokens:]
        return output


class HoulsbyAdapter(nn.Module):
    """Bottleneck adapter (Houlsby et al., 2019): x + up(GELU(down(x))), up starts at zero.

    x: [..., d] → down: [..., m] → up: [..., d]. Zero `up` makes the adapted model equal to the
    backbone at step 0. Runs in its own dtype (fp32) and returns the input's dtype.
    """

    def __init__(self, hidden_size: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(nn.functional.gelu(self.down(x.to(self.down.weight.dtype))))
        return x + h.to(x.dtype)


def _adapter(model, config):
    add_houlsby_adapters(model, config.adapter_size)
    return model


def add_houlsby_adapters(model: nn.Module, bottleneck: int) -> int:
    """Freeze `model` and insert a trainable adapter after every attention block and every MLP.

    A forward hook on each decoder layer's attention module and on its MLP output (the MLP
    module, else its output Linear as in OPT), both named by `eval.architectures`, passes that
    output through the adapter, before the residual add. Returns the number of adapters added.
    """
    model.requires_grad_(False)
    hidden = model.config.hidden_size
    added = 0
    layout = arch.decoder_layout(model, purpose="the adapter baseline")
    for layer in arch.decoder_layers(model, layout):
        for site in (arch.attention_module(layer, layout), arch.mlp_output_module(layer, layout)):
            adapter = HoulsbyAdapter(hidden, bottleneck).to(module_device(site))
            site.add_module("houlsby_adapter", adapter)  # saved and counted with the model
            site.register_forward_hook(_apply_adapter)
            added += 1
    return added


def _apply_adapter(module, args, output):
    if isinstance(output, tuple):  # attention: (attn_output, attn_weights, ...)
        return (module.houlsby_adapter(output[0]),) + tuple(output[1:])
    return module.houlsby_adapter(output)


def _bitfit(model, config):
    """Train bias terms only; add zero biases to the decoder Linears that have none (LLaMA)."""
    model.requires_grad_(False)
    for layer in arch.decoder_layers(model, arch.decoder_layout(model, purpose="the bitfit baseline")):
        for module in layer.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(
                    torch.zeros(module.out_features, dtype=module.weight.dtype, device=module.weight.device)
                )
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- the shared loss


def labelled_positions_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy with the LM head run only where the next token has a label.

    A pre-hook on the output embedding keeps the rows of its input [B, S', d] that predict a
    label ([n, d], n = labelled tokens), so the logits are [n, vocab], as in QST's training
    forward. S' > S (virtual tokens of prompt tuning come first) is handled by skipping the
    first S' - S positions. `batch`: input_ids, attention_mask, labels [B, S] (-100 ignored).
    """
    if isinstance(model, VirtualTokenLogitsTrimmer):
        model = model.peft_model  # its logits trimming assumes [B, S', V]
    labels = batch["labels"]
    targets = labels[:, 1:]
    keep = targets != -100  # [B, S - 1]: position s predicts token s + 1
    predicts = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)  # [B, S]

    def select(module, args):
        hidden = args[0]
        skip = hidden.shape[1] - predicts.shape[1]
        mask = nn.functional.pad(predicts, (skip, 0)) if skip else predicts
        return (hidden[mask.to(hidden.device)],) + tuple(args[1:])

    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # [n, vocab]
    finally:
        handle.remove()
    return nn.functional.cross_entropy(logits.float(), targets[keep].to(logits.device))
