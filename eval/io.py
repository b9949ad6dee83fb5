"""Atomic file output: nothing half-written is ever left where a finished result belongs.

Writers put their output in a temporary sibling and rename it into place only when complete,
so an interrupted run leaves either the old result or none, never a partial one that a later
run (a cache lookup, a resume) would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
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


@contextlib.contextmanager
def atomic_contents(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden staging folder inside `out`; on success each entry moves into `out`
    (replacing an entry of the same name), on an exception the staging folder is removed.

    Unlike `atomic_directory`, `out` itself stays (with its marker and lock, see `OutputDir`),
    and entries of `out` that the writer does not produce are left alone.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        yield tmp
        for entry in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".json"):  # reports (JSON) last
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                old = out / f".{entry.name}.old-{os.getpid()}"
                os.replace(target, old)
                os.replace(entry, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

    path = Path(path)
    weights = load_safetensors(path, what)
    check_state_dict_match(params, weights, path, what)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


# ---------------------------------------------------------------------------------------------
# Safetensors files: read with errors that name the file


def verify_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, Any]:
    """Check that `path` is a complete safetensors file; return its header (name -> entry).

    Reads only the header: the declared tensors must fit their dtype x shape and together end
    exactly where the file ends, so a truncated or padded file (an interrupted copy or
    download) is a `UserInputError` naming the file. Bit flips inside the data are not seen.
    """
    from eval.errors import UserInputError

    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{what} not found: {path}")
    size = path.stat().st_size
    bad = f"{what} {path} is truncated or corrupt"
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise UserInputError(f"{bad} ({size} bytes, no safetensors header); delete it and write it again")
        n = int.from_bytes(prefix, "little")
        if n > size - 8:
            raise UserInputError(f"{bad} (header of {n} bytes in a {size}-byte file); delete it and write it again")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserInputError(f"{bad} (unreadable header: {e}); delete it and write it again") from e
    if not isinstance(header, dict):
        raise UserInputError(f"{bad} (header is not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            nbytes = math.prod(entry["shape"]) * _SAFETENSORS_BITS[entry["dtype"]] // 8
        except (KeyError, TypeError, ValueError) as e:
            raise UserInputError(f"{bad} (entry {name!r} is malformed: {e})") from e
        if stop - start != nbytes:
            raise UserInputError(f"{bad} (tensor {name!r} declares {stop - start} bytes for {nbytes})")
        end = max(end, stop)
    if 8 + n + end != size:
        raise UserInputError(f"{bad}: the header declares {8 + n + end} bytes, the file has {size}; "
                             "delete it and write it again")
    return {k: v for k, v in header.items() if k != "__metadata__"}


_SAFETENSORS_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "I16": 16, "U16": 16,
                     "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64}


def load_safetensors(path: str | os.PathLike, what: str = "weights file", device: str = "cpu") -> dict:
    """`safetensors.torch.load_file`, after `verify_safetensors`: a bad file's error names it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from eval.errors import UserInputError

    verify_safetensors(path, what)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as e:
        raise UserInputError(f"{what} {path} could not be read: {e}") from e


