"""Downstream tasks generated deterministically from the reference corpus.

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

The generated examples are cached as JSONL under `$SLIMTUNE_CACHE/tasks-<hash>/`, together with
one lm-eval task YAML per task (`slimtune_stdlib_module`, `slimtune_docstring_match`,
`slimtune_def_kind`), so that directory is an lm-eval `include_path` (`task_yaml_dir()`).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import json
import platform
import random
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from eval.data import ClassificationExample, MultipleChoiceExample
from eval.errors import UserInputError
from eval.io import atomic_directory, read_json, write_json

TASKS = ("stdlib-module", "docstring-match", "def-kind")
# Part of the cache directory's name: bump it whenever generation changes what the examples are.
TASKS_VERSION = 1
STDLIB_PACKAGES = ("asyncio", "distutils", "idlelib", "importlib", "multiprocessing", "tkinter", "xml")
DEF_KINDS = ("function", "method", "generator")
_MAX_SOURCE_CHARS = 600  # about 150-200 tokens of ref-lm's tokenizer
_MAX_DOCSTRING_CHARS = 300
_MAX_SIGNATURE_CHARS = 100
_CARD = "tasks_card.json"


@dataclass(frozen=True)
class Task:
    """A downstream task: examples (`eval.data` types) and how a causal LM is asked them.

    `labels`: class names (classification; label i is `labels[i]`), empty for multiple choice.
    `template`: the prompt around a classification example's text ("{text}"); a multiple-choice
    example's `question` is already the whole prompt.
    """

    name: str
    kind: str  # "classification" or "multiple_choice"
    labels: tuple[str, ...]
    train: list
    test: list
    description: str = ""
    template: str = "{text}"
    # The corpus files the examples of each split come from (disjoint between the splits).
    files: dict = dataclasses.field(default_factory=dict)

    def split(self, split: str) -> list:
        if split not in ("train", "test"):
            raise UserInputError(f"unknown task split {split!r}; expected 'train' or 'test'")
        return self.train if split == "train" else self.test

    def prompt(self, example) -> str:
        """What a causal LM reads before the answer."""
        if self.kind == "classification":
            return self.template.format(text=example.text)
        return example.question

    def candidates(self, example) -> list[str]:
        """The answers a causal LM chooses among (label names or choices)."""
        return list(self.labels) if self.kind == "classification" else list(example.choices)

    def target(self, example) -> int:
        """Index of the right answer in `candidates(example)`."""
        return example.label if self.kind == "classification" else example.answer


# --------------------------------------------------------------------------------------------
# Loading and the cache
# --------------------------------------------------------------------------------------------


def lm_eval_task_name(name: str) -> str:
    """The lm-eval name of suite task `name` (its YAML's `task:`), e.g. def-kind -> slimtune_def_kind."""
    return "slimtune_" + name.replace("-", "_")


def load_task(name: str) -> Task:
    """One of `TASKS`, generated on first use and read from the cache afterwards."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserInputError(f"unknown task {name!r}{hint}; expected one of {', '.join(TASKS)}")
    return _load_cached_task(name, str(task_yaml_dir()))


def task_yaml_dir() -> Path:
    """The cached task directory: JSONL per task and split, and one lm-eval YAML per task.

    Usable as lm-eval's `include_path`; written once (atomically, under a lock) per task recipe.
    """
    from eval.reference.common import build_lock, cache_root, remove_stale_temporaries

    final = cache_root() / f"tasks-{_tasks_hash()}"
    if (final / _CARD).is_file():
        return final
    with build_lock(final):
        if (final / _CARD).is_file():
            return final
        remove_stale_temporaries(final)
        with atomic_directory(final) as tmp:
            tasks = generate_tasks()
            for task in tasks.values():
                _write_task(task, tmp / task.name, final / task.name)
            write_json(tmp / _CARD, {  # last: the completion mark
                "version": TASKS_VERSION,
                "tasks": {t.name: {"kind": t.kind, "labels": list(t.labels), "train": len(t.train),
                                   "test": len(t.test), "description": t.description,
                                   "template": t.template, "files": t.files} for t in tasks.values()},
            })
    return final


def _tasks_hash() -> str:
    key = {"version": TASKS_VERSION, "python": ".".join(platform.python_version_tuple()[:2]),
           "packages": STDLIB_PACKAGES, "kinds": DEF_KINDS}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


@cache
def _load_cached_task(name: str, directory: str) -> Task:
    meta = read_json(Path(directory) / _CARD, "task card")["tasks"][name]
    splits = {}
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (Path(directory) / name / f"{split}.jsonl").read_text().splitlines()]
        if meta["kind"] == "classification":
            splits[split] = [ClassificationExample(text=r["text"], label=r["label"]) for r in rows]
        else:
            splits[split] = [MultipleChoiceExample(question=r["question"], choices=r["choices"], answer=r["answer"])
                             for r in rows]
    return Task(name=name, kind=meta["kind"], labels=tuple(meta["labels"]), train=splits["train"],
                test=splits["test"], description=meta["description"], template=meta["template"],
                files=meta["files"])


def _write_task(task: Task, out: Path, final: Path) -> None:
    """`train.jsonl` / `test.jsonl` (examples), `lm_eval_*.jsonl` (rendered prompts) + YAML.

    The YAML's data_files name the paths the files will have after the atomic rename (`final`).
    """
    out.mkdir(parents=True)
    for split in ("train", "test"):
        examples = task.split(split)
        _write_jsonl(out / f"{split}.jsonl", [dataclasses.asdict(ex) for ex in examples])
        _write_jsonl(out / f"lm_eval_{split}.jsonl",
                     [{"query": task.prompt(ex), "choices": task.candidates(ex), "answer": task.target(ex)}
                      for ex in examples])
    lm_eval_name = lm_eval_task_name(task.name)
    (out / f"{lm_eval_name}.yaml").write_text(_lm_eval_yaml(lm_eval_name, final), encoding="utf-8")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _lm_eval_yaml(name: str, final: Path) -> str:
    # Every task is scored as multiple choice over its candidates (labels or choices):
    # the log-likelihood of " <candidate>" after the query, as task_accuracy does.
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            train: {json.dumps(str(final / "lm_eval_train.jsonl"))}
            test: {json.dumps(str(final / "lm_eval_test.jsonl"))}
        output_type: multiple_choice
        training_split: train
        test_split: test
        doc_to_text: query
        doc_to_choice: choices
        doc_to_target: answer
        target_delimiter: " "
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
          - metric: acc_norm
            aggregation: mean
            higher_is_better: true
        metadata:
          version: {TASKS_VERSION}
        """)


