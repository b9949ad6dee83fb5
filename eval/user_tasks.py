"""The user's own data as a `eval.tasks.Task`: `load_user_task(spec)` for a `TaskSpec` whose source
is not a built-in task name.

Sources (read through the `datasets` library; nothing is parsed by hand):

- a file: CSV, TSV, JSON (a list of objects), JSONL, Parquet (`FORMATS`). A CSV / TSV without a
  header whose rows end in an answer letter (MMLU's `question,A,B,C,D,answer`) is read as such.
- a folder of such files: files whose path names a split (`SPLIT_NAMES`: train / validation, val,
  dev / test, as a path part or a `_`/`-`/`.` separated word: `train.tsv`, `dev/x_dev.csv`,
  `auxiliary_train/arc.csv`) make that split; a folder with no split names is one unsplit set.
- a `datasets.save_to_disk` folder (a `Dataset` or a `DatasetDict`).
- `hf:NAME` (with `TaskSpec.config`): a hub dataset resolved offline from the local `datasets`
  cache only; when it is not there the error says how to put it there.

Files are converted once into memory-mapped Arrow (under `$SLIMTUNE_CACHE/datasets`), so only the
rows asked for (`train_examples`, a seeded sample) and the scored splits become Python objects.
Splits the data lacks are carved from train by a seeded shuffle (`validation_fraction`,
`test_fraction`); a split without labels (GLUE's test.tsv) is left out with a warning and carved
the same way. The kind is `spec.kind` or inferred from the columns (`infer_kind`); columns are
found by role (`eval.tasks.COLUMN_ROLES`, or the names in `spec.columns`). Rows that cannot be
parsed are skipped and counted (one warning per split); a split with none left is an error.
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
import warnings
from contextlib import contextmanager
from pathlib import Path

from eval.data import ClassificationExample, InstructionExample, MultipleChoiceExample
from eval.errors import UserInputError
from eval.tasks import COLUMN_ROLES, SPLITS, Task, TaskSpec, sampled_train_positions

# File suffix -> `datasets` packaged builder.
FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Words in a file's path that put it into a split.
SPLIT_NAMES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"), "test": ("test",)}
EXPECTED_SOURCE = ("a CSV, TSV, JSON, JSONL or Parquet file, a folder of them (files named train / validation / "
                   "test), a datasets.save_to_disk folder, or hf:NAME from the local datasets cache")
# What each kind needs, in the words the errors use.
KIND_NEEDS = {
    "classification": "a text column (or a text pair) and a label column",
    "multiple_choice": "a question column, a choices column (a list, or one column per choice: A, B, C, D) "
                       "and an answer column (an index or a letter)",
    "instruction": "instruction and output columns (input optional), or a messages column",
}
# The role whose value makes a row labelled; a non-train split without it is unlabelled.
ANSWER_ROLE = {"classification": "label", "multiple_choice": "answer", "instruction": None}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HF_PREFIX = "hf:"


def load_user_task(spec: TaskSpec) -> Task:
    """The task in the user's data `spec` names (see the module docstring)."""
    with _quiet_datasets():
        return _load_user_task(spec)


def _load_user_task(spec: TaskSpec) -> Task:
    raw = open_splits(spec)
    columns = _column_union(raw)
    kind = spec.kind or infer_kind(columns, spec.columns)
    roles = resolve_columns(kind, columns, spec.columns, spec.source)
    raw = _drop_unlabelled(raw, kind, roles)
    # From every labelled row the data has, before any carving or sampling: the same names always.
    labels = class_names(raw, roles, spec.labels) if kind == "classification" else ()
    raw = carve_splits(raw, spec)
    # The sample `load_task` takes of a built-in task: the same seed picks the same rows of the
    # same data in either form.
    picked = sampled_train_positions(len(raw["train"]), spec)
    if picked is not None:
        raw["train"] = _select(raw["train"], picked, ("sample", spec.seed, spec.train_examples))
    examples = {split: _examples(raw[split], split, kind, roles, labels, spec.source) for split in SPLITS}
    task = Task(name=task_name(spec), kind=kind, labels=tuple(labels), train=examples["train"],
                validation=examples["validation"], test=examples["test"],
                description=f"{kind} task from {spec.source}" + (f" ({spec.config})" if spec.config else ""))
    _warn_shared_texts(task)
    return task


