"""QST models: a frozen (usually 4-bit) causal LM backbone and a trainable side network.

    model = QSTForCausalLM.from_base("ref-lm", QSTConfig(r=16))        # NF4 backbone
    out = model(input_ids, attention_mask, labels=labels)              # .loss, .logits
    model.save_pretrained("side/")                                     # side network only
    model = QSTForCausalLM.from_pretrained("side/")                    # finds the backbone again

The backbone's base model (`backbone.base_model`) runs under `torch.no_grad()` with
`output_hidden_states=True`: h_0 (embedding output) .. h_N, and its `last_hidden_state`,
which is exactly the tensor the backbone's LM head consumes (final norm applied). That last
tensor is checked once, when wrapping, against the backbone's own logits, so the side path has
no per-architecture code: before training the QST logits are the backbone's logits bit for bit.
Only `side_init="pruned"` reads backbone weights by name, through `eval.architectures`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin

from eval import architectures as arch
from eval.architectures import DecoderLayout
from eval.errors import UserInputError
from eval.models import avoid_bnb_cpu_repacking_failure
from qst.cache import (
    BackboneFeatureCache,
    BackboneFeatures,
    backbone_fingerprint,
    default_cache_root,
)
from qst.config import POOLING_DOWNSAMPLERS, QSTConfig
from qst.layer import SideBlock, SideBlockSpec, SideKVCache, SideNetwork

CONFIG_NAME = "qst_config.json"
WEIGHTS_NAME = "side_network.safetensors"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------
# What the side network needs to know about the backbone


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
    probe = (torch.arange(1, 6, device=_module_device(model)) % vocab)[None]
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


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _detect_quantization(model: nn.Module) -> str | None:
    if getattr(model, "is_loaded_in_4bit", False):
        qc = getattr(model.config, "quantization_config", None)
        qtype = qc.get("bnb_4bit_quant_type") if isinstance(qc, dict) else getattr(qc, "bnb_4bit_quant_type", None)
        return str(qtype or "nf4")
    if getattr(model, "is_loaded_in_8bit", False):
        return "int8"
    return None


# ---------------------------------------------------------------------------------------------
# Side block shape, and initialisation from pruned backbone blocks


def side_width(config: QSTConfig, spec: BackboneSpec) -> int:
    d = spec.hidden_size
    if config.downsample in POOLING_DOWNSAMPLERS and d % config.r:
        raise UserInputError(
            f"r={config.r} does not divide the backbone's hidden size {d}; the {config.downsample} "
            f"downsampler pools groups of r channels, so r must divide {d}"
        )
    width = d // config.r
    if width < spec.num_heads or width % spec.num_heads:
        raise UserInputError(
            f"side width {d} // r={config.r} = {width} is not a positive multiple of the backbone's "
            f"{spec.num_heads} attention heads; pick r so that {d} / r is divisible by {spec.num_heads}"
        )
    return width


def side_layer_indices(config: QSTConfig, spec: BackboneSpec) -> tuple[int, ...]:
    if config.side_layers is None:
        return tuple(range(spec.num_layers))
    bad = [i for i in config.side_layers if i >= spec.num_layers]
    if bad:
        raise UserInputError(f"side_layers {bad} are out of range: the backbone has {spec.num_layers} layers (0..{spec.num_layers - 1})")
    return config.side_layers


def random_block_spec(config: QSTConfig, spec: BackboneSpec) -> SideBlockSpec:
    """LLaMA-style side block: RMSNorm, SwiGLU FFN, no biases, RoPE."""
    return SideBlockSpec(
        width=side_width(config, spec), num_heads=spec.num_heads, ffn_width=max(1, spec.ffn_size // config.r),
        rope_theta=config.rope_theta,
    )


def _side_init_supports(layout: DecoderLayout) -> bool:
    """The pruned initialisation copies the nn.Linear projections and two norms of sequential blocks."""
    return layout.residual == "sequential" and layout.linear == "linear" and layout.mlp_norm is not None


def _prune_layout(backbone: nn.Module) -> DecoderLayout:
    try:
        layout = arch.decoder_layout(backbone.config, purpose="side_init='pruned'", needs=_side_init_supports)
    except UserInputError as e:
        raise UserInputError(f"{e}; use side_init='random'") from None
    if not arch.is_pre_norm(layout, backbone.config):
        raise UserInputError(f"side_init='pruned' needs a pre-norm {backbone.config.model_type} "
                             f"({layout.pre_norm_flag}=True); use side_init='random'")
    return layout


def pruned_block_spec(config: QSTConfig, spec: BackboneSpec, backbone: nn.Module) -> SideBlockSpec:
    """The side block mirrors the backbone block's flavour (FFN kind, activation, biases, norm)."""
    layout = _prune_layout(backbone)
    layer = arch.decoder_layers(backbone, layout)[0]
    has_bias = any(getattr(layer.get_submodule(n), "bias", None) is not None for n in arch.block_linears(layout))
    norm = layer.get_submodule(layout.attn_norm)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return SideBlockSpec(
        width=side_width(config, spec), num_heads=spec.num_heads, ffn_width=max(1, spec.ffn_size // config.r),
        ffn_kind="gated" if arch.is_gated(layout) else "plain", activation=str(getattr(backbone.config, layout.activation)),
        bias=has_bias, norm=layout.norm_kind, norm_eps=float(eps), rope_theta=config.rope_theta,
    )


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """A linear layer's weight in float32 [out, in]; 4-bit weights are dequantized (one layer at a time)."""
    weight = module.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None:
        return weight.detach().float()
    if not getattr(quant_state, "packing_format_for_cpu", False):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, quant_state).float()
    # bitsandbytes repacks 4-bit weights for its CPU kernel on the first inference pass; read
    # that layout back through the layer itself: row i of W^T is the layer applied to e_i.
    return _weight_by_probing(module).float()


