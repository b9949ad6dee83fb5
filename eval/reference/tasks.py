"""The suite's downstream tasks, generated deterministically from the reference corpus.

Every tuning method trains and is scored on these, so that all of them see the same data:

- `stdlib-module` (classification): which standard-library package a function's source comes
  from (`STDLIB_PACKAGES`: packages every current CPython has; `distutils` was removed in 3.12).
- `def-kind` (classification): given only the body of a `def` (no def line, no decorators),
  is it a plain function, a method or a generator? A generator example always shows a `yield`
  in the text the model reads (one whose yield falls after the cut is dropped).
- `signature-match` (multiple choice, 4): given a function's body, pick its def line; the
  distractors are def lines of functions of other files of the same split. The body uses the
  right def line's parameters, so a model can learn the task (docstring-match, which it
  replaces, asked for semantics that no tuning of ref-lm learned).
- `next-line` (multiple choice, 4; zero-shot): the code of a function up to a line, and that
  line's real text among three statement lines of similar length from other files, each naming
  something the function does not; the real line names something the lines before it named.
- `local-name` (multiple choice, 4; zero-shot): the code of a function up to a name it defined
  earlier (a parameter or an assigned variable), and that name among three local names of
  similar length from functions of other files.
- `bracket-close` (multiple choice, 4; zero-shot): the code of a function up to a line that ends
  in two or more closing brackets (then at most a `:` or `,`), cut before the line's last token
  that follows a space; the rest of the line among three copies of it whose closing brackets are
  the closing run (as long) of a line of another file: each closes some bracket with the wrong
  kind. The question shows every bracket the line closes.

Splits are by source document: test examples come from the reference corpus's validation and
test documents (held out from ref-lm's pretraining); train and validation examples from its
train documents, which a second, salted hash of the document name divides
(`VALIDATION_PERCENT` to validation). Validation exists to choose settings; test is only scored.
No text (after collapsing whitespace) occurs in two splits or twice in one. Functions are found
with `ast` (module- and class-level `def`s). Texts are clipped at a line break to fit in about
128-256 tokens of ref-lm's tokenizer.

This module only generates the examples (as the fields of an `eval.tasks.Task`); they ship with
the suite as files (`eval.tasks`: shipped, checksummed, regenerated only on an explicit rebuild),
so every machine scores the same examples whatever its Python version.
"""

from __future__ import annotations

import ast
import hashlib
import io
import keyword
import platform
import random
import re
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass

from eval.data import ClassificationExample, MultipleChoiceExample
from eval.errors import UserInputError

TASKS = ("stdlib-module", "def-kind", "signature-match", "next-line", "local-name", "bracket-close")
# The tasks made for zero-shot scoring (a model that was never tuned on them can do them).
ZERO_SHOT_TASKS = ("next-line", "local-name", "bracket-close")
# Bump whenever generation changes what the examples are (recorded in the shipped card).
TASKS_VERSION = 3
STDLIB_PACKAGES = ("asyncio", "email", "idlelib", "importlib", "multiprocessing", "tkinter", "xml")
DEF_KINDS = ("function", "method", "generator")
SPLITS = ("train", "validation", "test")
# Percent of the corpus's train documents whose examples form the validation split.
VALIDATION_PERCENT = 15
N_CHOICES = 4
_MAX_SOURCE_CHARS = 600  # about 150-200 tokens of ref-lm's tokenizer
_MAX_SIGNATURE_CHARS = 100
_YIELD = re.compile(r"\byield\b")
_NAME_NOT_A_TARGET = frozenset({"self", "cls", "_"})


def task_split_of(document: str, corpus_split: str) -> str:
    """The task split of a corpus document: its validation and test documents are test; its
    train documents are train or validation by a salted hash of the name (stable everywhere)."""
    if corpus_split != "train":
        return "test"
    digest = hashlib.sha256(f"slimtune-task-validation/{document}".encode()).digest()
    return "validation" if int.from_bytes(digest[:8], "big") % 100 < VALIDATION_PERCENT else "train"