def task_name(spec: TaskSpec) -> str:
    if spec.source.startswith(_HF_PREFIX):
        return spec.source[len(_HF_PREFIX):] + (f"/{spec.config}" if spec.config else "")
    path = Path(spec.source).expanduser()
    return path.stem if path.is_file() else path.name


# --------------------------------------------------------------------------------------------
# Opening the source: {split: datasets.Dataset} for the splits the data has
# --------------------------------------------------------------------------------------------


def open_splits(spec: TaskSpec) -> dict:
    """{split: `datasets.Dataset`} for the splits present in the source (train always)."""
    if spec.source.startswith(_HF_PREFIX):
        raw = _open_hub(spec.source[len(_HF_PREFIX):], spec.config)
    else:
        path = Path(spec.source).expanduser()
        if not path.exists():
            raise UserInputError(f"task {spec.source!r} is neither a built-in task nor an existing path; expected "
                                 f"{EXPECTED_SOURCE}")
        if spec.config is not None:
            raise UserInputError(f"--task-config {spec.config!r} applies to hf:NAME datasets only; {path} is a "
                                 "local path")
        raw = _open_saved(path) if _is_saved_dataset(path) else _open_files(path)
    raw = _merge_aliases(raw, spec.source)
    unknown = sorted(set(raw) - set(SPLITS))
    if unknown and "train" in raw:
        warnings.warn(f"task {spec.source}: split(s) {', '.join(unknown)} are not train / validation / test and "
                      "are not used", stacklevel=3)
    if "train" not in raw:
        if len(raw) == 1:  # one unnamed set: everything is train, the rest is carved from it
            raw = {"train": next(iter(raw.values()))}
        else:
            raise UserInputError(f"task {spec.source}: no train split among {', '.join(sorted(raw))}; expected a "
                                 "split (or files) named train")
    raw = {split: ds for split, ds in raw.items() if split in SPLITS}
    for split, ds in raw.items():
        if len(ds) == 0:
            raise UserInputError(f"task {spec.source}: the {split} split is empty; expected rows of data")
    return raw


def _merge_aliases(raw: dict, source: str) -> dict:
    """{split: Dataset} with split names mapped (`dev` -> validation); sets naming the same split
    are concatenated (MMLU's dev and val)."""
    import datasets

    groups: dict[str, list] = {}
    for name in sorted(raw):
        groups.setdefault(_split_of_name(name) or name, []).append(raw[name])
    merged = {}
    for split, parts in groups.items():
        try:
            merged[split] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
        except ValueError as e:
            raise UserInputError(f"task {source}: the sets that make the {split} split have different columns "
                                 f"({_short(e)}); expected one layout") from e
    return merged


def _split_of_name(name: str) -> str | None:
    """The split a file path or split name names, if any (`dev` -> validation)."""
    words = {w for part in Path(name).with_suffix("").parts for w in re.split(r"[_\-.\s]+", part.lower())}
    words |= {part.lower() for part in Path(name).with_suffix("").parts}
    found = [split for split, names in SPLIT_NAMES.items() if words & set(names)]
    return found[0] if len(found) == 1 else None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_dict.json", "state.json"))


def _open_saved(path: Path) -> dict:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises many types for a damaged folder
        raise UserInputError(f"task {path}: not a readable datasets.save_to_disk folder ({_short(e)}); expected "
                             f"{EXPECTED_SOURCE}") from e
    return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}


def _open_files(path: Path) -> dict:
    """Files -> {split or "all": Dataset}; one `datasets` packaged builder per format."""
    if path.is_file():
        files = {"all": [path]}
    else:
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not found:
            raise UserInputError(f"task {path}: the folder holds no data files; expected {EXPECTED_SOURCE}")
        files = {}
        for p in found:
            files.setdefault(_split_of_name(str(p.relative_to(path))) or "all", []).append(p)
        if len(files) > 1 and "all" in files:
            stray = ", ".join(str(p.relative_to(path)) for p in files.pop("all")[:3])
            warnings.warn(f"task {path}: files naming no split are not used ({stray})", stacklevel=4)
    suffixes = {p.suffix.lower() for group in files.values() for p in group}
    if not suffixes <= set(FORMATS):
        raise UserInputError(f"task {path}: unknown data format {', '.join(sorted(suffixes - set(FORMATS)))}; "
                             f"expected {EXPECTED_SOURCE}")
    if len({FORMATS[s] for s in suffixes}) > 1 or (".tsv" in suffixes and ".csv" in suffixes):
        raise UserInputError(f"task {path}: mixed formats ({', '.join(sorted(suffixes))}); expected one format")
    return {split: _load_files(group, split) for split, group in files.items()}