@torch.no_grad()
def _weight_by_probing(module: nn.Module, chunk: int = 1024) -> torch.Tensor:
    in_features = module.in_features
    dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    device = module.weight.device
    columns = []
    for start in range(0, in_features, chunk):
        eye = torch.eye(in_features, dtype=dtype, device=device)[start:start + chunk]
        out = module(eye).float()
        if getattr(module, "bias", None) is not None:
            out = out - module.bias.float()
        columns.append(out)
    return torch.cat(columns).T.contiguous()  # [out, in]


def _bias(module: nn.Module) -> torch.Tensor | None:
    return module.bias.detach().float() if getattr(module, "bias", None) is not None else None


def _normed(x: torch.Tensor) -> torch.Tensor:
    return x / x.mean().clamp_min(1e-12)


_PROJECTIONS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")  # DecoderLayout fields


def _block_weights(layer: nn.Module, layout: DecoderLayout, config) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """Float32 (weight [out, in], bias or None) of one layer's projections by role: q, k, v, o,
    up, down, and gate when gated. Fused projections are split: qkv rows are [q; k; v]
    (heads·hd, kv·hd, kv·hd), gate_up rows are [gate; up] (Phi-3)."""
    found = {}
    for role in _PROJECTIONS:
        if getattr(layout, role):
            module = layer.get_submodule(getattr(layout, role))
            found[role] = (_dense_weight(module), _bias(module))
    if "qkv" in found:
        heads, kv = arch.head_counts(config, layout)
        hd = found["qkv"][0].shape[0] // (heads + 2 * kv)
        found.update(_split(found.pop("qkv"), ("q", "k", "v"), [heads * hd, kv * hd, kv * hd]))
    if "gate_up" in found:
        half = found["gate_up"][0].shape[0] // 2
        found.update(_split(found.pop("gate_up"), ("gate", "up"), [half, half]))
    return found


def _split(weight_bias, names: tuple[str, ...], sizes: list[int]) -> dict:
    weight, bias = weight_bias
    biases = bias.split(sizes) if bias is not None else [None] * len(sizes)
    return dict(zip(names, zip(weight.split(sizes), biases)))


