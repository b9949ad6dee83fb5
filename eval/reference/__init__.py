"""The embedded default: small reference models built here from data every machine has.

- `ref-lm` (`eval.reference.lm`): a LLaMA-architecture causal LM pretrained on real text
  (`eval.reference.corpus`), with a byte-level BPE tokenizer trained on the same text.
- `ref-vit` (`eval.reference.vit`): a small ViT trained on real images.
- the suite's downstream tasks (`eval.reference.tasks`), generated from the same corpus and
  served by the harness (`eval.tasks`).

`reference_path(kind)` returns a model's directory: the shipped weights, verified; it builds
into the cache (`eval.reference.common`) only when asked (`rebuild=True`) or for tiny test models.
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
    log,
    recipe_hash,
    remove_stale_temporaries,
)
from eval.reference.corpus import SPLITS, Document, reference_corpus, split_of, stdlib_dir
from eval.reference.lm import LMRecipe, build_reference_lm, lm_recipe, unigram_perplexity
from eval.reference.shipped import verified_shipped_for
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
    """The directory of reference model `kind` ("lm" or "vit").

    Which directory, in this order (the rule is also in `eval.reference.shipped`):
    1. `rebuild=True`: train from the recipe into the cache (resuming an interrupted build).
    2. `tiny=True`: the cached tiny build, built in seconds on first use (`build=False`
       raises instead); for tests of the mechanics only.
    3. The shipped model (`eval.reference.shipped`), when every file matches its checksum and
       its card's recipe is the current recipe: the same weights on every machine.
    4. A finished build of exactly this recipe in the cache, which only `rebuild=True` (i.e.
       `slimtune reference KIND --rebuild`) makes: used, with a note, when the shipped model
       cannot be (damaged, or another recipe such as another seed).
    5. Otherwise the shipped model's `UserInputError` (which file, and how to rebuild): fail
       closed, since a silent build would train for an hour and download the corpus wheels.
    """
    recipe = _recipe_for(kind, seed, tiny)
    final = reference_dir(kind, seed=seed, tiny=tiny)
    if rebuild or tiny:
        return _cached_or_built(kind, final, seed=seed, tiny=tiny, rebuild=rebuild, build=build or rebuild)
    try:
        return verified_shipped_for(kind, dataclasses.asdict(recipe), flags=f" --seed {seed}" if seed else "")
    except UserInputError as why_not_shipped:
        if not is_finished(final):
            raise
        log(f"using the rebuilt ref-{kind} in {final}: {why_not_shipped}")
        verify_safetensors(final / "model.safetensors", f"cached ref-{kind} weights (rebuild with --rebuild)")
        return final


def _cached_or_built(kind: str, final: Path, *, seed: int, tiny: bool, rebuild: bool, build: bool) -> Path:
    """The finished build in `final` (unless `rebuild`), else build it there under the lock."""
    if is_finished(final) and not rebuild:
        verify_safetensors(final / "model.safetensors", f"cached ref-{kind} weights (rebuild with --rebuild)")
        return final
    if not build:
        raise UserInputError(f"reference model ref-{kind}{'-tiny' if tiny else ''} is not built yet (looked in "
                             f"{final}); run `slimtune reference {kind}{' --tiny' if tiny else ''}` to build it")
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