# --------------------------------------------------------------------------------------------
# Generating the tasks from the corpus
# --------------------------------------------------------------------------------------------


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


def generate_tasks(documents: dict | None = None) -> dict[str, Task]:
    """All tasks, generated from the reference corpus (deterministic; takes a few seconds).

    `documents` ({"train": [...], "test": [...]} of `eval.reference.Document`) replaces the
    corpus (tests use a few files); by default train = the corpus's train split, test = its
    validation + test splits.
    """
    from eval.reference import reference_corpus

    if documents is None:
        documents = {"train": reference_corpus("train"),
                     "test": reference_corpus("validation") + reference_corpus("test")}
    functions = {split: _functions(documents[split]) for split in ("train", "test")}
    builders: dict[str, Callable[[dict], Task]] = {
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


def _stdlib_module_task(functions: dict) -> Task:
    def label_of(fn: FunctionRecord) -> int | None:
        package = fn.file.split("/", 1)[0]
        return STDLIB_PACKAGES.index(package) if "/" in fn.file and package in STDLIB_PACKAGES else None

    splits = _classification_splits("stdlib-module", functions, label_of, lambda fn: fn.source,
                                     len(STDLIB_PACKAGES), train_per_label=300, test_per_label=50)
    return Task(name="stdlib-module", kind="classification", labels=STDLIB_PACKAGES, **splits,
                description="which standard-library package a function's source comes from",
                template="{text}\n# Which standard-library package is this function from?\n# Answer:")


def _def_kind_task(functions: dict) -> Task:
    def label_of(fn: FunctionRecord) -> int | None:
        return DEF_KINDS.index(fn.kind) if fn.kind in DEF_KINDS else None

    splits = _classification_splits("def-kind", functions, label_of, lambda fn: fn.body,
                                     len(DEF_KINDS), train_per_label=400, test_per_label=100)
    return Task(name="def-kind", kind="classification", labels=DEF_KINDS, **splits,
                description="whether the body of a def belongs to a plain function, a method or a generator",
                template="{text}\n# Is this the body of a function, a method or a generator?\n# Answer:")


def _docstring_match_task(functions: dict, n_choices: int = 4) -> Task:
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
    return Task(name="docstring-match", kind="multiple_choice", labels=(), **splits,
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


# --------------------------------------------------------------------------------------------
# Batches and accuracy (shared by every tuning method)
# --------------------------------------------------------------------------------------------


def _check_batching(batch_size: int, seq_len: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserInputError(f"batch_size={batch_size!r} must be a positive integer")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise UserInputError(f"seq_len={seq_len!r} must be an integer >= 2")


def _order(n: int, shuffle: bool, seed: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def classification_batches(examples: Sequence, tokenizer, batch_size: int, seq_len: int, shuffle: bool = False,
                           seed: int = 0) -> list[dict]:
    """Batches for a sequence-classification model: `input_ids`, `attention_mask` ([B, seq_len],
    right-padded, texts truncated on the right) and `labels` ([B] class ids)."""
    _check_batching(batch_size, seq_len)
    if not examples:
        raise UserInputError("no examples to batch; expected at least one")
    pad = _pad_id(tokenizer)
    encoded = tokenizer([ex.text for ex in examples], add_special_tokens=True, verbose=False)["input_ids"]
    order = _order(len(examples), shuffle, seed)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
        for r, i in enumerate(rows):
            ids = encoded[i][:seq_len]
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
        labels = torch.tensor([examples[i].label for i in rows], dtype=torch.long)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def lm_batches(task: Task, split: str, tokenizer, batch_size: int, seq_len: int, shuffle: bool = False,
               seed: int = 0) -> list[dict]:
    """Batches for causal-LM tuning: each example is its prompt + its answer (the label name or
    the right choice), right-padded to `seq_len`; `labels` is -100 except on the answer's
    tokens, so the model learns only the answer. Long prompts lose tokens from the left."""
    from eval.metrics import context_continuation_ids

    _check_batching(batch_size, seq_len)
    examples = task.split(split)
    pad = _pad_id(tokenizer)
    sequences = []
    for ex in examples:
        answer = " " + task.candidates(ex)[task.target(ex)]
        sequences.append(context_continuation_ids(tokenizer, task.prompt(ex), answer, max_length=seq_len))
    order = _order(len(sequences), shuffle, seed)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
        labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            ids, n_answer = sequences[i]
            input_ids[r, : len(ids)] = torch.tensor(ids)
            attention_mask[r, : len(ids)] = 1
            labels[r, len(ids) - n_answer : len(ids)] = torch.tensor(ids[len(ids) - n_answer :])
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def task_accuracy(model, tokenizer, task: Task, split: str = "test", batch_size: int = 8,
                  max_examples: int | None = None) -> float:
    """The one accuracy every method reports on a task.

    A causal LM (logits [batch, seq, vocab]) picks the candidate (label name or choice) with the
    highest summed log-likelihood after the prompt; a sequence-classification model (logits
    [batch, num_labels]) the argmax of its logits on the example's text.
    """
    from eval.metrics import classification_accuracy, multiple_choice_accuracy

    examples = task.split(split)
    if max_examples is not None:
        if not isinstance(max_examples, int) or max_examples < 1:
            raise UserInputError(f"max_examples={max_examples!r} must be a positive integer or None")
        examples = examples[:max_examples]
    if _is_sequence_classifier(model, tokenizer):
        if task.kind != "classification":
            raise UserInputError(f"task {task.name!r} is multiple choice; a sequence-classification model cannot "
                                 "score it (use a causal LM)")
        return classification_accuracy(model, tokenizer, examples, batch_size=batch_size)
    questions = [MultipleChoiceExample(question=task.prompt(ex), choices=task.candidates(ex), answer=task.target(ex))
                 for ex in examples]
    return multiple_choice_accuracy(model, tokenizer, questions, batch_size=batch_size)


def _is_sequence_classifier(model, tokenizer) -> bool:
    """Does the model return one row of logits per sequence (not per token)?"""
    from eval.metrics import model_device

    kind = type(model).__name__
    if kind.endswith("ForSequenceClassification"):
        return True
    if kind.endswith("ForCausalLM"):
        return False
    # Anything else (a wrapper): look at the shape of its logits on one token.
    ids = tokenizer("x", return_tensors="pt")["input_ids"].to(model_device(model))
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.dim() == 2
