"""Loading data from the standard local formats: text corpora, GLUE, MMLU, Alpaca, image folders.

Every loader reads local files only and raises `UserInputError` (what was wrong, what was
expected) for a missing file, a wrong format or an empty result.

- `load_text_corpus(path)`: documents from a folder of text files, a `.txt`, `.jsonl`,
  `.parquet` or WikiText raw file; `pack_token_blocks` packs them into fixed-length blocks.
- `load_glue(path, task)`: GLUE's TSV layout -> `ClassificationExample`s.
- `load_mmlu(dir)`: MMLU's CSV layout -> `MultipleChoiceExample`s.
- `load_alpaca(path)`: Alpaca instruction JSON/JSONL -> `InstructionExample`s.
- `load_image_folder(path, image_processor)`: an ImageNet-style class folder -> a torch Dataset.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from eval.errors import UserInputError, require_positive

# ---------------------------------------------------------------------------------------------
# Example types
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled text. Sentence pairs (GLUE's MRPC, QNLI, RTE, MNLI, QQP) are joined as
    `"first\\nsecond"`, so every consumer sees both sentences without knowing about pairs."""

    text: str
    label: int


@dataclass(frozen=True)
class MultipleChoiceExample:
    """A question, its choices and the index of the correct one (`subject`: MMLU's subject)."""

    question: str
    choices: list[str]
    answer: int
    subject: str | None = None


@dataclass(frozen=True)
class InstructionExample:
    """One Alpaca-style record; `input` is "" when the instruction needs no input.

    A chat (a `messages` list) keeps its turns before the response in `messages` (dicts with
    `role` and `content`); `output` is the last assistant turn, the response the loss falls on.
    """

    instruction: str
    input: str
    output: str
    messages: tuple = ()


# ---------------------------------------------------------------------------------------------
# Text corpora
# ---------------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md", ".py", ".raw", ".tokens")
CORPUS_FORMATS = "a folder of text files (.txt .md .py .raw), a .txt file, .jsonl (field 'text'), .parquet (column 'text') or a WikiText raw file (wiki.*.raw)"

# A WikiText article starts at a top-level heading line " = Title = " (one '=' each side);
# section headings are " = = Section = = ", which this pattern does not match.
_WIKITEXT_TITLE = re.compile(r"^ = (?!=).*(?<!=) =$")


def load_text_corpus(path) -> list[str]:
    """Documents (non-empty strings) from a local corpus; see `CORPUS_FORMATS`.

    A folder is read recursively in sorted path order (hidden files and folders skipped); each
    text file is one document, except WikiText files (`.raw` / `.tokens`), which are split into
    their articles.
    """
    path = _existing_path(path, "text corpus", CORPUS_FORMATS)
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + (".jsonl", ".parquet")
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        docs = [doc for f in files for doc in _read_corpus_file(f)]
    else:
        docs = _read_corpus_file(path)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserInputError(f"text corpus {path} holds no non-empty documents; expected {CORPUS_FORMATS} with some text")
    return docs


def _existing_path(path, what: str, expected: str) -> Path:
    if path is None or (isinstance(path, str) and not path.strip()):
        raise UserInputError(f"{what}: no path given; expected {expected}")
    p = Path(path).expanduser()
    if not p.exists():
        raise UserInputError(f"{what}: {p} does not exist; expected {expected}")
    return p


def _read_corpus_file(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".raw", ".tokens"):
        return split_wikitext(_read_text(path))
    if suffix in (".txt", ".md", ".py"):
        return [_read_text(path)]
    if suffix == ".jsonl":
        return [_text_field(record, path, line) for line, record in _read_jsonl(path)]
    if suffix == ".parquet":
        return _read_parquet_text(path)
    raise UserInputError(f"text corpus: {path} has an unknown format ({suffix or 'no suffix'}); expected {CORPUS_FORMATS}")


def _read_text(path: Path) -> str:
    # Undecodable bytes become U+FFFD rather than failing a whole corpus on one odd file.
    return path.read_text(encoding="utf-8", errors="replace")


def split_wikitext(text: str) -> list[str]:
    """Split WikiText raw text into articles, each starting at its ` = Title = ` line."""
    articles: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if _WIKITEXT_TITLE.match(line.rstrip()) and any(x.strip() for x in articles[-1]):
            articles.append([])
        articles[-1].append(line)
    return [_strip_blank_lines(lines) for lines in articles if any(x.strip() for x in lines)]


