"""The reference text corpus: real text that every machine gets the same way.

- every `.py` file under the stdlib directory, except `site-packages` (third-party code),
  test suites and their data (`test`, `tests`, `idle_test` directories: fixtures, deliberately
  broken files, huge generated tables) and `encodings` (generated codec tables), and
  `pydoc_data/topics.py` itself (it is read as topics instead);
- each topic of `pydoc_data.topics.topics` as its own document, named `pydoc_data/topics/<key>`.
The split is by document: a hash of its name (its path relative to the stdlib directory)
puts it in train (90 %), validation (5 %) or test (5 %), the same on every machine.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import UserInputError

SPLITS = ("train", "validation", "test")
# Percent of documents per split, in SPLITS order.
SPLIT_PERCENT = (90, 5, 5)
_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings", "__pycache__"})
_TOPICS_FILE = "pydoc_data/topics.py"


@dataclass(frozen=True)
class Document:
    """One corpus document: `name` is its path relative to the stdlib directory."""

    name: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(name: str) -> str:
    """The split of a document, from a hash of its name (stable across machines and runs)."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    train, validation, _ = SPLIT_PERCENT
    if bucket < train:
        return "train"
    return "validation" if bucket < train + validation else "test"


@lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    root = stdlib_dir()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(rel.parts[:-1]) or rel.as_posix() == _TOPICS_FILE:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few files are deliberately in other encodings
        if text.strip():
            docs.append(Document(rel.as_posix(), text))
    if not docs:
        raise UserInputError(f"the reference corpus is empty: no readable .py files under {root}; "
                             "expected a CPython standard library directory")
    return tuple(docs + _topic_documents())


def _topic_documents() -> list[Document]:
    try:
        from pydoc_data.topics import topics  # a plain dict of str -> str (data, not pickle)
    except ImportError:
        return []
    return [Document(f"pydoc_data/topics/{key}", text) for key, text in sorted(topics.items()) if text.strip()]


def reference_corpus(split: str) -> list[Document]:
    """The documents of one split (`train`, `validation` or `test`), sorted by name."""
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [doc for doc in _all_documents() if split_of(doc.name) == split]
