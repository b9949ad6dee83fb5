"""Shared mechanics of the reference models: the cache, its lock, recipe hashing, and the
pieces of a training recipe (warm-up + cosine schedule, AdamW groups) that ref-lm and ref-vit share.

Models are cached under `$SLIMTUNE_CACHE` (default `~/.cache/slimtune`) in a directory named by
a hash of their recipe (so a recipe change rebuilds), written atomically with a
`reference_card.json` as the last file (the completion mark), and built under a file lock so
two processes never build the same model at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from eval.errors import UserInputError

CARD_NAME = "reference_card.json"

def validate_recipe(recipe) -> None:
    """Integers are positive (seed, shift and warm-up non-negative), rates positive."""
    for field in dataclasses.fields(recipe):
        value = getattr(recipe, field.name)
        if value is None:
            continue
        allow_zero = field.name in ("seed", "max_shift", "warmup_steps", "warmup_epochs", "weight_decay", "min_lr")
        if isinstance(value, (int, float)) and (value < 0 or (value == 0 and not allow_zero)):
            raise UserInputError(f"{type(recipe).__name__}.{field.name}={value} must be "
                                 f"{'>= 0' if allow_zero else 'positive'}")




def recipe_hash(recipe) -> str:
    """12 hex digits naming a recipe; the Python minor version is part of it (the stdlib differs)."""
    key = {"recipe": type(recipe).__name__, **dataclasses.asdict(recipe),
           "python": ".".join(platform.python_version_tuple()[:2])}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("SLIMTUNE_CACHE") or Path.home() / ".cache" / "slimtune").expanduser()




def is_finished(model_dir: Path) -> bool:
    """A build is finished when its card (written last, inside an atomic rename) is there."""
    return (Path(model_dir) / CARD_NAME).is_file()



@contextlib.contextmanager
def build_lock(final: Path) -> Iterator[None]:
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.parent / f".{final.name}.lock"
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # Say so: a reference build can take an hour, and a silent wait looks like a hang.
            log(f"another process is building {final.name} (it holds {path}); waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we crash
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def remove_stale_temporaries(final: Path) -> None:
    # Left by a build that was killed (SIGKILL skips atomic_directory's clean-up). Safe: we
    # hold the lock, so no live build of this recipe owns them.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Train on one torch thread: the result then does not depend on the core count, and on a
    shared machine one thread is faster than two that keep waiting for each other."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versions() -> dict:
    import tokenizers
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to `peak`, then cosine decay to `floor` at `total` steps."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))


def decay_groups(model, weight_decay: float) -> list[dict]:
    """nanoGPT's AdamW groups: decay matrices only; norms and biases are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def adamw(model, lr: float, weight_decay: float):
    import torch

    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
