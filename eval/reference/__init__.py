"""The embedded default: small reference models built here from data every machine has.

- `ref-lm` (`eval.reference.lm`): a LLaMA-architecture causal LM pretrained on real text
  (`eval.reference.corpus`), with a byte-level BPE tokenizer trained on the same text.
- `ref-vit` (`eval.reference.vit`): a small ViT trained on real images.
- the suite's downstream tasks (`eval.reference.tasks`), generated from the same corpus and
  served by the harness (`eval.tasks`).

`reference_path(kind)` returns a model's directory, building it once into the cache
(`eval.reference.common`) when needed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from eval.errors import UserInputError
from eval.io import read_json, verify_safetensors
from eval.reference.common import (
    CARD_NAME,
    build_lock,
    cache_root,
    is_finished,
    recipe_hash,
    remove_stale_temporaries,
)
from eval.reference.corpus import SPLITS, Document, reference_corpus, split_of, stdlib_dir
from eval.reference.lm import LMRecipe, build_reference_lm, lm_recipe, unigram_perplexity
from eval.reference.shipped import shipped_recipe, verify_shipped
from eval.reference.vit import (
    GLYPH_CLASSES,
    ViTRecipe,
    build_reference_vit,
    reference_glyph_images,
    reference_image_folder,
    reference_image_split,
    reference_vit_split,
    vit_image_processor,
    vit_recipe,
)

KINDS = ("lm", "vit")


def _recipe_for(kind: str, seed: int, tiny: bool) -> LMRecipe | ViTRecipe:
    if kind not in KINDS:
        raise UserInputError(f"unknown reference model {kind!r}; expected one of {', '.join(KINDS)}")
    return lm_recipe(seed=seed, tiny=tiny) if kind == "lm" else vit_recipe(seed=seed, tiny=tiny)


def reference_dir(kind: str, seed: int = 0, tiny: bool = False) -> Path:
    """Where the reference model for this recipe lives (or would live) in the cache."""
    recipe = _recipe_for(kind, seed, tiny)
    return cache_root() / f"ref-{kind}{'-tiny' if tiny else ''}-{recipe_hash(recipe)}"


def reference_path(kind: str, build: bool = True, *, seed: int = 0, tiny: bool = False,
                   rebuild: bool = False) -> Path:
    """The directory of reference model `kind` ("lm" or "vit"), built on first use.

    `build=False` raises `UserInputError` when it is not built yet. `tiny=True` is a
    seconds-long build of a very small model, for tests of the mechanics only.
    `rebuild=True` builds again even if a finished one is cached. The default recipes ship
    with the suite (`eval.reference.shipped`): their directory is returned at once.
    """
    recipe = _recipe_for(kind, seed, tiny)
    if not rebuild and not tiny and shipped_recipe(kind) == dataclasses.asdict(recipe):
        return verify_shipped(kind)  # the weights that ship with the suite: no training
    final = reference_dir(kind, seed=seed, tiny=tiny)
    if is_finished(final) and not rebuild:
        verify_safetensors(final / "model.safetensors", f"cached ref-{kind} weights (rebuild with --rebuild)")
        return final
    if not build:
        raise UserInputError(f"reference model ref-{kind} is not built yet (looked in {final}); "
                             f"run `slimtune reference {kind}` to build it")
    with build_lock(final):
        if is_finished(final) and not rebuild:
            return final  # another process built it while we waited for the lock
        remove_stale_temporaries(final)
        builder = build_reference_lm if kind == "lm" else build_reference_vit
        builder(final, seed=seed, tiny=tiny)
    return final


def reference_card(kind: str, *, seed: int = 0, tiny: bool = False) -> dict:
    """The card (corpus stats, metrics, build time) of a cached reference model (built if needed)."""
    return read_json(reference_path(kind, seed=seed, tiny=tiny) / CARD_NAME, what="reference card")


__all__ = [
    "CARD_NAME", "GLYPH_CLASSES", "KINDS", "SPLITS", "Document", "LMRecipe", "ViTRecipe", "build_reference_lm",
    "build_reference_vit", "cache_root", "is_finished", "lm_recipe", "recipe_hash",
    "reference_card", "reference_corpus", "reference_dir", "reference_glyph_images", "reference_image_folder",
    "reference_image_split", "reference_path", "reference_vit_split", "split_of", "stdlib_dir",
    "unigram_perplexity", "vit_image_processor", "vit_recipe",
]