def _load_files(files: list[Path], split: str):
    """One split's files as a memory-mapped Arrow `Dataset` (converted once, cached)."""
    import datasets

    suffix = files[0].suffix.lower()
    builder, options = FORMATS[suffix], {}
    if builder == "csv":
        options = _csv_options(files[0], delimiter="\t" if suffix == ".tsv" else ",")
    from eval.reference.common import cache_root

    try:
        with _quiet_datasets():
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                         cache_dir=str(cache_root() / "datasets"), **options)
    except Exception as e:  # noqa: BLE001 - pyarrow / pandas / datasets raise many types for a non-data file
        shown = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        if "corresponds to no data" in _short(e):  # only a header, or nothing at all
            where = "" if split == "all" else f"the {split} split is empty: "
            raise UserInputError(f"{where}{shown} holds no rows; expected rows of data") from e
        raise UserInputError(f"{shown} could not be read as {suffix[1:].upper()} data ({_short(e)}); expected "
                             f"{EXPECTED_SOURCE}") from e


def _csv_options(first_file: Path, delimiter: str) -> dict:
    """`datasets` CSV options: the delimiter, TSVs unquoted (GLUE's sentences hold bare quotes),
    MMLU's header-less layout (question, choices..., answer letter) named when it is seen, and
    every column read as text (a type guessed per file would differ between files: MMLU's
    choices are numbers in one subject, words in the next; labels are parsed per row later)."""
    import datasets

    options = {"delimiter": delimiter}
    if delimiter == "\t":
        options["quoting"] = csv.QUOTE_NONE
    try:
        with first_file.open(encoding="utf-8-sig", newline="") as f:
            first = next(csv.reader(f, delimiter=delimiter), [])
    except (UnicodeDecodeError, csv.Error) as e:
        raise UserInputError(f"{first_file} is not text data ({_short(e)}); expected {EXPECTED_SOURCE}") from e
    known = {name for names in COLUMN_ROLES.values() for name in names}
    if (len(first) >= 3 and not known & {c.strip() for c in first}
            and len(first[-1].strip()) == 1 and first[-1].strip().upper() in LETTERS[: len(first) - 2]):
        options["column_names"] = ["question", *LETTERS[: len(first) - 2], "answer"]
    names = options.get("column_names", [c.strip() for c in first])
    if names and len(set(names)) == len(names):
        options["features"] = datasets.Features({name: datasets.Value("string") for name in names})
    return options


def _open_hub(name: str, config: str | None) -> dict:
    """A hub dataset from the local `datasets` cache, never the network."""
    import datasets

    how = (f"put it there on a connected machine: python -c \"import datasets; datasets.load_dataset('{name}'"
           + (f", '{config}'" if config else "") + ").save_to_disk('DIR')\" and copy DIR here to pass --task DIR, "
           "or run the same load_dataset there with HF_DATASETS_CACHE pointing at a folder you copy into this "
           "machine's HF_DATASETS_CACHE")
    if not name:
        raise UserInputError("hf: needs a dataset name, e.g. hf:nyu-mll/glue with --task-config sst2")
    try:
        with _offline(), _quiet_datasets():
            loaded = datasets.load_dataset(name, config)
    except ValueError as e:
        if "config" in str(e).lower():  # a missing or unknown configuration: datasets lists them
            raise UserInputError(f"hf:{name}: {_short(e, 400)}; pass one with --task-config") from e
        raise UserInputError(f"hf:{name}{'/' + config if config else ''} is not in the local datasets cache "
                             f"({_short(e)}); {how}") from e
    except Exception as e:  # noqa: BLE001 - offline misses surface as several exception types
        raise UserInputError(f"hf:{name}{'/' + config if config else ''} is not in the local datasets cache "
                             f"({_short(e)}); {how}") from e
    return dict(loaded)