def _strip_blank_lines(lines: list[str]) -> str:
    start, end = 0, len(lines)
    while not lines[start].strip():
        start += 1
    while not lines[end - 1].strip():
        end -= 1
    return "".join(lines[start:end]).removesuffix("\n")


def _read_jsonl(path: Path) -> Iterable[tuple[int, object]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"{path}:{number} is not valid JSON ({e.msg}); expected one JSON object per line") from e


def _text_field(record, path: Path, line: int) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise UserInputError(f"{path}:{line} has no string field 'text' (found {keys}); expected objects like {{\"text\": \"...\"}}")
    return record["text"]


def _read_parquet_text(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a non-parquet file
        raise UserInputError(f"{path} is not a readable Parquet file ({str(e)[:200]}); expected a Parquet table with a 'text' column") from e
    if "text" not in schema.names:
        raise UserInputError(f"{path} has no 'text' column (columns: {schema.names}); expected a Parquet table with a 'text' column")
    column = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    return [t for t in column if isinstance(t, str)]


# ---------------------------------------------------------------------------------------------
# Packing into token blocks
# ---------------------------------------------------------------------------------------------

_NO_LIMIT = 10**9  # tokenizers without a known context report a huge model_max_length


def pack_token_blocks(texts, tokenizer, block_size: int, max_blocks: int | None = None,
                      max_positions: int | None = None) -> torch.Tensor:
    """Tokenize documents, join them with EOS and cut into non-overlapping blocks.

    Returns a LongTensor `[n_blocks, block_size]`; the tail shorter than a block is dropped.
    Each document is tokenized without special tokens and followed by the EOS token.
    `max_positions` (the model's context length) and the tokenizer's `model_max_length` bound
    `block_size`. With `max_blocks`, documents are tokenized only until that many blocks exist.
    Items of `texts` may be strings or objects with a `.text` string (e.g. `Document`).
    """
    if isinstance(texts, str):
        texts = [texts]
    texts = [getattr(t, "text", t) for t in texts]
    if not texts:
        raise UserInputError("pack_token_blocks: the corpus is empty; expected at least one document")
    if any(not isinstance(t, str) for t in texts):
        raise UserInputError("pack_token_blocks: expected a list of strings (documents)")
    if not isinstance(block_size, int) or block_size < 2:
        raise UserInputError(f"block_size={block_size!r} must be an integer >= 2 (a block predicts tokens 1..block_size-1)")
    if max_blocks is not None:
        require_positive("max_blocks", max_blocks)
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and model_max < _NO_LIMIT and block_size > model_max:
        raise UserInputError(f"block_size={block_size} is longer than the tokenizer's model_max_length={model_max}; "
                             f"expected block_size <= {model_max}")
    if max_positions is not None and block_size > max_positions:
        raise UserInputError(f"block_size={block_size} is longer than the model's context of {max_positions} tokens; "
                             f"expected block_size <= {max_positions}")
    eos = tokenizer.eos_token_id
    separator = [eos] if eos is not None else []

    needed = None if max_blocks is None else max_blocks * block_size
    ids: list[int] = []
    chunk = 64  # documents per tokenizer call: batched for speed, small enough to stop early
    for start in range(0, len(texts), chunk):
        encoded = tokenizer(texts[start:start + chunk], add_special_tokens=False, verbose=False)["input_ids"]
        for doc_ids in encoded:
            ids.extend(doc_ids)
            ids.extend(separator)
        if needed is not None and len(ids) >= needed:
            break
    n_blocks = len(ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise UserInputError(f"the corpus is {len(ids)} tokens long (documents joined with EOS), shorter than one block "
                             f"of block_size={block_size} tokens; expected at least {block_size} tokens "
                             "(give more text or a smaller block_size)")
    return torch.tensor(ids[:n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)


BLOCK_PICKS = ("first", "spread")


def pick_token_blocks(texts, tokenizer, block_size: int, n_blocks: int, pick: str = "spread",
                      max_positions: int | None = None) -> torch.Tensor:
    """`n_blocks` blocks `[n, block_size]` of the packed corpus (`pack_token_blocks`), chosen by `pick`:

    "first": the corpus' first blocks; tokenizes only as much text as they need, but a corpus in
        name order then yields a handful of documents (ref-lm's 128 first train blocks are nine
        small stdlib modules and the start of `_pydecimal.py`).
    "spread": blocks at evenly spaced positions over the whole packed corpus, so every part of it
        is represented in proportion to its length; tokenizes all of it (about 13 s for ref-lm's
        9 MB train split on one busy core).
    """
    if pick not in BLOCK_PICKS:
        raise UserInputError(f"pick={pick!r} is unknown; expected one of {', '.join(BLOCK_PICKS)}")
    require_positive("n_blocks", n_blocks)
    if pick == "first":
        return pack_token_blocks(texts, tokenizer, block_size, max_blocks=n_blocks, max_positions=max_positions)
    blocks = pack_token_blocks(texts, tokenizer, block_size, max_positions=max_positions)
    if blocks.shape[0] <= n_blocks:
        return blocks
    index = torch.linspace(0, blocks.shape[0] - 1, n_blocks).round().long()  # distinct: spacing >= 1
    return blocks[index]


# ---------------------------------------------------------------------------------------------
# GLUE (TSV layout of the GLUE benchmark download)
# ---------------------------------------------------------------------------------------------

# Label ids follow the GLUE / Hugging Face `glue` dataset convention.
GLUE_LABELS: dict[str, list[str]] = {
    "cola": ["unacceptable", "acceptable"],
    "sst-2": ["negative", "positive"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "qnli": ["entailment", "not_entailment"],
    "rte": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
    "mnli": ["entailment", "neutral", "contradiction"],
}
# Column names in each task's header: (first text, second text or None, label).
_GLUE_COLUMNS = {
    "sst-2": ("sentence", None, "label"),
    "mrpc": ("#1 String", "#2 String", "Quality"),
    "qqp": ("question1", "question2", "is_duplicate"),
    "qnli": ("question", "sentence", "label"),
    "rte": ("sentence1", "sentence2", "label"),
    "wnli": ("sentence1", "sentence2", "label"),
    "mnli": ("sentence1", "sentence2", "gold_label"),
}
_GLUE_ALIASES = {"sst2": "sst-2", "sst": "sst-2", "stsb": "sts-b", "sts": "sts-b", "mnli-mm": "mnli", "mnli_mismatched": "mnli"}
GLUE_TASKS = sorted(GLUE_LABELS)


def _glue_task_name(name: str) -> str:
    key = name.strip().lower()
    return _GLUE_ALIASES.get(key, key)


def load_glue(path, task: str | None = None) -> dict[str, list[ClassificationExample]]:
    """Labelled splits of one GLUE task from its TSV folder.

    `path` is the task folder (`glue_data/SST-2`, holding `train.tsv`, `dev.tsv`, ...) or the
    GLUE root with `task` naming the subfolder. The task is taken from `task` or else the folder
    name. Returns `{split: examples}` keyed by file stem (`train`, `dev`; MNLI: `train`,
    `dev_matched`, `dev_mismatched`). Unlabelled test files are left out. Sentence pairs are
    joined as `"first\\nsecond"`; label ids are `GLUE_LABELS[task]` positions.
    """
    expected = "a GLUE task folder holding train.tsv / dev.tsv (e.g. glue_data/SST-2)"
    root = _existing_path(path, "load_glue", expected)
    if not root.is_dir():
        raise UserInputError(f"load_glue: {root} is a file; expected {expected}")
    if task is not None and (root / task).is_dir():
        root = root / task
    name = _glue_task_name(task if task is not None else root.name)
    if name == "sts-b":
        raise UserInputError("load_glue: STS-B is a regression task (similarity scores from 0 to 5), not classification; "
                             f"expected one of {GLUE_TASKS}")
    if name not in GLUE_LABELS:
        raise UserInputError(f"load_glue: unknown GLUE task {task if task is not None else root.name!r}; "
                             f"expected one of {GLUE_TASKS} (pass task=... or name the folder after the task)")
    files = sorted(p for p in root.glob("*.tsv") if not p.stem.startswith("test"))
    if not files:
        raise UserInputError(f"load_glue: {root} holds no labelled .tsv files; expected {expected}")
    splits = {f.stem: _read_glue_file(f, name) for f in files}
    return {split: examples for split, examples in splits.items() if examples is not None}


def _read_tsv(path: Path) -> list[list[str]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(encoding="utf-8-sig", newline="") as f:
        # GLUE's TSVs are not quoted (sentences contain bare quote characters).
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row]


def _read_glue_file(path: Path, task: str) -> list[ClassificationExample] | None:
    rows = _read_tsv(path)
    if not rows:
        raise UserInputError(f"load_glue: {path} is empty; expected a header line and examples")
    labels = {name: i for i, name in enumerate(GLUE_LABELS[task])}
    if task == "cola":
        return _read_cola(path, rows)
    first, second, label = _GLUE_COLUMNS[task]
    header = rows[0]
    missing = [c for c in (first, second) if c is not None and c not in header]
    if missing:
        raise UserInputError(f"load_glue: {path} has no column {missing[0]!r} (header: {header}); "
                             f"expected the {task.upper()} layout with columns {[c for c in (first, second, label) if c]}")
    if label not in header:
        return None  # an unlabelled split
    i1, i2, il = header.index(first), (header.index(second) if second else None), header.index(label)
    examples, malformed = [], 0
    for line, row in enumerate(rows[1:], start=2):
        if len(row) <= max(i for i in (i1, i2, il) if i is not None):
            malformed += 1  # real QQP/MNLI files hold a few broken lines
            continue
        text = row[i1] if i2 is None else f"{row[i1]}\n{row[i2]}"
        examples.append(ClassificationExample(text, _glue_label(row[il], labels, path, line)))
    if malformed:
        warnings.warn(f"load_glue: skipped {malformed} malformed lines in {path}", stacklevel=3)
    if not examples:
        raise UserInputError(f"load_glue: {path} holds no examples; expected lines under the header")
    return examples


def _read_cola(path: Path, rows: list[list[str]]) -> list[ClassificationExample] | None:
    # train/dev: no header; columns source, label (0/1), original judgement, sentence.
    # test: header "index\tsentence", no labels.
    if rows[0][:2] == ["index", "sentence"]:
        return None
    labels = {"0": 0, "1": 1}
    examples = []
    for line, row in enumerate(rows, start=1):
        if len(row) != 4:
            raise UserInputError(f"load_glue: {path}:{line} has {len(row)} columns; expected CoLA's 4 tab-separated "
                                 "columns (source, label, original label, sentence) and no header")
        examples.append(ClassificationExample(row[3], _glue_label(row[1], labels, path, line)))
    return examples


def _glue_label(value: str, labels: dict[str, int], path: Path, line: int) -> int:
    value = value.strip()
    if value in labels:
        return labels[value]
    if value.isdigit() and int(value) < len(labels):
        return int(value)
    raise UserInputError(f"load_glue: {path}:{line} has label {value!r}; expected one of {list(labels)} "
                         f"or 0..{len(labels) - 1}")


# ---------------------------------------------------------------------------------------------
# MMLU (CSV layout: data/{dev,val,test}/SUBJECT_{split}.csv)
# ---------------------------------------------------------------------------------------------

MMLU_SPLITS = ("dev", "val", "test")
_LETTERS = "ABCD"


def load_mmlu(path) -> dict[str, list[MultipleChoiceExample]]:
    """MMLU's splits from its CSV layout.

    `path` is the MMLU folder holding `data/` or the `data/` folder itself, with
    `{dev,val,test}/SUBJECT_{split}.csv` files without header: question, A, B, C, D, answer
    letter. Returns `{split: examples}` for the splits present; each example keeps its subject.
    """
    expected = "MMLU's layout: data/{dev,val,test}/SUBJECT_{split}.csv (no header: question, A, B, C, D, answer)"
    root = _existing_path(path, "load_mmlu", expected)
    if (root / "data").is_dir():
        root = root / "data"
    out: dict[str, list[MultipleChoiceExample]] = {}
    for split in MMLU_SPLITS:
        files = sorted((root / split).glob(f"*_{split}.csv")) if (root / split).is_dir() else []
        if files:
            out[split] = [ex for f in files for ex in _read_mmlu_file(f, f.name.removesuffix(f"_{split}.csv"))]
    if not out:
        raise UserInputError(f"load_mmlu: {root} holds no MMLU CSV files; expected {expected}")
    return out


def _read_mmlu_file(path: Path, subject: str) -> list[MultipleChoiceExample]:
    csv.field_size_limit(sys.maxsize)
    examples = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if len(row) != 6 or row[5].strip().upper() not in _LETTERS:
                raise UserInputError(f"load_mmlu: {path}:{line} has {len(row)} fields ending {row[-1]!r}; expected 6 "
                                     "comma-separated fields (question, A, B, C, D, answer letter A-D) and no header")
            answer = _LETTERS.index(row[5].strip().upper())
            examples.append(MultipleChoiceExample(row[0], row[1:5], answer, subject))
    return examples


# ---------------------------------------------------------------------------------------------
# Alpaca (instruction JSON)
# ---------------------------------------------------------------------------------------------


def load_alpaca(path) -> list[InstructionExample]:
    """Instruction examples from Alpaca's JSON (a list of {instruction, input, output}) or JSONL."""
    expected = "Alpaca's JSON (a list of {\"instruction\", \"input\", \"output\"} objects) or JSONL with those fields"
    path = _existing_path(path, "load_alpaca", expected)
    if path.is_dir():
        raise UserInputError(f"load_alpaca: {path} is a folder; expected a file in {expected}")
    if path.suffix.lower() == ".jsonl":
        records = list(_read_jsonl(path))
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserInputError(f"load_alpaca: {path} is not valid JSON ({e}); expected {expected}") from e
        if not isinstance(data, list):
            raise UserInputError(f"load_alpaca: {path} holds a JSON {type(data).__name__}; expected {expected}")
        records = list(enumerate(data, start=1))
    examples = [_instruction(record, path, where) for where, record in records]
    if not examples:
        raise UserInputError(f"load_alpaca: {path} holds no examples; expected {expected}")
    return examples


def _instruction(record, path: Path, where: int) -> InstructionExample:
    ok = isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("instruction", "output"))
    if not ok or not isinstance(record.get("input", ""), str):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise UserInputError(f"load_alpaca: record {where} of {path} has fields {found}; expected string fields "
                             "'instruction' and 'output' (and optionally 'input')")
    return InstructionExample(record["instruction"], record.get("input") or "", record["output"])


# ---------------------------------------------------------------------------------------------
# Image folders (ImageNet layout: one subfolder per class)
# ---------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


class ImageFolderDataset(torch.utils.data.Dataset):
    """`(pixel_values [3, H, W], label)` pairs from class subfolders, via the model's image processor.

    `.classes` (index = label), `.samples` (path, label), `.skipped` (unreadable files left
    out) and `.skipped_files`.
    """

    def __init__(self, samples: list[tuple[Path, int]], classes: list[str], image_processor,
                 skipped_files: list[Path]):
        self.samples = samples
        self.classes = classes
        self.image_processor = image_processor
        self.skipped_files = skipped_files

    @property
    def skipped(self) -> int:
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        with Image.open(path) as image:
            pixels = self.image_processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return pixels, label


def load_image_folder(path, image_processor, max_per_class: int | None = None,
                      classes: Sequence[str] | None = None) -> ImageFolderDataset:
    """An ImageNet-style folder (`path/CLASS/*.jpg`) as an `ImageFolderDataset`.

    Class index = position in `classes` if given (subfolders not listed are ignored), else in
    the sorted subfolder names (ImageNet's sorted WordNet ids give the standard 1k indices).
    Every image is decoded once here (JPEGs at reduced size, which is cheap); a corrupt or
    unreadable file is left out, counted in `.skipped` and reported in one warning.
    `max_per_class` keeps the first N images (sorted by name) of each class.
    """
    expected = "an image folder with one subfolder per class holding images (.png/.jpg/...)"
    root = _existing_path(path, "load_image_folder", expected)
    if not root.is_dir():
        raise UserInputError(f"load_image_folder: {root} is a file; expected {expected}")
    if max_per_class is not None:
        require_positive("max_per_class", max_per_class)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_names = list(classes) if classes is not None else folders
    if len(set(class_names)) != len(class_names):
        raise UserInputError("load_image_folder: the class list has duplicates; expected distinct class names")

    candidates: list[tuple[Path, int]] = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        candidates.extend((p, label) for p in files)

    from tqdm.auto import tqdm

    samples, skipped, per_class = [], [], [0] * len(class_names)
    for file, label in tqdm(candidates, desc="checking images", disable=len(candidates) < 1000):
        if max_per_class is not None and per_class[label] >= max_per_class:
            continue
        if _readable_image(file):
            samples.append((file, label))
            per_class[label] += 1
        else:
            skipped.append(file)
    if skipped:
        shown = ", ".join(str(p) for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        warnings.warn(f"load_image_folder: skipped {len(skipped)} unreadable image file(s): {shown}", stacklevel=2)
    if not samples:
        raise UserInputError(f"load_image_folder: {root} holds no readable images in class subfolders "
                             f"(classes looked for: {class_names[:5]}{' ...' if len(class_names) > 5 else ''}); "
                             f"expected {expected}")
    return ImageFolderDataset(samples, class_names, image_processor, skipped)


def _readable_image(path: Path) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; the full stream is still read
            image.load()
        return True
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return False


__all__ = [
    "ClassificationExample",
    "GLUE_LABELS",
    "ImageFolderDataset",
    "InstructionExample",
    "MultipleChoiceExample",
    "load_alpaca",
    "load_glue",
    "load_image_folder",
    "load_mmlu",
    "load_text_corpus",
    "pack_token_blocks",
    "pick_token_blocks",
    "BLOCK_PICKS",
    "split_wikitext",
]
