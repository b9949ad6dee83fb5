"""The suite's downstream tasks, generated deterministically from the reference corpus.

Every tuning method trains and is scored on these, so that all of them see the same data:

- `stdlib-module` (classification): which standard-library package a function's source comes
  from (asyncio, distutils, idlelib, importlib, multiprocessing, tkinter, xml).
- `docstring-match` (multiple choice): given a docstring, pick the signature of the function it
  documents among four; the three distractors are functions of other files of the same split.
- `def-kind` (classification): given only the body of a `def` (no def line, no decorators),
  is it a plain function, a method or a generator?

Train examples come from the reference corpus's train files, test examples from its
validation and test files, so train and test share no source file (and a test example whose
text also occurs in train is dropped). Functions are found with `ast` (module- and class-level
`def`s). Texts are clipped at a line break to fit in about 128-256 tokens.

This module only generates the examples (as the fields of an `eval.tasks.Task`); the harness
(`eval.tasks`) caches them, writes their lm-eval YAMLs, batches and scores them.
"""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import random
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

from eval.data import ClassificationExample, MultipleChoiceExample
from eval.errors import UserInputError

TASKS = ("stdlib-module", "docstring-match", "def-kind")
# Part of the cache directory's name: bump it whenever generation changes what the examples are.
TASKS_VERSION = 1
STDLIB_PACKAGES = ("asyncio", "distutils", "idlelib", "importlib", "multiprocessing", "tkinter", "xml")
DEF_KINDS = ("function", "method", "generator")
_MAX_SOURCE_CHARS = 600  # about 150-200 tokens of ref-lm's tokenizer
_MAX_DOCSTRING_CHARS = 300
_MAX_SIGNATURE_CHARS = 100


def tasks_hash() -> str:
    """12 hex digits naming what generation produces (names the tasks' cache directory)."""
    key = {"version": TASKS_VERSION, "python": ".".join(platform.python_version_tuple()[:2]),
           "packages": STDLIB_PACKAGES, "kinds": DEF_KINDS}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class FunctionRecord:
    """A module- or class-level `def` of a corpus file."""

    file: str
    name: str
    kind: str  # one of DEF_KINDS, or "coroutine" (async def; not used by def-kind)
    signature: str  # "def name(args):" on one line
    docstring: str | None
    source: str  # dedented, from the def line, decorators excluded
    body: str  # dedented statements after the def line and the docstring ("" if none)


def generate_tasks(documents: dict | None = None) -> dict[str, dict]:
    """Every task in `TASKS`, generated from the reference corpus (deterministic; takes a few
    seconds): {name: the fields of an `eval.tasks.Task`} (the harness builds the Task itself).

    `documents` ({"train": [...], "test": [...]} of `eval.reference.Document`) replaces the
    corpus (tests use a few files); by default train = the corpus's train split, test = its
    validation + test splits.
    """
    from eval.reference import reference_corpus

    if documents is None:
        documents = {"train": reference_corpus("train"),
                     "test": reference_corpus("validation") + reference_corpus("test")}
    functions = {split: _functions(documents[split]) for split in ("train", "test")}
    builders: dict[str, Callable[[dict], dict]] = {
        "stdlib-module": _stdlib_module_task,
        "docstring-match": _docstring_match_task,
        "def-kind": _def_kind_task,
    }
    return {name: builders[name](functions) for name in TASKS}


def _functions(documents) -> list[FunctionRecord]:
    records = []
    for doc in documents:
        if not doc.name.endswith(".py"):
            continue  # pydoc topics are prose
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            continue
        lines = doc.text.splitlines()
        for node, in_class in _defs(tree):
            records.append(_record(doc.name, node, in_class, lines))
    return records


def _defs(tree: ast.Module):
    """(def node, defined directly in a class?) for module-level and class-level defs."""
    stack = [(tree, False)]
    while stack:
        parent, _ = stack.pop()
        for node in parent.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield node, isinstance(parent, ast.ClassDef)
            elif isinstance(node, ast.ClassDef):
                stack.append((node, True))


def _record(file: str, node, in_class: bool, lines: list[str]) -> FunctionRecord:
    if isinstance(node, ast.AsyncFunctionDef):
        kind = "coroutine"
    elif _is_generator(node):
        kind = "generator"
    else:
        kind = "method" if in_class else "function"
    source = textwrap.dedent("\n".join(lines[node.lineno - 1 : node.end_lineno]))
    statements = node.body[1:] if ast.get_docstring(node) is not None else node.body
    body = ""
    if statements and statements[0].lineno > node.lineno:  # not a one-line `def f(): ...`
        body = textwrap.dedent("\n".join(lines[statements[0].lineno - 1 : node.end_lineno]))
    signature = f"def {node.name}({ast.unparse(node.args)}):"
    return FunctionRecord(file=file, name=node.name, kind=kind, signature=signature,
                          docstring=ast.get_docstring(node), source=source, body=body)


def _is_generator(node) -> bool:
    """Does the def itself yield (not a nested def, lambda or class inside it)?"""
    stack = list(node.body)
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.Yield, ast.YieldFrom)):
            return True
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        stack.extend(ast.iter_child_nodes(child))
    return False