def _residual_importance(layers, layout: DecoderLayout, config) -> torch.Tensor:
    """Importance of each residual channel [d]: the norms of the weights that read it (input
    columns of q, k, v, gate, up) and write it (output rows of o, down), each matrix's norms
    scaled to mean 1, summed over the layers. One channel set for every side block keeps the
    side residual stream consistent from block to block."""
    score = None
    for layer in layers:  # one layer's dense weights at a time
        w = {role: weight for role, (weight, _) in _block_weights(layer, layout, config).items()}
        parts = [w[r].norm(dim=0) for r in ("q", "k", "v", "up", "gate") if r in w]
        parts += [w[r].norm(dim=1) for r in ("o", "down")]
        layer_score = sum(_normed(p) for p in parts)
        score = layer_score if score is None else score + layer_score
    return score


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries along the last dim, in increasing order."""
    return score.topk(k, dim=-1).indices.sort(dim=-1).values


@torch.no_grad()
def _copy_pruned_block(block: SideBlock, layer: nn.Module, layout: DecoderLayout, config, keep: torch.Tensor,
                       side: SideBlockSpec) -> None:
    # Qwen3's per-head q/k norms are not copied: the side block has none (an initialisation only).
    heads, hd_side = side.num_heads, side.head_dim
    weights = _block_weights(layer, layout, config)
    (q, q_bias), (k, k_bias), (v, v_bias), (o, o_bias) = (weights[r] for r in ("q", "k", "v", "o"))
    hd = q.shape[0] // heads
    kv_heads = k.shape[0] // hd
    kv_of = torch.arange(heads) // (heads // kv_heads)  # grouped-query: q head -> its k/v head
    # Per head, keep the hd_side query/key dims (shared: they meet in the dot product) and the
    # hd_side value/output dims with the largest weight norms.
    qk_score = q.view(heads, hd, -1).norm(dim=-1) + k.view(kv_heads, hd, -1).norm(dim=-1)[kv_of]
    vo_score = v.view(kv_heads, hd, -1).norm(dim=-1)[kv_of] + o.view(o.shape[0], heads, hd).norm(dim=0)
    qk_dims, vo_dims = _top(qk_score, hd_side), _top(vo_score, hd_side)  # [H, hd_side]
    rows_q = (torch.arange(heads)[:, None] * hd + qk_dims).reshape(-1)
    rows_k = (kv_of[:, None] * hd + qk_dims).reshape(-1)
    rows_v = (kv_of[:, None] * hd + vo_dims).reshape(-1)
    cols_o = (torch.arange(heads)[:, None] * hd + vo_dims).reshape(-1)
    attn = block.attn
    _set_linear(attn.q_proj, q[rows_q][:, keep], _pick(q_bias, rows_q))
    _set_linear(attn.k_proj, k[rows_k][:, keep], _pick(k_bias, rows_k))
    _set_linear(attn.v_proj, v[rows_v][:, keep], _pick(v_bias, rows_v))
    _set_linear(attn.o_proj, o[keep][:, cols_o], _pick(o_bias, keep))

    (up, up_bias), (down, down_bias) = weights["up"], weights["down"]
    gate, gate_bias = weights.get("gate", (None, None))
    ffn_score = up.norm(dim=1) + down.norm(dim=0) + (gate.norm(dim=1) if gate is not None else 0)
    ffn = _top(ffn_score, side.ffn_width)
    mlp = block.mlp
    _set_linear(mlp.up_proj, up[ffn][:, keep], _pick(up_bias, ffn))
    _set_linear(mlp.down_proj, down[keep][:, ffn], _pick(down_bias, keep))
    if gate is not None:
        _set_linear(mlp.gate_proj, gate[ffn][:, keep], _pick(gate_bias, ffn))
    for side_norm, name in ((block.attn_norm, layout.attn_norm), (block.mlp_norm, layout.mlp_norm)):
        norm = layer.get_submodule(name)
        side_norm.weight.copy_(norm.weight.detach().float()[keep])
        if getattr(side_norm, "bias", None) is not None and getattr(norm, "bias", None) is not None:
            side_norm.bias.copy_(norm.bias.detach().float()[keep])


def _pick(bias: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias[index]


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))


def init_side_from_pruned_backbone(side: SideNetwork, backbone: nn.Module, layer_indices: tuple[int, ...]) -> None:
    """LST-style start: side block j copies backbone layer layer_indices[j], pruned to the side
    width by weight-norm importance (residual channels, per-head dims, FFN channels)."""
    layout = _prune_layout(backbone)
    all_layers = arch.decoder_layers(backbone, layout)
    layers = [all_layers[i] for i in layer_indices]
    keep = _top(_residual_importance(layers, layout, backbone.config), side.spec.width)
    for block, layer in zip(side.blocks, layers, strict=True):
        _copy_pruned_block(block, layer, layout, backbone.config, keep, side.spec)


# ---------------------------------------------------------------------------------------------
# The models


@dataclasses.dataclass
class QSTCache:
    """Generation cache: the backbone's transformers cache and the side network's own."""

    backbone: Any = None
    side: SideKVCache = dataclasses.field(default_factory=SideKVCache)

    def get_seq_length(self) -> int:
        return self.side.length()


class _QSTModel(nn.Module):
    """What both QST heads share: the frozen backbone, the side network, save / load."""

    task = ""

    def __init__(self, backbone: nn.Module, config: QSTConfig, *, base_name_or_path: str | None = None,
                 quantize: str | None = None, block_spec: SideBlockSpec | None = None,
                 backbone_spec: BackboneSpec | None = None, tokenizer=None):
        super().__init__()
        if not isinstance(config, QSTConfig):
            raise UserInputError(f"config must be a QSTConfig, got {type(config).__name__}")
        backbone.eval()
        backbone.requires_grad_(False)
        # A backbone not loaded by eval.models may still hold 4-bit layers that bitsandbytes'
        # CPU kernel cannot repack (odd widths): keep those on the generic path.
        avoid_bnb_cpu_repacking_failure(backbone)
        self.backbone = backbone
        self.qst_config = config
        self.backbone_spec = backbone_spec or inspect_backbone(backbone)
        self.side_layer_indices = side_layer_indices(config, self.backbone_spec)
        if block_spec is None and config.side_init == "pruned":
            block_spec = pruned_block_spec(config, self.backbone_spec, backbone)
        elif block_spec is None:
            block_spec = random_block_spec(config, self.backbone_spec)
        self.side = SideNetwork(
            config, block_spec, self.backbone_spec.hidden_size, self.backbone_spec.head_input_size,
            num_blocks=len(self.side_layer_indices),
        ).to(_module_device(backbone))
        self.base_name_or_path = base_name_or_path or getattr(backbone.config, "_name_or_path", None) or None
        self.quantize = quantize if quantize is not None else _detect_quantization(backbone)
        self.tokenizer = tokenizer
        self.feature_cache: BackboneFeatureCache | None = None
        forward_params = inspect.signature(backbone.base_model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._takes_position_ids = "position_ids" in forward_params

    # --- what harness code reads from a transformers model -----------------------------------

    @property
    def config(self):
        """The backbone's transformers config (vocab size, context length, special tokens)."""
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.side.device

    @property
    def dtype(self) -> torch.dtype:
        return self.side.dtype

    @property
    def name_or_path(self) -> str | None:
        return self.base_name_or_path

    def tie_weights(self, *args, **kwargs) -> None:
        """Nothing to tie: the backbone's own tied weights are untouched."""

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # the frozen backbone never runs dropout
        return self

    def side_parameters(self) -> dict[str, nn.Parameter]:
        """Everything that trains (and is saved): the side network and, for classification, the score head."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("backbone.")}

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """AdamW parameter groups for `eval.train.train(param_groups=...)` (every trainer uses these):
        the side parameters at `lr`; the paper mix's alpha at `alpha_lr * lr` and without weight
        decay (decay would pull the mix towards the side path, not towards small weights)."""
        alpha = self.side.alpha
        rest = [p for p in self.side_parameters().values() if p is not alpha and p.requires_grad]
        groups = [{"params": rest}]
        if alpha is not None and alpha.requires_grad:
            groups.append({"params": [alpha], "lr": lr * self.qst_config.alpha_lr, "weight_decay": 0.0})
        return groups

    # --- the backbone pass ---------------------------------------------------------------------

    def enable_feature_cache(self, root: str | os.PathLike | None = None) -> BackboneFeatureCache:
        """Cache the backbone's hidden states of training batches on disk (see `qst.cache`)."""
        key = backbone_fingerprint(self.backbone, self.base_name_or_path, self.quantize)
        self.feature_cache = BackboneFeatureCache(root or default_cache_root(), key)
        return self.feature_cache

    def disable_feature_cache(self) -> None:
        self.feature_cache = None

    def backbone_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, cache: Any = None,
                          use_cache: bool = False) -> BackboneFeatures:
        """h_0 .. h_N and the LM head's input, computed without autograd (or read from the feature cache)."""
        cacheable = (self.feature_cache is not None and self.training and cache is None and not use_cache
                     and position_ids is None)
        if cacheable:
            hit = self.feature_cache.load(input_ids, attention_mask)
            if hit is not None:
                device = self.device
                return BackboneFeatures(tuple(h.to(device) for h in hit.hidden_states), hit.last.to(device))
        kwargs: dict[str, Any] = dict(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                                      use_cache=use_cache, return_dict=True)
        if cache is not None:
            kwargs[self._cache_kwarg] = cache
        if position_ids is not None and self._takes_position_ids:
            kwargs["position_ids"] = position_ids
        with torch.no_grad():
            out = self.backbone.base_model(**kwargs)
        features = BackboneFeatures(
            hidden_states=tuple(out.hidden_states), last=out.last_hidden_state,
            cache=out.get(self._cache_kwarg) if use_cache else None,
        )
        if cacheable:
            self.feature_cache.store(input_ids, attention_mask, features)
        return features

    def side_states(self, features: BackboneFeatures) -> list[torch.Tensor]:
        """[h_0, h_{l+1} for each side layer l]."""
        return [features.hidden_states[0]] + [features.hidden_states[i + 1] for i in self.side_layer_indices]

    def mixed_state(self, input_ids, attention_mask=None, position_ids=None, cache: QSTCache | None = None,
                    use_cache: bool = False, select: torch.Tensor | None = None) -> tuple[torch.Tensor, QSTCache | None]:
        """The output mix (see `SideNetwork.forward`): [B, S, d_out] (or [n, d_out] at the positions
        where `select`, bool [B, S], is True), and the updated cache."""
        if input_ids is None:
            raise UserInputError("QST models take input_ids (inputs_embeds is not supported)")
        if use_cache and cache is None:
            cache = QSTCache()
        features = self.backbone_features(input_ids, attention_mask, position_ids,
                                          cache.backbone if cache is not None else None, use_cache)
        if cache is not None and use_cache:
            cache.backbone = features.cache
        mixed = self.side(self.side_states(features), features.last, attention_mask, position_ids,
                          cache.side if (cache is not None and use_cache) else None, select)
        return mixed, (cache if use_cache else None)

    # --- save / load ---------------------------------------------------------------------------

    def _extra_config(self) -> dict[str, Any]:
        return {}

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write `qst_config.json` and `side_network.safetensors` (nothing of the backbone)."""
        from safetensors.torch import save

        from eval.io import atomic_write_bytes, write_json

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().cpu().contiguous().clone() for n, p in self.side_parameters().items()}
        atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
        write_json(out / CONFIG_NAME, {
            "format": "slimtune-qst", "version": FORMAT_VERSION, "task": self.task,
            "base_model_name_or_path": self.base_name_or_path, "quantize": self.quantize,
            "qst": self.qst_config.to_dict(), "backbone": dataclasses.asdict(self.backbone_spec),
            "side_block": dataclasses.asdict(self.side.spec), **self._extra_config(),
        })
        self._write_card(out)

    def _write_card(self, out: Path) -> None:
        """README.md: what the side network is, on which backbone, and the one call that loads it."""
        from eval.model_card import write_model_card

        card = dict(getattr(self, "slimtune_card", None) or {})
        trainable = sum(p.numel() for p in self.side_parameters().values())
        write_model_card(
            out, title=f"QST side network ({self.task}) for {self.base_name_or_path}", tags=["qst", "side-tuning"],
            base_model=self.base_name_or_path, pipeline_tag="text-generation" if self.task == "causal_lm" else None,
            method="Quantized Side Tuning: a trainable side network on a frozen "
            f"{self.quantize or 'unquantized'} backbone, mixed into the input of its frozen LM head. "
            "This directory holds the side network only; the backbone is loaded from its own id",
            budget=card.pop("budget", None) or f"{trainable:,} trainable parameters (the side network)",
            settings={"quantize": self.quantize, **self.qst_config.to_dict(), **card.pop("settings", {})},
            load=f"from qst import {type(self).__name__}\n"
            f"model = {type(self).__name__}.from_pretrained(DIR)  # loads backbone {self.base_name_or_path!r} "
            f"({self.quantize or 'unquantized'}) + this side network\n"
            f"# or on another copy of the backbone: {type(self).__name__}.from_pretrained(DIR, base=PATH_OR_ID)",
            **card,
        )

    @classmethod
    def from_base(cls, base, config: QSTConfig | None = None, quantize: str | None = "nf4", *,
                  base_name_or_path: str | None = None, dtype=None, device="cpu", **kwargs):
        """Wrap a backbone: `base` is "ref-lm", a path or hub id (loaded with `quantize`, default
        NF4) or an already loaded transformers causal LM (used as it is: its own quantization, if
        any, is recorded and `quantize` is ignored)."""
        config = config or QSTConfig()
        backbone, tokenizer, name, quant = _load_backbone(base, quantize, dtype, device)
        model = cls(backbone, config, base_name_or_path=base_name_or_path or name, quantize=quant,
                    tokenizer=tokenizer, **kwargs)
        if config.side_init == "pruned":
            init_side_from_pruned_backbone(model.side, backbone, model.side_layer_indices)
        return model

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base=None, *, dtype=None, device="cpu"):
        """Load a saved side network onto its backbone (`base`, or the one named in its config)."""
        from eval.io import load_named_tensors_into, read_json

        directory = Path(directory)
        saved = read_json(directory / CONFIG_NAME, "QST config")
        if saved.get("format") != "slimtune-qst" or saved.get("task") != cls.task:
            raise UserInputError(
                f"{directory / CONFIG_NAME} holds a {saved.get('format')}/{saved.get('task')} model; "
                f"expected slimtune-qst/{cls.task} ({cls.__name__})"
            )
        if base is None:
            base = saved["base_model_name_or_path"]
            if not base:
                raise UserInputError(f"{directory / CONFIG_NAME} names no backbone; pass base=...")
        backbone, tokenizer, name, quant = _load_backbone(base, saved["quantize"], dtype, device)
        spec = inspect_backbone(backbone)
        expected = saved["backbone"]
        if dataclasses.asdict(spec) != expected:
            diff = {k: (expected.get(k), v) for k, v in dataclasses.asdict(spec).items() if expected.get(k) != v}
            raise UserInputError(
                f"the side network in {directory} was trained on a different backbone: "
                + ", ".join(f"{k} saved {a!r} vs loaded {b!r}" for k, (a, b) in diff.items())
            )
        model = cls(backbone, QSTConfig.from_dict(saved["qst"]), base_name_or_path=saved["base_model_name_or_path"] or name,
                    quantize=quant, block_spec=SideBlockSpec(**saved["side_block"]), backbone_spec=spec,
                    tokenizer=tokenizer, **cls._init_kwargs_from_saved(saved))
        load_named_tensors_into(model.side_parameters(), directory / WEIGHTS_NAME, "saved side network")
        return model

    @classmethod
    def _init_kwargs_from_saved(cls, saved: dict[str, Any]) -> dict[str, Any]:
        return {}


def _load_backbone(base, quantize, dtype, device):
    """(model, tokenizer or None, name or path, quantization actually in use)."""
    if isinstance(base, nn.Module):
        config = getattr(base, "config", None)
        if config is None:
            raise UserInputError(f"QST needs a transformers decoder-only causal LM, got {type(base).__name__}")
        return base, None, getattr(config, "_name_or_path", None) or None, _detect_quantization(base)
    if not isinstance(base, (str, os.PathLike)):
        raise UserInputError(f"base must be a model name, a path or a loaded model, got {type(base).__name__}")
    from eval.models import load_causal_lm

    model, tokenizer = load_causal_lm(os.fspath(base), quantize=quantize, dtype=dtype, device=device)
    return model, tokenizer, os.fspath(base), quantize


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; label -100 is ignored (prompt and padding tokens)."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


class QSTForCausalLM(_QSTModel, GenerationMixin):
    """A frozen causal LM with a QST side network mixed into the input of its frozen LM head."""

    task = "causal_lm"
    main_input_name = "input_ids"

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    @property
    def generation_config(self):
        from transformers import GenerationConfig

        gc = getattr(self.backbone, "generation_config", None)
        return gc if gc is not None else GenerationConfig.from_model_config(self.backbone.config)

    def can_generate(self) -> bool:
        return True

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, cache=None,
                use_cache: bool = False, past_key_values=None, logits_to_keep: int = 0, **kwargs):
        """`.loss` (when `labels`: [B, S], -100 ignored), `.logits` [B, S, vocab] and, with
        `use_cache=True`, `.cache` (pass it back with the next tokens).

        In training mode with `labels`, only labelled positions reach the LM head and `.logits`
        is None (the loss is the same; the [B, S, vocab] logits are never built)."""
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = cache if cache is not None else past_key_values
        generation_cache = cache if isinstance(cache, QSTGenerationCache) else None
        if generation_cache is not None:  # generate's: the backbone's DynamicCache carrying the side's
            cache = QSTCache(backbone=generation_cache, side=generation_cache.side)
            use_cache = True
        head = self.lm_head
        if labels is not None and self.training:
            # Training: the output mix and the vocabulary projection only at the positions that
            # predict a label ([n, d_out] -> [n, vocab] instead of [B, S, vocab]; task batches
            # label a few answer tokens per example). Same loss; `.logits` is None.
            targets = labels[:, 1:]
            keep = targets != -100  # [B, S - 1]: position s predicts token s + 1
            predicts = torch.cat([keep, keep.new_zeros(keep.shape[0], 1)], dim=1)  # [B, S]
            mixed, cache = self.mixed_state(input_ids, attention_mask, position_ids, cache, use_cache, predicts)
            logits = head(mixed.to(head.weight.device, head.weight.dtype))
            loss = F.cross_entropy(logits.float(), targets[keep])
            return CausalLMOutputWithPast(loss=loss, logits=None, cache=cache)
        mixed, cache = self.mixed_state(input_ids, attention_mask, position_ids, cache, use_cache)
        if logits_to_keep:
            mixed = mixed[:, -logits_to_keep:]
        logits = head(mixed.to(head.weight.device, head.weight.dtype))
        loss = _causal_lm_loss(logits, labels.to(logits.device)) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=generation_cache or cache)

    # --- generation: transformers' GenerationMixin drives the decoding -------------------------

    _supports_cache_class = True
    _is_stateful = False

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=True, **kwargs):
        """Each step's inputs: the new token(s) once the caches hold the prefix, with left-padding-aware
        positions (the same ones the backbone's own generation uses)."""
        position_ids = None
        if attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        past = cache.get_seq_length() if (use_cache and cache is not None) else 0
        if past:
            input_ids, position_ids = input_ids[:, past:], None if position_ids is None else position_ids[:, past:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "cache": cache if use_cache else None, "use_cache": use_cache, "logits_to_keep": 1}

    def get_experts_implementation(self) -> dict:
        get = getattr(self.backbone, "get_experts_implementation", None)
        return get() if get is not None else {}

    def set_experts_implementation(self, implementation) -> None:
        self.backbone.set_experts_implementation(implementation)

    def _supports_default_dynamic_cache(self) -> bool:
        return False  # generate() below brings the cache: backbone and side network in one object

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config=None, logits_processor=None,
                 stopping_criteria=None, **kwargs):
        """`transformers.GenerationMixin.generate` (greedy, sampling, beam search, streamers, logits
        processors, stopping criteria, `return_dict_in_generate`, ...) over the backbone's and the
        side network's key/value caches, held together in one `QSTGenerationCache`.

        Greedy decoding with `use_cache=True` gives the same tokens as without caches."""
        from transformers import GenerationMixin

        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if input_ids is None:
            raise UserInputError("generate needs input_ids [batch, prompt length]")
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(generation_config or self.generation_config, "use_cache", True)
        kwargs["use_cache"] = bool(use_cache)
        if kwargs.get("past_key_values") is not None:  # the name before transformers 5.x's `cache`
            kwargs["cache"] = kwargs.pop("past_key_values")
        if use_cache and kwargs.get("cache") is None:
            kwargs["cache"] = QSTGenerationCache(self.backbone.config)
        elif kwargs.get("cache") is not None and not isinstance(kwargs["cache"], QSTGenerationCache):
            raise UserInputError("QST generate keeps its own caches; pass cache=QSTGenerationCache(config) or none")
        was_training = self.training
        self.eval()
        try:
            return GenerationMixin.generate(self, input_ids, generation_config=generation_config,
                                            logits_processor=logits_processor, stopping_criteria=stopping_criteria,
                                            **kwargs)
        finally:
            self.train(was_training)