@contextmanager
def _offline():
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on for the block (datasets reads its config module)."""
    import datasets.config

    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_config = datasets.config.HF_HUB_OFFLINE
    os.environ.update({k: "1" for k in saved})
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved_config
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def _quiet_datasets():
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _short(error: BaseException, limit: int = 200) -> str:
    """The error's message, or its innermost cause's (datasets wraps the parser's in a generic one)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def _column_union(raw: dict) -> list[str]:
    names = []
    for ds in raw.values():
        names += [c for c in ds.column_names if c not in names]
    return names


# --------------------------------------------------------------------------------------------
# Kind and columns
# --------------------------------------------------------------------------------------------


def infer_kind(columns: list[str], named: dict) -> str:
    """The kind the columns (and the roles the user named) fit: instruction, multiple choice or
    classification, checked in that order."""
    def has(role: str) -> bool:
        return role in named or any(c in columns for c in COLUMN_ROLES[role])

    if has("messages") or (has("instruction") and has("output")):
        return "instruction"
    if has("question") and has("answer") and (has("choices") or _letter_columns(columns)):
        return "multiple_choice"
    if has("text") and has("label"):
        return "classification"
    raise UserInputError(f"cannot tell the kind of task from the columns {columns}; expected "
                         + "; or ".join(f"{kind}: {need}" for kind, need in KIND_NEEDS.items())
                         + " (name them with --text-column, --label-column, ... or set --task-kind)")


def _letter_columns(columns: list[str]) -> list[str]:
    """A, B, C, ... as far as they run (at least two): choices stored one per column."""
    found = []
    for letter in LETTERS:
        if letter not in columns:
            break
        found.append(letter)
    return found if len(found) >= 2 else []


# Roles each kind reads; the optional ones may be absent.
KIND_ROLES = {
    "classification": (("text", "label"), ("text_pair",)),
    "multiple_choice": (("question", "choices", "answer"), ()),
    "instruction": (("instruction", "output"), ("input",)),
}


def resolve_columns(kind: str, columns: list[str], named: dict, source: str) -> dict:
    """{role: column name} (choices: a list of column names) for `kind`; a named column that the
    data lacks, or a needed role with no column, is one error naming the data's columns."""
    for role, column in named.items():
        for name in _column_list(role, column):
            if name not in columns:
                raise UserInputError(f"{_flag(role)} {name!r}: no such column in {source}; its columns are {columns}")
    if kind == "instruction" and _is_conversation(columns, named):
        return {"messages": named.get("messages") or _default_column("messages", columns)}
    needed, optional = KIND_ROLES[kind]
    roles = {}
    for role in needed + optional:
        if role in named:
            roles[role] = named[role] if role != "choices" else _column_list(role, named[role])
        elif role == "choices":
            default = _default_column(role, columns)
            roles[role] = [default] if default is not None else (_letter_columns(columns) or None)
        else:
            roles[role] = _default_column(role, columns)
        if roles[role] is None and role in needed:
            raise UserInputError(f"{kind} task {source}: no {role} column among {columns}; expected one named "
                                 f"{' or '.join(COLUMN_ROLES[role])}, or name it with {_flag(role)} (a {kind} task "
                                 f"needs {KIND_NEEDS[kind]})")
    return {role: column for role, column in roles.items() if column is not None}


def _is_conversation(columns: list[str], named: dict) -> bool:
    """Instruction data as a messages list rather than instruction / input / output columns."""
    if "messages" in named:
        return True
    if {"instruction", "input", "output"} & set(named):
        return False
    alpaca = all(_default_column(r, columns) is not None for r in ("instruction", "output"))
    return not alpaca and _default_column("messages", columns) is not None


def _flag(role: str) -> str:
    return "--" + role.replace("_", "-") + "-column"


def _column_list(role: str, column) -> list[str]:
    """The columns a role names: choices may be several (`A,B,C,D`), every other role one."""
    if isinstance(column, (list, tuple)):
        return list(column)
    if role == "choices":
        return [c.strip() for c in column.split(",") if c.strip()]
    return [column]


def _default_column(role: str, columns: list[str]) -> str | None:
    return next((c for c in COLUMN_ROLES[role] if c in columns), None)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def _drop_unlabelled(raw: dict, kind: str, roles: dict) -> dict:
    """Leave out a validation / test split without answers (GLUE's test.tsv has no label column;
    the hub's GLUE test split has label -1 throughout): it is carved from train instead."""
    role = ANSWER_ROLE[kind]
    if role is None:
        return raw
    column = roles[role]
    kept = {}
    for split, ds in raw.items():
        if split != "train" and (column not in ds.column_names or _all_missing(ds, column)):
            warnings.warn(f"the {split} split has no {role}s (column {column!r}); it is left out and carved from "
                          "train", stacklevel=4)
            continue
        if split == "train" and column not in ds.column_names:
            raise UserInputError(f"the train split has no column {column!r}; its columns are {ds.column_names}")
        kept[split] = ds
    return kept


def _all_missing(ds, column: str) -> bool:
    values = ds.unique(column)
    return all(v is None or v == -1 or (isinstance(v, float) and math.isnan(v)) or v == "" for v in values)


def carve_splits(raw: dict, spec: TaskSpec) -> dict:
    """{split: Dataset} for every split: the ones the data lacks taken from train by one seeded
    shuffle (test first, then validation), each kept in file order."""
    train = raw["train"]
    missing = [s for s in ("test", "validation") if s not in raw]
    fraction = {"test": spec.test_fraction, "validation": spec.validation_fraction}
    if not missing:
        return dict(raw)
    order = list(range(len(train)))
    random.Random(spec.seed).shuffle(order)
    out, start = dict(raw), 0
    for split in missing:
        n = math.floor(fraction[split] * len(train))
        if fraction[split] > 0 and n == 0 and len(train) > 2:
            n = 1
        out[split] = _select(train, sorted(order[start:start + n]), ("carve", split, tuple(missing), spec.seed,
                                                                  fraction[split], spec.test_fraction))
        start += n
    if start >= len(train):
        raise UserInputError(f"task {spec.source}: {len(train)} rows leave no training data after carving "
                             f"validation ({spec.validation_fraction}) and test ({spec.test_fraction}); give more "
                             "rows or smaller --validation-fraction / --test-fraction")
    if start:
        out["train"] = _select(train, sorted(order[start:]), ("carve", "train", tuple(missing), spec.seed,
                                                              spec.validation_fraction, spec.test_fraction))
    return out


def _select(ds, indices: list[int], how: tuple):
    """`ds.select(indices)` with a fingerprint made from what chose the rows: datasets would
    otherwise hash the whole index list (seconds on 100k rows)."""
    import hashlib

    key = repr((ds._fingerprint, how, len(indices))).encode()
    return ds.select(indices, new_fingerprint=hashlib.sha256(key).hexdigest()[:32])


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def class_names(raw: dict, roles: dict, given: tuple[str, ...] | None) -> list[str]:
    """The class names of a classification task, label i being names[i].

    From the label column's `ClassLabel`, else `given` (--labels), else: string labels sorted,
    integer labels as their decimal strings (a warning asks for --labels).
    """
    import datasets

    column = roles["label"]
    features = [ds.features[column] for ds in raw.values()]
    types = {_label_type(f, column) for f in features}
    if len(types) > 1:
        raise UserInputError(f"label column {column!r} has mixed types across splits ({', '.join(sorted(types))}); "
                             "expected all integers or all strings")
    label_type = types.pop()
    class_label = next((f for f in features if isinstance(f, datasets.ClassLabel)), None)
    if given:
        if len(set(given)) != len(given):
            raise UserInputError(f"--labels has duplicates: {list(given)}; expected distinct class names")
        return list(given)
    if class_label is not None:
        return list(class_label.names)
    values = {v for ds in raw.values() for v in ds.unique(column) if not _missing(v)}
    if label_type == "string":
        digits = {v for v in values if str(v).strip().lstrip("-").isdigit()}
        if digits and digits != values:
            raise UserInputError(f"label column {column!r} mixes numbers and names (e.g. {sorted(digits)[:2]} and "
                                 f"{sorted(values - digits)[:2]}); expected one kind of label")
        if not digits:
            return sorted({str(v).strip() for v in values})
        values = {int(v) for v in digits}  # a CSV's integer labels, read as text
    if any(isinstance(v, float) and not v.is_integer() for v in values):
        raise UserInputError(f"label column {column!r} holds real numbers (e.g. {sorted(values)[:2]}); expected "
                             "class indices or names (a regression target is not a classification task)")
    ints = sorted({int(v) for v in values})
    if any(v < 0 for v in ints):
        raise UserInputError(f"label column {column!r} holds negative labels {ints[:3]}; expected class indices "
                             ">= 0 (-1 marks an unlabelled row)")
    warnings.warn(f"label column {column!r} holds integers with no class names; the model learns the answers "
                  f"{', '.join(map(str, range(max(ints) + 1)))}: pass --labels NAME,NAME,... for meaningful names",
                  stacklevel=3)
    return [str(i) for i in range(max(ints) + 1)]


def _label_type(feature, column: str) -> str:
    import datasets

    if isinstance(feature, datasets.ClassLabel):
        return "integer"
    dtype = getattr(feature, "dtype", None)
    if dtype in ("string", "large_string"):
        return "string"
    if dtype is not None and (dtype.startswith("int") or dtype.startswith("uint")):
        return "integer"
    if dtype is not None and dtype.startswith("float"):
        return "integer"  # pandas reads an integer column with gaps as float: checked per value
    raise UserInputError(f"label column {column!r} has type {feature}; expected integer or string labels")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == -1 or value == ""


# --------------------------------------------------------------------------------------------
# Rows -> examples
# --------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A row that cannot be parsed: why."""


def _examples(ds, split: str, kind: str, roles: dict, labels: list[str], source: str) -> list:
    if len(ds) == 0:
        return []  # a split carved with fraction 0 (a source's empty split is refused when opened)
    columns = [c for role, c in roles.items() for c in (c if isinstance(c, list) else [c])]
    missing = [c for c in columns if c not in ds.column_names and c != roles.get("input")]
    if missing:
        raise UserInputError(f"the {split} split of {source} has no column {missing[0]!r}; its columns are "
                             f"{ds.column_names}")
    parse = {"classification": _classification, "multiple_choice": _multiple_choice,
             "instruction": _instruction}[kind]
    examples, skipped, first = [], 0, None
    present = [c for c in columns if c in ds.column_names]
    for start in range(0, len(ds), 1024):  # Arrow batches: the rows become Python objects piecewise
        batch = ds.select_columns(present)[start:start + 1024]
        for i in range(len(batch[present[0]])):
            row = {c: batch[c][i] for c in present}
            try:
                examples.append(parse(row, roles, labels))
            except _Skip as why:
                skipped += 1
                first = first or f"row {start + i + 1}: {why}"
    if skipped:
        warnings.warn(f"{source}: skipped {skipped} of {len(ds)} rows of the {split} split that could not be parsed "
                      f"(first: {first})", stacklevel=3)
    if not examples:
        raise UserInputError(f"the {split} split of {source} has no usable rows: all {len(ds)} could not be parsed "
                             f"(first: {first}); a {kind} task needs {KIND_NEEDS[kind]}")
    return examples


def _text(value, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Skip(f"{what} is {value!r}, expected text")
    return value


def _classification(row: dict, roles: dict, labels: list[str]) -> ClassificationExample:
    text = _text(row[roles["text"]], "the text")
    if "text_pair" in roles:
        text = f"{text}\n{_text(row[roles['text_pair']], 'the second text')}"  # eval.data's pair convention
    return ClassificationExample(text=text, label=_label_index(row[roles["label"]], labels))


def _label_index(value, labels: list[str]) -> int:
    if _missing(value):
        raise _Skip("no label")
    if isinstance(value, str):
        if value.strip() in labels:
            return labels.index(value.strip())
        if value.strip().isdigit() and int(value) < len(labels):
            return int(value)
        raise _Skip(f"label {value!r} is not one of {labels}")
    if isinstance(value, float) and not value.is_integer():
        raise _Skip(f"label {value!r} is not a class index")
    if isinstance(value, (int, float)) and 0 <= int(value) < len(labels):
        return int(value)
    raise _Skip(f"label {value!r} is not an index into {len(labels)} classes")


def _multiple_choice(row: dict, roles: dict, labels) -> MultipleChoiceExample:
    question = _text(row[roles["question"]], "the question")
    columns = roles["choices"]
    choices = row[columns[0]] if len(columns) == 1 else [row[c] for c in columns]
    if not isinstance(choices, list) or len(choices) < 2 or any(not isinstance(c, str) for c in choices):
        raise _Skip(f"the choices are {choices!r}, expected two or more strings")
    return MultipleChoiceExample(question=question, choices=[str(c) for c in choices],
                                 answer=_answer_index(row[roles["answer"]], choices))


def _answer_index(value, choices: list[str]) -> int:
    """An index, a letter (A = 0, MMLU's files) or the right choice's text."""
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 1 and text.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(text.upper())
        if text.isdigit() and int(text) < len(choices):
            return int(text)
        if text in choices:
            return choices.index(text)
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer() \
            and 0 <= int(value) < len(choices):
        return int(value)
    raise _Skip(f"answer {value!r} is not an index, a letter or one of the {len(choices)} choices")


def _instruction(row: dict, roles: dict, labels) -> InstructionExample:
    if "messages" in roles:
        return _conversation(row[roles["messages"]])
    extra = row.get(roles["input"]) if "input" in roles else ""
    return InstructionExample(instruction=_text(row[roles["instruction"]], "the instruction"),
                              input=extra if isinstance(extra, str) else "",
                              output=_text(row[roles["output"]], "the output"))


def _conversation(messages) -> InstructionExample:
    """A chat: everything before the last assistant turn is the prompt, that turn the response."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise _Skip("messages is not a list of two or more turns")
    turns = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise _Skip("a message is not {'role': ..., 'content': ...}")
        turns.append({"role": m["role"], "content": m["content"]})
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise _Skip("the last message is not a non-empty assistant turn")
    first_user = next((t["content"] for t in turns if t["role"] == "user"), "")
    return InstructionExample(instruction=first_user, input="", output=turns[-1]["content"],
                              messages=tuple(turns[:-1]))


def _warn_shared_texts(task: Task) -> None:
    """Exact prompts of test that train also holds inflate a test score: say how many."""
    seen = {task.prompt(ex) for ex in task.train}
    shared = sum(task.prompt(ex) in seen for ex in task.test)
    if shared:
        warnings.warn(f"task {task.name}: {shared} of {len(task.test)} test examples have a text that train also "
                      "holds (exact match); their score measures memory, not generalisation", stacklevel=3)


# --------------------------------------------------------------------------------------------
# Any task as the user's data
# --------------------------------------------------------------------------------------------


def task_rows(task: Task, example) -> dict:
    """One example as a JSON row `load_user_task` reads back into the same example: a
    classification text is written with its prompt template applied and its label by name."""
    if task.kind == "classification":
        return {"text": task.prompt(example), "label": task.labels[example.label]}
    if task.kind == "multiple_choice":
        return {"question": example.question, "choices": list(example.choices), "answer": example.answer}
    if example.messages:
        return {"messages": [*map(dict, example.messages), {"role": "assistant", "content": example.output}]}
    return {"instruction": example.instruction, "input": example.input, "output": example.output}


def export_task(task: Task, out) -> list[str]:
    """Write `task` as JSONL files (train / validation / test, `task_rows`) into the new folder
    `out`, atomically; return the flags that, with `--task OUT`, load exactly the same task
    (`--labels` in the task's label order; `--validation-fraction 0` when it has no validation)."""
    import json

    from eval.io import atomic_directory

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{out} already exists and is not empty; expected a new folder for the exported task")
    if any("," in label for label in task.labels):
        raise UserInputError(f"task {task.name}: a label name holds a comma ({list(task.labels)}); --labels could "
                             "not name it")
    with atomic_directory(out) as tmp:
        for split in SPLITS:
            examples = getattr(task, split)
            if examples:
                lines = "".join(json.dumps(task_rows(task, ex), ensure_ascii=False) + "\n" for ex in examples)
                (tmp / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    flags = ["--task-kind", task.kind]
    if task.labels:
        flags += ["--labels", ",".join(task.labels)]
    if not task.validation:
        flags += ["--validation-fraction", "0"]
    return flags


__all__ = ["export_task", "task_rows", "FORMATS", "SPLIT_NAMES", "carve_splits", "class_names", "infer_kind", "load_user_task", "open_splits",
           "resolve_columns"]
