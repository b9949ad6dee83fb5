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

This file holds the model classes (save / load included); `qst.backbone` inspects and loads the
backbone, `qst.side_init` sizes the side network and starts it from a pruned backbone, and
`qst.generation` is the glue to transformers' `GenerationMixin`.
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

from eval.bnb import avoid_bnb_cpu_repacking_failure, quantization_of
from eval.errors import UserInputError
from qst.backbone import BackboneSpec, inspect_backbone, load_backbone, module_device
from qst.cache import (
    BackboneFeatureCache,
    BackboneFeatures,
    backbone_fingerprint,
    default_cache_root,
)
from qst.config import QSTConfig
from qst.generation import QSTCache, QSTGenerationCache, QSTGenerationMixin
from qst.layer import SideBlockSpec, SideNetwork
from qst.side_init import (
    init_side_from_pruned_backbone,
    pruned_block_spec,
    random_block_spec,
    side_layer_indices,
)

CONFIG_NAME = "qst_config.json"
WEIGHTS_NAME = "side_network.safetensors"
FORMAT_VERSION = 1


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
        ).to(module_device(backbone))
        self.base_name_or_path = base_name_or_path or getattr(backbone.config, "_name_or_path", None) or None
        self.quantize = quantize if quantize is not None else quantization_of(backbone)
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
        """AdamW parameter groups for `eval.train.train(param_groups=...)`: every side parameter at
        `lr`, the paper mix's alpha offset without weight decay (decay would pull the mix's
        weight, not a weight of the network). alpha's own speed-up is in its parametrisation
        (`SideNetwork.alpha`), so a plain optimizer over `parameters()` trains QST as well."""
        offset = self.side.alpha_offset
        rest = [p for p in self.side_parameters().values() if p is not offset and p.requires_grad]
        groups = [{"params": rest}]
        if offset is not None and offset.requires_grad:
            groups.append({"params": [offset], "weight_decay": 0.0})
        return groups

    # --- the backbone pass ---------------------------------------------------------------------

    def enable_feature_cache(self, root: str | os.PathLike | None = None) -> BackboneFeatureCache:
        """Cache the backbone's hidden states of training batches on disk (see `qst.cache`)."""
        key = backbone_fingerprint(self.backbone, self.base_name_or_path, self.quantize)
        self.feature_cache = BackboneFeatureCache(root or default_cache_root(), key)
        return self.feature_cache

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
        backbone, tokenizer, name, quant = load_backbone(base, quantize, dtype, device)
        model = cls(backbone, config, base_name_or_path=base_name_or_path or name, quantize=quant,
                    tokenizer=tokenizer, **kwargs)
        if config.side_init == "pruned":
            init_side_from_pruned_backbone(model.side, backbone, model.side_layer_indices)
        return model

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, base=None, *, dtype=None, device="cpu"):
        """Load a saved side network onto its backbone (`base`, or the one named in its config)."""
        from eval.io import read_json

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() and (directory / "model.safetensors").is_file():
            raise UserInputError(
                f"{directory} holds a bare model.safetensors and no {CONFIG_NAME}: it was written by transformers' "
                "plain Trainer, which saves only transformers and PEFT models in their own format. Train with "
                "qst.QSTTrainer (Trainer with QST's save and resume), or call model.save_pretrained(DIR)")
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
        backbone, tokenizer, name, quant = load_backbone(base, saved["quantize"], dtype, device)
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
        model.load_side_weights(directory / WEIGHTS_NAME)
        return model

    def load_side_weights(self, path: str | os.PathLike) -> None:
        """Copy a saved side network's weights into this model. Files written before alpha's
        parametrisation hold alpha itself (`side.alpha`); it becomes the offset
        (alpha - alpha_init) / alpha_lr."""
        from eval.io import load_named_tensors_into, verify_safetensors

        params = self.side_parameters()
        if "side.alpha_offset" in params and "side.alpha" in verify_safetensors(path, "saved side network"):
            offset = params.pop("side.alpha_offset")
            params["side.alpha"] = alpha = torch.empty_like(offset)
            load_named_tensors_into(params, path, "saved side network")
            with torch.no_grad():
                offset.copy_((alpha - self.qst_config.alpha_init) / self.qst_config.alpha_lr)
            return
        load_named_tensors_into(params, path, "saved side network")

    @classmethod
    def _init_kwargs_from_saved(cls, saved: dict[str, Any]) -> dict[str, Any]:
        return {}


def _causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; label -100 is ignored (prompt and padding tokens)."""
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


class QSTForCausalLM(_QSTModel, QSTGenerationMixin):
    """A frozen causal LM with a QST side network mixed into the input of its frozen LM head."""

    task = "causal_lm"
    main_input_name = "input_ids"

    @property
    def lm_head(self) -> nn.Module:
        return self.backbone.get_output_embeddings()

    def forward(self, input_ids=None, attention_mask=None, labels=None, position_ids=None, cache=None,
                use_cache: bool = False, past_key_values=None, logits_to_keep: int = 0, **kwargs):
        """`.loss` (when `labels`: [B, S], -100 ignored), `.logits` [B, S, vocab] and, with
        `use_cache=True`, `.cache` (pass it back with the next tokens).

        In training mode with `labels`, only labelled positions reach the LM head and `.logits`
        is None (the loss is the same; the [B, S, vocab] logits are never built)."""
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
            return _causal_lm_output(loss=loss, logits=None, cache=cache)
        mixed, cache = self.mixed_state(input_ids, attention_mask, position_ids, cache, use_cache)
        if logits_to_keep:
            mixed = mixed[:, -logits_to_keep:]
        logits = head(mixed.to(head.weight.device, head.weight.dtype))
        loss = _causal_lm_loss(logits, labels.to(logits.device)) if labels is not None else None
        return _causal_lm_output(loss=loss, logits=logits, cache=generation_cache or cache)


def _causal_lm_output(loss, logits, cache):
    """`CausalLMOutputWithPast` with the cache under this transformers' name for it: `cache` in
    the newer 5.x releases, `past_key_values` in older ones (5.17, the GPU machine's)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    name = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{name: cache})


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
