"""Atomic file output: nothing half-written is ever left where a finished result belongs.

Writers put their output in a temporary sibling and rename it into place only when complete,
so an interrupted run leaves either the old result or none, never a partial one that a later
run (a cache lookup, a resume) would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces `final` in one rename.

    On an exception the temporary directory is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read a JSON file; a missing or malformed file raises `UserInputError` naming it."""
    from eval.errors import UserInputError

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserInputError(f"{what} {path} is not valid JSON ({e}); expected a JSON document") from e


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and paths show up in reports; make them plain JSON.
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if hasattr(obj, "tolist") and callable(obj.tolist):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_named_tensors_into(params: dict, path: str | os.PathLike, what: str) -> None:
    """Copy the tensors of a safetensors file into `params` (name -> tensor) in place.

    The file must hold exactly these names with these shapes; anything else is a
    `UserInputError` naming `what` (e.g. "training checkpoint") and the mismatch.
    """
    import torch
    from safetensors.torch import load_file

    from eval.errors import UserInputError

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    weights = load_file(path)
    if set(weights) != set(params):
        missing, extra = set(params) - set(weights), set(weights) - set(params)
        raise UserInputError(
            f"{what} {path} does not match the model's parameters "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]})"
        )
    with torch.no_grad():
        for name, p in params.items():
            if weights[name].shape != p.shape:
                raise UserInputError(f"{what} {path}: {name} has shape {tuple(weights[name].shape)}, "
                                     f"the model's is {tuple(p.shape)}")
            p.copy_(weights[name])