def corpus_documents() -> dict[str, list]:
    """{task split: the reference corpus's documents of it} (see `task_split_of`)."""
    from eval.reference import reference_corpus

    documents: dict[str, list] = {split: [] for split in SPLITS}
    for corpus_split in ("train", "validation", "test"):
        for doc in reference_corpus(corpus_split):
            documents[task_split_of(doc.name, corpus_split)].append(doc)
    return documents


def generation_info() -> dict:
    """What the shipped files were generated from (written into their card)."""
    return {"version": TASKS_VERSION, "python": platform.python_version(), "stdlib_packages": STDLIB_PACKAGES,
            "def_kinds": DEF_KINDS, "validation_percent": VALIDATION_PERCENT}


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
    node: ast.AST  # the def, with line numbers relative to `source` (its def line is line 1)
    column: int  # the def line's indentation in its file (`source` lost it; 0 at module level)


def generate_tasks(documents: dict | None = None) -> dict[str, dict]:
    """Every task in `TASKS`, generated from the reference corpus (deterministic; takes some
    seconds): {name: the fields of an `eval.tasks.Task`} (the harness builds the Task itself).

    `documents` ({split: [eval.reference.Document]} for each of `SPLITS`) replaces the corpus
    (tests use a few files); by default `corpus_documents()`.
    """
    if documents is None:
        documents = corpus_documents()
    functions = {split: _functions(documents[split]) for split in SPLITS}
    builders: dict[str, Callable[[dict], dict]] = {
        "stdlib-module": _stdlib_module_task,
        "def-kind": _def_kind_task,
        "signature-match": _signature_match_task,
        "next-line": _next_line_task,
        "local-name": _local_name_task,
        "bracket-close": _bracket_close_task,
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
    ast.increment_lineno(node, 1 - node.lineno)  # line numbers now count from the def line
    return FunctionRecord(file=file, name=node.name, kind=kind, signature=signature,
                          docstring=ast.get_docstring(node), source=source, body=body, node=node,
                          column=node.col_offset)


def _positions_hold(fn: FunctionRecord) -> bool:
    """Do `fn.node`'s columns, less `fn.column`, index `fn.source`? (Not when a line of the def,
    e.g. of a string, is indented less than its def line, so dedenting removed less.)"""
    return fn.source.startswith(("def ", "async def ")) and fn.kind != "coroutine"


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


def _clip_left(text: str, max_chars: int) -> str:
    """The last at most `max_chars` of `text`, starting at a line start where there is one."""
    if len(text) <= max_chars:
        return text
    start = text.find("\n", len(text) - max_chars)
    return text[start + 1 :] if 0 <= start < len(text) - max_chars // 2 else text[len(text) - max_chars :]


def normalized(text: str) -> str:
    """`text` with every run of whitespace collapsed to one space: the key two splits may not share."""
    return " ".join(text.split())


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


def _unique(pairs: list[tuple], key: Callable, seen: set) -> list[tuple]:
    """Pairs whose key is not in `seen` nor repeated (first one kept); adds the kept keys to `seen`."""
    unique = []
    for pair in pairs:
        if key(pair) not in seen:
            seen.add(key(pair))
            unique.append(pair)
    return unique


def _classification_splits(name: str, functions: dict, label_of: Callable, text_of: Callable,
                           n_labels: int, per_label: dict[str, int],
                           shows_label: Callable[[str, int], bool] = lambda text, label: True) -> dict:
    """{split: examples for each of SPLITS, "files": {split: sorted source files}}.

    `shows_label(text, label)`: is the label visible in the clipped text (else the example is dropped)?
    """
    splits: dict = {"files": {}}
    seen: set[str] = set()  # normalised texts of the splits already made (train first)
    for split in SPLITS:
        by_label: dict[int, list] = {i: [] for i in range(n_labels)}
        for fn in functions[split]:
            label = label_of(fn)
            if label is not None and len(fn.body.strip().splitlines()) >= 2:
                text = _clip(text_of(fn), _MAX_SOURCE_CHARS)
                if shows_label(text, label):
                    by_label[label].append((ClassificationExample(text=text, label=label), fn.file))
        taken = set(seen)  # no text twice in this split, nor one of an earlier split
        by_label = {k: _unique(v, lambda pair: normalized(pair[0].text), taken) for k, v in by_label.items()}
        chosen = _balanced(by_label, per_label[split], _rng(name, split))
        splits[split] = [example for example, _ in chosen]
        splits["files"][split] = sorted({file for _, file in chosen})
        seen |= {normalized(example.text) for example in splits[split]}
    return splits


def _stdlib_module_task(functions: dict) -> dict:
    def label_of(fn: FunctionRecord) -> int | None:
        package = fn.file.split("/", 1)[0]
        return STDLIB_PACKAGES.index(package) if "/" in fn.file and package in STDLIB_PACKAGES else None

    splits = _classification_splits("stdlib-module", functions, label_of, lambda fn: fn.source,
                                     len(STDLIB_PACKAGES), {"train": 300, "validation": 50, "test": 50})
    return dict(name="stdlib-module", kind="classification", labels=STDLIB_PACKAGES, **splits,
                description="which standard-library package a function's source comes from",
                template="{text}\n# Which standard-library package is this function from?\n# Answer:")


def _def_kind_task(functions: dict) -> dict:
    def label_of(fn: FunctionRecord) -> int | None:
        return DEF_KINDS.index(fn.kind) if fn.kind in DEF_KINDS else None

    def shows_label(text: str, label: int) -> bool:
        # A generator is one because it yields: the text the model reads must show the yield.
        return DEF_KINDS[label] != "generator" or _YIELD.search(text) is not None

    splits = _classification_splits("def-kind", functions, label_of, lambda fn: fn.body, len(DEF_KINDS),
                                     {"train": 400, "validation": 100, "test": 100}, shows_label=shows_label)
    return dict(name="def-kind", kind="classification", labels=DEF_KINDS, **splits,
                description="whether the body of a def belongs to a plain function, a method or a generator",
                template="{text}\n# Is this the body of a function, a method or a generator?\n# Answer:")


# --------------------------------------------------------------------------------------------
# Multiple-choice tasks: one question per function, distractors from other files of the split
# --------------------------------------------------------------------------------------------

# (question, right choice, source file, the item's key for distractors) of one function, or None.
_Item = tuple[str, str, str, object]
_MC_SIZES = {"train": 2000, "validation": 300, "test": 300}


def _multiple_choice_splits(name: str, functions: dict, item_of: Callable, distractor_pool: Callable,
                            fits: Callable, draw: Callable | None = None) -> dict:
    """{split: examples, "files": {split: files}} of a multiple-choice task.

    `item_of(fn, rng)`: an `_Item` or None; `distractor_pool(functions of the split)`: [(choice,
    file, key)]; `fits(item key, candidate key)`: may that candidate be a distractor of the item?
    `draw(right, file, key, pool, rng)`: the distractors as `_draw_distractors` returns them
    (which it is by default), for a task whose pool holds parts of choices.
    """
    splits: dict = {"files": {}}
    seen: set[str] = set()
    for split in SPLITS:
        rng = _rng(name, split)
        ordered = sorted(functions[split], key=lambda fn: (fn.file, fn.signature, fn.source))
        items = [item for fn in ordered if (item := item_of(fn, rng)) is not None]
        items = [item for item, in _unique([(it,) for it in items], lambda pair: normalized(pair[0][0]), set(seen))]
        rng.shuffle(items)
        pool = distractor_pool(functions[split])
        examples, files = [], set()
        for question, right, file, key in items:
            if len(examples) == _MC_SIZES[split]:
                break
            if draw is None:
                distractors = _draw_distractors(right, file, key, pool, fits, rng)
            else:
                distractors = draw(right, file, key, pool, rng)
            if distractors is None:
                continue
            answer = len(examples) % N_CHOICES  # every position equally often: the majority rate is chance
            choices = [choice for choice, _, _ in distractors]
            choices.insert(answer, right)
            examples.append(MultipleChoiceExample(question=question, choices=choices, answer=answer))
            files.update([file, *(f for _, f, _ in distractors)])
        if not examples:
            raise UserInputError(f"no {split} examples for task {name}; expected a larger corpus")
        splits[split] = examples
        splits["files"][split] = sorted(files)
        seen |= {normalized(ex.question) for ex in examples}
    return splits


def _draw_distractors(right: str, file: str, key, pool: list, fits: Callable, rng: random.Random) -> list | None:
    """N_CHOICES - 1 pool entries of other files, distinct from `right` and each other, that
    `fits`; None when 200 draws find too few."""
    chosen: list = []
    for _ in range(200):
        choice, other_file, other_key = pool[rng.randrange(len(pool))]
        if (other_file != file and choice != right and all(choice != c for c, _, _ in chosen)
                and fits(key, other_key)):
            chosen.append((choice, other_file, other_key))
            if len(chosen) == N_CHOICES - 1:
                return chosen
    return None


def _parameter_names(fn: FunctionRecord) -> list[str]:
    args = fn.node.args
    return [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg)
            if a is not None]