def check_state_dict_match(expected: dict, loaded: dict, path, what: str = "weights") -> None:
    """Names and shapes of `loaded` must be exactly those of `expected` (both name -> tensor);
    else a `UserInputError` naming the file and the missing / unexpected / mismatched tensors."""
    from eval.errors import UserInputError

    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(f"{k} {tuple(loaded[k].shape)} vs {tuple(expected[k].shape)}"
                        for k in set(expected) & set(loaded) if tuple(loaded[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        raise UserInputError(loading_mismatch_message(path, what, missing, unexpected, mismatched))


def loading_mismatch_message(path, what: str, missing, unexpected=(), mismatched=()) -> str:
    """One line: which tensors of `path` are missing / unexpected / of the wrong shape."""
    parts = [f"{label} {len(names)} ({', '.join(map(str, list(names)[:4]))}{', ...' if len(names) > 4 else ''})"
             for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
             if names]
    return f"{what} {path} does not match the model: {'; '.join(parts)}"


# ---------------------------------------------------------------------------------------------
# Output folders: one rule for every command's --out

OUTPUT_MARKER = ".slimtune-output.json"
KEPT: list[str] = []  # what interrupted runs kept, one line each (printed by the slimtune command)
_HELD: dict[Path, int] = {}  # output folders this process has claimed -> depth (re-entrant)


class OutputDir:
    """`with prepare_output_dir(out, "prune") as out:`: claim an output folder for one command.

    Accepted: a new path, an empty folder, or an earlier output of the same command (it holds
    the marker file naming the command, or the file `signature`). Refused with one
    `UserInputError`: an existing file, a folder holding anything else, a folder that another
    run is writing to (an `fcntl.flock` on the marker). The marker is written on entry, so an
    unwritable or full location fails before any work. On an exception, a folder that was new
    or empty is removed again if the run added nothing else to it; otherwise what it holds is
    kept and recorded in `KEPT`.
    """

    def __init__(self, path, command: str, signature: str | None = None):
        self.path = Path(path)
        self.command = command
        self.signature = signature
        self._fd: int | None = None
        self._created: list[Path] = []
        self._before: set[str] = set()

    def __enter__(self) -> Path:
        key = self.path.resolve()
        if key in _HELD:  # the same run claims it twice (a command and its pipeline)
            _HELD[key] += 1
            return self.path
        self._check_contents()
        self._create()
        self._lock_and_mark()
        _HELD[key] = 1
        return self.path

    def _refuse(self, what: str) -> None:
        from eval.errors import UserInputError

        raise UserInputError(f"--out {self.path} {what}, not an earlier {self.command} output; expected a new or "
                             "empty directory; choose another --out (nothing there was touched)")

    def _check_contents(self) -> None:
        if not self.path.exists():
            return
        if not self.path.is_dir():
            self._refuse("is an existing file")
        self._before = {p.name for p in self.path.iterdir()}
        marker = self.path / OUTPUT_MARKER
        if marker.is_file():
            try:
                owner = json.loads(marker.read_text(encoding="utf-8") or "{}").get("command")
            except (json.JSONDecodeError, AttributeError):
                owner = None
            if owner not in (None, self.command):
                self._refuse(f"is an earlier {owner} output")
            return
        if self._before and not (self.signature and self.signature in self._before):
            shown = ", ".join(sorted(self._before)[:3]) + (", ..." if len(self._before) > 3 else "")
            self._refuse(f"exists and holds other files ({shown})")

    def _create(self) -> None:
        missing = []
        for p in (self.path, *self.path.parents):
            if p.exists():
                break
            missing.append(p)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            _raise_write_error(e, self.path)
        self._created = missing  # deepest first

    def _lock_and_mark(self) -> None:
        import fcntl

        from eval.errors import UserInputError

        marker = self.path / OUTPUT_MARKER
        try:
            fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._undo()
            _raise_write_error(e, self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserInputError(f"--out {self.path}: another slimtune run is writing there now; wait for it to "
                                 "finish or choose another --out") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps({"command": self.command}) + "\n").encode())
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self._undo()
            _raise_write_error(e, self.path)
        self._fd = fd

    def __exit__(self, exc_type, exc, tb) -> None:
        key = self.path.resolve()
        if _HELD.get(key, 0) > 1:
            _HELD[key] -= 1
            return
        _HELD.pop(key, None)
        if exc_type is not None:
            added = sorted({p.name for p in self.path.iterdir()} - self._before - {OUTPUT_MARKER}) \
                if self.path.is_dir() else []
            if added:
                KEPT.append(f"kept {self.path} ({', '.join(added)})")
            elif OUTPUT_MARKER not in self._before:
                self._undo()
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def _undo(self) -> None:
        """Remove the marker and the folders this claim created (only if nothing else is there)."""
        with contextlib.suppress(OSError):
            if OUTPUT_MARKER not in self._before:
                (self.path / OUTPUT_MARKER).unlink(missing_ok=True)
            for p in self._created:
                p.rmdir()


def prepare_output_dir(path, command: str, signature: str | None = None) -> OutputDir:
    """The output-folder rule of every command (see `OutputDir`); use as a context manager."""
    return OutputDir(path, command, signature)


WRITE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENOTDIR: "a parent is a file, not a directory",
                errno.EISDIR: "is a directory", errno.EEXIST: "exists"}


def _raise_write_error(e: OSError, where) -> None:
    from eval.errors import UserInputError

    reason = WRITE_ERRNOS.get(e.errno, e.strerror or str(e))
    raise UserInputError(f"cannot write to {where}: {reason} ({e.filename or where}); "
                         "choose a writable --out with free space") from e


def write_failure_message(e: BaseException) -> str | None:
    """One line for a failed write (disk full, unwritable), from an OSError or safetensors'
    own I/O error; None when `e` is not one."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return f"cannot write {e.filename or 'the output'}: {WRITE_ERRNOS[e.errno]}"
    if type(e).__name__ == "SafetensorError":
        text = str(e)
        for code, reason in WRITE_ERRNOS.items():
            if f"code: {code}," in text:
                return f"cannot write a safetensors file: {reason} ({text.splitlines()[0][:200]})"
    return None
