"""Generation for QST causal LMs: transformers' `GenerationMixin` drives the decoding.

`QSTCache` holds the backbone's and the side network's key/value caches for a plain forward
with `use_cache=True`; `QSTGenerationCache` is the same pair in the one object `generate`
passes around (the backbone's `DynamicCache`, plus `.side`), so beam search and the batch
expansion of sampling reorder both together. `QSTGenerationMixin` gives `QSTForCausalLM` what
`GenerationMixin.generate` asks of a model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin

from eval.errors import UserInputError
from qst.layer import SideKVCache


@dataclasses.dataclass
class QSTCache:
    """Generation cache: the backbone's transformers cache and the side network's own."""

    backbone: Any = None
    side: SideKVCache = dataclasses.field(default_factory=SideKVCache)

    def get_seq_length(self) -> int:
        return self.side.length()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep batch rows `indices` of both caches (repeats allowed: one copy per row)."""
        self.backbone.batch_select_indices(indices)
        self.side.reorder(indices)


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


class QSTGenerationMixin(GenerationMixin):
    """`generate` and the hooks `GenerationMixin` calls, for a model with `.backbone` (the frozen
    causal LM) whose forward takes `cache=` and `logits_to_keep=`."""

    _supports_cache_class = True
    _is_stateful = False

    @property
    def generation_config(self):
        from transformers import GenerationConfig

        gc = getattr(self.backbone, "generation_config", None)
        return gc if gc is not None else GenerationConfig.from_model_config(self.backbone.config)

    def can_generate(self) -> bool:
        return True

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
