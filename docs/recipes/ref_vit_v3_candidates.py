"""Build one candidate recipe of ref-vit v3 into the cache and print its directory.

The candidates differ in model width and epochs (images seen per parameter), the lever the
ref-lm measurements point to. Which one became the default was chosen on the validation
typefaces (`ref_vit_v3_select.py`), never on test. Resumable: a killed build continues from its
last checkpoint when the same command runs again.

    python docs/recipes/ref_vit_v3_candidates.py h96-e12
"""

from __future__ import annotations

import argparse
import dataclasses

from eval.reference.common import build_lock, cache_root, is_finished, recipe_hash
from eval.reference.vit import ViTRecipe, build_reference_vit

CANDIDATES = {
    # hidden 96, MLP 192 (324 k parameters), 12 epochs of 28,200 images: 1.0 image seen per
    # parameter (v2: 0.34).
    "h96-e12": dict(hidden_size=96, intermediate_size=192, epochs=12),
    # hidden 64, MLP 128 (151 k parameters), 24 epochs: 4.5 images seen per parameter.
    "h64-e24": dict(hidden_size=64, intermediate_size=128, epochs=24),
}
# The budget was set by the shared machine: v2's width for 40 epochs ran at 3 steps/s (98 min
# for 17,640 steps), hidden 96 for 20 epochs at 1.7 and hidden 64 for 32 at 3.3 steps/s (87 and
# 70 min); those were stopped and these started, to finish within the hour available.


def candidate_recipe(name: str) -> ViTRecipe:
    return dataclasses.replace(ViTRecipe(), **CANDIDATES[name])


def candidate_dir(name: str):
    return cache_root() / f"ref-vit-candidate-{name}-{recipe_hash(candidate_recipe(name))}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("candidate", choices=sorted(CANDIDATES))
    args = parser.parse_args()
    final = candidate_dir(args.candidate)
    with build_lock(final):
        if not is_finished(final):
            build_reference_vit(final, recipe=candidate_recipe(args.candidate))
    print(final)


if __name__ == "__main__":
    main()