def _signature_match_task(functions: dict) -> dict:
    def usable(fn: FunctionRecord) -> bool:
        body_names = set(re.findall(r"\w+", fn.body))
        used = [p for p in _parameter_names(fn) if p not in _NAME_NOT_A_TARGET and p in body_names]
        return (fn.kind != "coroutine" and len(fn.body.strip().splitlines()) >= 2
                and len(fn.signature) <= _MAX_SIGNATURE_CHARS and bool(used))

    def item_of(fn: FunctionRecord, rng) -> _Item | None:
        if not usable(fn):
            return None
        question = (f"{_clip(fn.body, _MAX_SOURCE_CHARS)}\n"
                    "# Which def line does this body belong to?\n# Answer:")
        return question, fn.signature, fn.file, fn.name

    def pool(split_functions) -> list:
        return [(fn.signature, fn.file, fn.name) for fn in split_functions if usable(fn)]

    splits = _multiple_choice_splits("signature-match", functions, item_of, pool,
                                     fits=lambda name, other_name: name != other_name)
    return dict(name="signature-match", kind="multiple_choice", labels=(), **splits,
                description="pick the def line of a function from its body, among 4 (distractors: def lines "
                            "of functions of other files of the same split)")


def _statement_lines(fn: FunctionRecord) -> list[tuple[int, str]]:
    """(line number in `fn.source`, the line) of the one-line statements of the def's body
    after its first line, indented with spaces, 8-80 characters of code, not the docstring."""
    if not _positions_hold(fn):
        return []
    lines = fn.source.splitlines()
    docstring = fn.node.body[0] if ast.get_docstring(fn.node) is not None else None
    found = []
    for node in ast.walk(fn.node):
        if (isinstance(node, ast.stmt) and node is not fn.node and node is not docstring
                and node.lineno == node.end_lineno and node.lineno > 2 and node.lineno <= len(lines)):
            line = lines[node.lineno - 1]
            indent = line[: len(line) - len(line.lstrip())]
            code = line.strip()
            if indent and set(indent) == {" "} and 8 <= len(code) <= 80 and not code.startswith("#"):
                found.append((node.lineno, line))
    return sorted(set(found))