def _clip(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`, at a line break where there is one."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut if cut > max_chars // 2 else max_chars].rstrip()


def _rng(task: str, split: str) -> random.Random:
    return random.Random(f"slimtune-task-{task}-{split}")


def _balanced(by_label: dict[int, list[tuple]], per_label: int, rng: random.Random) -> list[tuple]:
    """Up to `per_label` (example, file) pairs of each label, then shuffled (stable for the rng)."""
    chosen = []
    for label in sorted(by_label):
        items = sorted(by_label[label], key=lambda pair: (pair[0].text, pair[1]))
        rng.shuffle(items)
        chosen.extend(items[:per_label])
    rng.shuffle(chosen)
    return chosen


def _unique(pairs: list[tuple], key: Callable, seen: set | None = None) -> list[tuple]:
    """Pairs whose key is not in `seen` nor repeated (first one kept)."""
    seen = set() if seen is None else set(seen)
    unique = []
    for pair in pairs:
        if key(pair) not in seen:
            seen.add(key(pair))
            unique.append(pair)
    return unique


def _classification_splits(name: str, functions: dict, label_of: Callable, text_of: Callable,
                           n_labels: int, train_per_label: int, test_per_label: int) -> dict:
    """{"train": examples, "test": examples, "files": {split: sorted source files}}."""
    splits: dict = {"files": {}}
    train_texts: set[str] = set()
    for split, per_label in (("train", train_per_label), ("test", test_per_label)):
        by_label: dict[int, list] = {i: [] for i in range(n_labels)}
        for fn in functions[split]:
            label = label_of(fn)
            if label is not None and len(fn.body.strip().splitlines()) >= 2:
                example = ClassificationExample(text=_clip(text_of(fn), _MAX_SOURCE_CHARS), label=label)
                by_label[label].append((example, fn.file))
        # No text twice, and no test text that is also a train text (copied code across files).
        by_label = {k: _unique(v, lambda pair: pair[0].text, seen=train_texts) for k, v in by_label.items()}
        chosen = _balanced(by_label, per_label, _rng(name, split))
        splits[split] = [example for example, _ in chosen]
        splits["files"][split] = sorted({file for _, file in chosen})
        train_texts = {example.text for example in splits["train"]}
    return splits


def _stdlib_module_task(functions: dict) -> dict:
    def label_of(fn: FunctionRecord) -> int | None:
        package = fn.file.split("/", 1)[0]
        return STDLIB_PACKAGES.index(package) if "/" in fn.file and package in STDLIB_PACKAGES else None

    splits = _classification_splits("stdlib-module", functions, label_of, lambda fn: fn.source,
                                     len(STDLIB_PACKAGES), train_per_label=300, test_per_label=50)
    return dict(name="stdlib-module", kind="classification", labels=STDLIB_PACKAGES, **splits,
                description="which standard-library package a function's source comes from",
                template="{text}\n# Which standard-library package is this function from?\n# Answer:")


def _def_kind_task(functions: dict) -> dict:
    def label_of(fn: FunctionRecord) -> int | None:
        return DEF_KINDS.index(fn.kind) if fn.kind in DEF_KINDS else None

    splits = _classification_splits("def-kind", functions, label_of, lambda fn: fn.body,
                                     len(DEF_KINDS), train_per_label=400, test_per_label=100)
    return dict(name="def-kind", kind="classification", labels=DEF_KINDS, **splits,
                description="whether the body of a def belongs to a plain function, a method or a generator",
                template="{text}\n# Is this the body of a function, a method or a generator?\n# Answer:")


def _docstring_match_task(functions: dict, n_choices: int = 4) -> dict:
    splits: dict = {"files": {}}
    train_docstrings = {fn.docstring for fn in functions["train"] if fn.docstring}
    for split, size in (("train", 2000), ("test", 300)):
        candidates = sorted((fn for fn in functions[split] if fn.docstring and len(fn.docstring) >= 20
                             and len(fn.signature) <= _MAX_SIGNATURE_CHARS),
                            key=lambda fn: (fn.file, fn.signature, fn.docstring))
        seen = train_docstrings if split == "test" else set()
        pool = [fn for fn, in _unique([(fn,) for fn in candidates], lambda pair: pair[0].docstring, seen=seen)]
        rng = _rng("docstring-match", split)
        rng.shuffle(pool)
        examples, files = [], set()
        for fn in pool[:size]:
            distractors = _distractors(fn, pool, n_choices - 1, rng)
            answer = rng.randrange(n_choices)
            choices = [d.signature for d in distractors]
            choices.insert(answer, fn.signature)
            question = (f'Docstring:\n"""{_clip(fn.docstring, _MAX_DOCSTRING_CHARS)}"""\n'
                        "Which function does this docstring document?\nAnswer:")
            examples.append(MultipleChoiceExample(question=question, choices=choices, answer=answer))
            files.update([fn.file, *(d.file for d in distractors)])
        splits[split] = examples
        splits["files"][split] = sorted(files)
    return dict(name="docstring-match", kind="multiple_choice", labels=(), **splits,
                description="pick the signature of the function a docstring documents, among 4 "
                            "(distractors: functions of other files of the same split)")


def _distractors(fn: FunctionRecord, pool: list[FunctionRecord], n: int, rng: random.Random) -> list[FunctionRecord]:
    """`n` functions of other files, with other names and signatures than `fn` and each other."""
    chosen: list[FunctionRecord] = []
    for _ in range(100 * n):  # rejection sampling; the pool has thousands of functions
        other = pool[rng.randrange(len(pool))]
        if (other.file != fn.file and other.name != fn.name and other.signature != fn.signature
                and all(other.signature != c.signature for c in chosen)):
            chosen.append(other)
            if len(chosen) == n:
                return chosen
    raise UserInputError(f"too few functions in files other than {fn.file} to draw {n} distractors; "
                         "expected a larger corpus")
