"""Reference models that ship with the suite, as package data under `eval/reference/shipped/`.

A shipped model is the directory a build wrote (weights in safetensors, tokenizer or image
processor, card, corpus manifest) plus `checksums.json`, the SHA-256 of every other file,
written last. `reference_path` returns it after checking every file against its checksum (the
card included) and then the card's recipe against the current recipe, so a fresh install needs
no training.

It fails closed: a missing `checksums.json`, a file that differs from its checksum (an edited
card is corruption, not a recipe change), or a card whose recipe is not the current recipe is
one `UserInputError` naming the file and saying how to rebuild. Nothing trains and nothing
downloads unless the user asks with `slimtune reference KIND --rebuild`, which retrains from the
recipe into the cache; `compare_with_shipped` says how the result compares.

A rebuild in the cache of exactly the current recipe is used only when the shipped model cannot
be (damaged, or the caller asks for another recipe such as another seed), with a note on
stderr; an intact shipped model always wins, so that `--model ref-lm` means the same weights on
every machine and a rebuild made to compare does not change later results.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from pathlib import Path

from eval.errors import UserInputError
from eval.io import atomic_directory, read_json, write_json
from eval.reference.common import CARD_NAME

SHIPPED_ROOT = Path(__file__).parent / "shipped"
CHECKSUMS_NAME = "checksums.json"
# What a rebuild is compared on, per kind: the card's headline held-out metric.
_HEADLINE = {"lm": "test_bits_per_byte", "vit": "test_accuracy"}


def shipped_dir(kind: str) -> Path:
    return SHIPPED_ROOT / f"ref-{kind}"


def shipped_recipe(kind: str) -> dict | None:
    """The recipe (as a dict) of the shipped model of `kind`, or None when none ships."""
    folder = shipped_dir(kind)
    if not (folder / CHECKSUMS_NAME).is_file():
        return None
    return read_json(folder / CARD_NAME, what=f"shipped ref-{kind} card").get("recipe")


def how_to_rebuild(kind: str, flags: str = "") -> str:
    """The one sentence every shipped-model error ends with."""
    return (f"reinstall slimtune, or retrain it with `slimtune reference {kind}{flags} --rebuild` "
            "(about an hour for ref-lm on 2 cores; the rebuilt model goes to the cache, which is used whenever the shipped model cannot be)")


def verify_shipped(kind: str) -> Path:
    """The shipped directory of `kind`, after checking each file against `checksums.json`.

    A missing folder or checksum file, a missing file or a checksum mismatch is a `UserInputError`
    naming the file."""
    folder = shipped_dir(kind)
    how = how_to_rebuild(kind)
    checksums = folder / CHECKSUMS_NAME
    if not checksums.is_file():
        raise UserInputError(f"the shipped ref-{kind} has no checksum file ({checksums} is missing), so its weights "
                             f"cannot be trusted; {how}")
    expected_sums = read_json(checksums, what=f"shipped ref-{kind} checksums")
    if CARD_NAME not in expected_sums:  # the card holds the recipe: it must be covered too
        raise UserInputError(f"the shipped ref-{kind} checksums ({checksums}) do not cover {CARD_NAME}; {how}")
    for name, expected in expected_sums.items():
        path = folder / name
        if not path.is_file():
            raise UserInputError(f"the shipped ref-{kind} file {path} is missing; {how}")
        if _sha256(path) != expected:
            raise UserInputError(f"the shipped ref-{kind} file {path} is corrupted (its SHA-256 does not match "
                                 f"{CHECKSUMS_NAME}); {how}")
    return folder


def verified_shipped_for(kind: str, recipe: dict, flags: str = "") -> Path:
    """The shipped directory of `kind` when it is intact and its card's recipe is `recipe`.

    Checksums first, recipe second: an edited card is corruption, never a recipe change. A recipe
    that differs (the package and the code disagree, or the caller asks for a recipe that does
    not ship, e.g. another seed) is a `UserInputError` naming the card: nothing is built here.
    """
    folder = verify_shipped(kind)
    card = folder / CARD_NAME
    shipped = read_json(card, what=f"shipped ref-{kind} card").get("recipe")
    if shipped != recipe:
        differ = sorted(k for k in set(shipped or {}) | set(recipe) if (shipped or {}).get(k) != recipe.get(k))
        raise UserInputError(f"the shipped ref-{kind} ({card}) was built from another recipe than the one asked for "
                             f"(they differ in {', '.join(differ) or 'everything'}), and no rebuild of that recipe "
                             f"is in the cache; {how_to_rebuild(kind, flags)}")
    return folder


def ship(kind: str, built: str | Path) -> Path:
    """Copy a finished build into the package (for the suite's developers), checksums last."""
    built = Path(built)
    if not (built / CARD_NAME).is_file():
        raise UserInputError(f"{built} is not a finished ref-{kind} build (no {CARD_NAME}); expected the directory "
                             f"that `slimtune reference {kind}` printed")
    files = sorted(p for p in built.iterdir() if p.is_file())
    with atomic_directory(shipped_dir(kind)) as tmp:
        for path in files:
            shutil.copy2(path, tmp / path.name)
        write_json(tmp / CHECKSUMS_NAME, {p.name: _sha256(p) for p in files})
    return shipped_dir(kind)


def compare_with_shipped(kind: str, rebuilt: str | Path) -> dict | None:
    """How a rebuild compares with the shipped model: identical weights, and the relative
    difference of the headline held-out metric (bits per byte for ref-lm, top-1 for ref-vit)."""
    if shipped_recipe(kind) is None:
        return None
    rebuilt, folder = Path(rebuilt), shipped_dir(kind)
    metric = _HEADLINE[kind]
    new = read_json(rebuilt / CARD_NAME, what=f"rebuilt ref-{kind} card")[metric]
    old = read_json(folder / CARD_NAME, what=f"shipped ref-{kind} card")[metric]
    same_weights = _sha256(rebuilt / "model.safetensors") == _sha256(folder / "model.safetensors")
    return {"metric": metric, "shipped": old, "rebuilt": new,
            "relative_difference": abs(new - old) / abs(old) if old else math.inf,
            "bit_identical_weights": same_weights}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