def _similar_length(a: str, b: str) -> bool:
    # Summed log-likelihood favours short answers: the choices of one question are alike in length.
    return abs(len(a) - len(b)) <= max(3, len(a) // 5)


_NOT_CONTEXT = frozenset(keyword.kwlist) | {"self", "cls"}


def _identifiers(code: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w+", code))


def _next_line_task(functions: dict) -> dict:
    def item_of(fn: FunctionRecord, rng) -> _Item | None:
        # At least two lines of the def before the line (its def line and one more), and a line
        # that continues them: it names something they named (besides self / cls and keywords).
        lines = fn.source.splitlines()
        candidates = [(lineno, line) for lineno, line in _statement_lines(fn) if lineno > 3 and
                      (_identifiers(line) - _NOT_CONTEXT) & _identifiers("\n".join(lines[: lineno - 1]))]
        if not candidates:
            return None
        lineno, line = candidates[rng.randrange(len(candidates))]
        indent = line[: len(line) - len(line.lstrip())]
        before = "\n".join(lines[: lineno - 1])
        # The question ends one space short of the line's indentation: the answer's separating
        # space completes it, as ref-lm's tokenizer splits "    x" into "   " + " x".
        question = _clip_left(before, _MAX_SOURCE_CHARS) + "\n" + indent[:-1]
        own = (frozenset(s.strip() for s in fn.source.splitlines()), frozenset(_identifiers(fn.source)))
        return question, line.strip(), fn.file, (line.strip(), own)

    def pool(split_functions) -> list:
        return [(line.strip(), fn.file, (line.strip(), None))
                for fn in split_functions for _, line in _statement_lines(fn)]

    def fits(key, other_key) -> bool:
        # A distractor is recognisably from elsewhere: not a line of this def, and it names
        # something this def never does (a generic line such as `return result` could be right).
        (right, (own_lines, own_names)), (other, _) = key, other_key
        return other not in own_lines and bool(_identifiers(other) - own_names) and _similar_length(right, other)

    splits = _multiple_choice_splits("next-line", functions, item_of, pool, fits)
    return dict(name="next-line", kind="multiple_choice", labels=(), **splits,
                description="pick the real next line of a function's code (one that names something the lines "
                            "before it named) among 4 (distractors: statement lines of similar length from other "
                            "files of the same split that name something the function does not)")


def _local_names(fn: FunctionRecord) -> set[str]:
    """The def's parameters and the names it assigns (not self / cls / _)."""
    assigned = {n.id for n in ast.walk(fn.node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return (assigned | set(_parameter_names(fn))) - _NAME_NOT_A_TARGET


def _name_uses(fn: FunctionRecord) -> list[tuple[int, int, str]]:
    """(line, column, name) of each read of a local name after the def line that follows a
    space and comes after an earlier mention of the name (in `fn.source` coordinates)."""
    if not _positions_hold(fn):
        return []
    lines = fn.source.splitlines()
    names = _local_names(fn)
    uses = []
    for node in ast.walk(fn.node):
        column = node.col_offset - fn.column if isinstance(node, ast.Name) else 0
        if (isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id in names
                and len(node.id) >= 2 and 2 < node.lineno <= len(lines) and column > 0):
            line = lines[node.lineno - 1]
            before = "\n".join(lines[: node.lineno - 1]) + "\n" + line[: column - 1]
            if (line[column - 1] == " " and line[column : column + len(node.id)] == node.id
                    and re.search(rf"\b{re.escape(node.id)}\b", before)):
                uses.append((node.lineno, column, node.id))
    return sorted(set(uses))


def _local_name_task(functions: dict) -> dict:
    def item_of(fn: FunctionRecord, rng) -> _Item | None:
        uses = _name_uses(fn)
        if not uses:
            return None
        lineno, column, name = uses[rng.randrange(len(uses))]
        lines = fn.source.splitlines()
        # Up to the space before the name: the answer's separating space is that space.
        before = "\n".join(lines[: lineno - 1] + [lines[lineno - 1][: column - 1]])
        words = frozenset(re.findall(r"\w+", fn.source))
        return _clip_left(before, _MAX_SOURCE_CHARS), name, fn.file, (name, words)

    def pool(split_functions) -> list:
        return [(name, fn.file, (name, frozenset())) for fn in split_functions if _positions_hold(fn)
                for name in sorted(_local_names(fn)) if len(name) >= 2]

    def fits(key, other_key) -> bool:
        (right, own_words), (other, _) = key, other_key
        return other not in own_words and _similar_length(right, other)

    splits = _multiple_choice_splits("local-name", functions, item_of, pool, fits)
    return dict(name="local-name", kind="multiple_choice", labels=(), **splits,
                description="pick the name that comes next in a function's code (one it defined earlier) among 4 "
                            "(distractors: local names of similar length from functions of other files)")


_CLOSING = {"(": ")", "[": "]", "{": "}"}
_MAX_BRACKET_LINE = 100


@dataclass(frozen=True)
class _ClosingRun:
    """How a line of a def ends: `closers`, >= 2 adjacent closing brackets, then only `trailing`
    ("", ":" or ",")."""

    lineno: int  # in `fn.source`
    start: int  # column of the first closer
    closers: str
    trailing: str
    cut: int  # column of the line's last token before the closers that follows a space
    opened: tuple[int, int]  # (line, column) of the outermost bracket the closers close


def _tokens(source: str) -> list[tokenize.TokenInfo]:
    try:
        return list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, SyntaxError):
        return []


def _closing_runs(fn: FunctionRecord) -> list[_ClosingRun]:
    """The closing runs of the def's lines after its def line and one more (lines of at most
    `_MAX_BRACKET_LINE` characters, indented with spaces, with a token before the closers that
    follows a space: where a question can end). Brackets in strings and comments are not counted."""
    if not _positions_hold(fn):
        return []
    tokens = _tokens(fn.source)
    lines = fn.source.splitlines()
    runs, stack = [], []  # stack: (opening bracket, line, column) of the brackets open so far
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token.type != tokenize.OP or token.string not in ")]}":
            if token.type == tokenize.OP and token.string in _CLOSING:
                stack.append((token.string, *token.start))
            i += 1
            continue
        j, closers, opened = i, "", []  # the run of adjacent closing brackets from token i
        while (j < len(tokens) and tokens[j].type == tokenize.OP and tokens[j].string in ")]}"
               and (j == i or tokens[j].start == tokens[j - 1].end)):
            if not stack or _CLOSING[stack[-1][0]] != tokens[j].string:
                return []  # unbalanced: not code to ask about
            opened.append(stack.pop()[1:])
            closers += tokens[j].string
            j += 1
        after, trailing = j, ""
        if (after < len(tokens) and tokens[after].type == tokenize.OP and tokens[after].string in (":", ",")
                and tokens[after].start == tokens[after - 1].end):
            trailing = tokens[after].string
            after += 1
        row, start = token.start
        if (len(closers) >= 2 and row > 2 and after < len(tokens)
                and tokens[after].type in (tokenize.NEWLINE, tokenize.NL)):
            line = lines[row - 1]
            indent = line[: len(line) - len(line.lstrip())]
            cuts = [t.start[1] for t in tokens[:i] if t.start[0] == row and t.start[1] > 0 and t.string
                    and line[t.start[1] - 1] == " "]
            if cuts and len(line) <= _MAX_BRACKET_LINE and set(indent) == {" "}:
                runs.append(_ClosingRun(row, start, closers, trailing, max(cuts), min(opened)))
        i = j
    return runs


def _bracket_close_task(functions: dict) -> dict:
    def item_of(fn: FunctionRecord, rng) -> _Item | None:
        runs = _closing_runs(fn)
        if not runs:
            return None
        run = runs[rng.randrange(len(runs))]
        lines = fn.source.splitlines()
        line = lines[run.lineno - 1]
        # Up to the space before the line's last token that follows one (the answer's separating
        # space is that space): the answer is the rest of the line, e.g. "sorted(set(names))",
        # natural text after " ", where " ))" would not be.
        before = "\n".join(lines[: run.lineno - 1] + [line[: run.cut - 1]])
        question = _clip_left(before, _MAX_SOURCE_CHARS)
        row, column = run.opened  # the question shows every bracket the answer closes
        if len(before) - len(question) > sum(len(text) + 1 for text in lines[: row - 1]) + column:
            return None
        return question, line[run.cut :], fn.file, (line[run.cut : run.start], run.closers, run.trailing)

    def pool(split_functions) -> list:
        return [(run.closers, fn.file, (None, run.closers, None)) for fn in split_functions
                for run in _closing_runs(fn)]

    def fits(key, other_key) -> bool:
        return len(other_key[1]) == len(key[1])

    def draw(right, file, key, pool, rng) -> list | None:
        # Closing runs as long as the right one, from other files: each differs from the right
        # closers, so it closes some bracket with the wrong kind (the right text's brackets are
        # closed in one way only). The text before the closers and after them is the same.
        head, closers, trailing = key
        chosen = _draw_distractors(closers, file, key, pool, fits, rng)
        return None if chosen is None else [(head + other + trailing, f, k) for other, f, k in chosen]

    splits = _multiple_choice_splits("bracket-close", functions, item_of, pool, fits, draw)
    return dict(name="bracket-close", kind="multiple_choice", labels=(), **splits,
                description="pick the right closing brackets of a line of a function's code among 4 (distractors: "
                            "the same text closed by as many closing brackets in another order or kind, a closing "
                            "run of a line of another file of the same split; each closes some bracket wrongly)")
