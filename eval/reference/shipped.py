"""Reference models that ship with the suite, as package data under `eval/reference/shipped/`.

A shipped model is the directory a build wrote (weights in safetensors, tokenizer or image
processor, card, corpus manifest) plus `checksums.json`, the SHA-256 of every other file,
written last. `reference_path` returns it when its card's recipe is the current recipe, after
checking every file against its checksum, so a fresh install needs no training; a recipe that
changed falls back to building into the cache. `slimtune reference KIND --rebuild` retrains
from the recipe and `compare_with_shipped` says how the result compares.
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


def verify_shipped(kind: str) -> Path:
    """The shipped directory of `kind`, after checking each file against `checksums.json`."""
    folder = shipped_dir(kind)
    how = (f"reinstall slimtune, or retrain it with `slimtune reference {kind} --rebuild` "
           "(the rebuilt model goes to the cache)")
    for name, expected in read_json(folder / CHECKSUMS_NAME, what=f"shipped ref-{kind} checksums").items():
        path = folder / name
        if not path.is_file():
            raise UserInputError(f"the shipped ref-{kind} file {path} is missing; {how}")
        if _sha256(path) != expected:
            raise UserInputError(f"the shipped ref-{kind} file {path} is corrupted (its SHA-256 does not match "
                                 f"{CHECKSUMS_NAME}); {how}")
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