class QSTGenerationCache(DynamicCache):
    """The generation cache of `QSTForCausalLM.generate`: the backbone's `DynamicCache` (the
    backbone reads and writes it as its `past_key_values`) plus the side network's keys and values
    (`.side`), reordered together by beam search (`reorder_cache`) and by the batch expansion and
    selection of other decoding modes."""

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.side = SideKVCache()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self.side.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self.side.keys:
            batch = next(iter(self.side.keys.values())).shape[0]
            device = next(iter(self.side.keys.values())).device
            self.side.reorder(torch.arange(batch, device=device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self.side.reorder(indices)

    def crop(self, max_length: int):
        raise NotImplementedError("QST generation does not crop its caches (assisted decoding is not supported)")


class QSTForSequenceClassification(_QSTModel):
    """The same side path; a fresh trainable score head reads the mixed state at the last real token."""

    task = "sequence_classification"

    def __init__(self, backbone: nn.Module, config: QSTConfig, *, num_labels: int = 2, **kwargs):
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise UserInputError(f"num_labels must be an integer >= 2, got {num_labels!r}")
        super().__init__(backbone, config, **kwargs)
        self.num_labels = num_labels
        self.score = nn.Linear(self.backbone_spec.head_input_size, num_labels, bias=False).to(self.device)

    def _extra_config(self) -> dict[str, Any]:
        return {"num_labels": self.num_labels}

    @classmethod
    def _init_kwargs_from_saved(cls, saved: dict[str, Any]) -> dict[str, Any]:
        return {"num_labels": int(saved["num_labels"])}

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, **kwargs):
        """`.logits` [B, num_labels] and, with `labels` [B], `.loss` (cross-entropy)."""
        from transformers.modeling_outputs import SequenceClassifierOutputWithPast

        mixed, _ = self.mixed_state(input_ids, attention_mask, position_ids)
        if attention_mask is None:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
        else:  # index of the last real token (works for left and right padding)
            index = torch.arange(input_ids.shape[1], device=input_ids.device)
            last = (attention_mask.bool() * index).argmax(dim=-1)
        pooled = mixed[torch.arange(mixed.shape[0], device=mixed.device), last]  # [B, d_out]
        logits = self.score(pooled.to(self.score.weight.dtype))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)
