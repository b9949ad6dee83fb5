"""The suite's downstream tasks as the harness sees them: `Task`, loading, batches, accuracy.

One task interface serves the built-in tasks and the user's own data:

- `Task`: a name, a `kind` (one of `TASK_KINDS`), and three splits (`SPLITS`: train, validation,
  test) of `eval.data` examples. Validation exists to choose settings (learning rate, steps,
  presets); test is only ever scored. Splits share no source document (built-in tasks) or row
  (user data).
- Kinds: `classification` (`ClassificationExample`: text, integer label into `Task.labels`),
  `multiple_choice` (`MultipleChoiceExample`: question, choices, answer index) and
  `instruction` (`InstructionExample`: instruction, input, output; the loss falls on the
  output's tokens only, and it is scored by held-out loss, not accuracy).
- `TaskSpec`: what a user asked for (`--task` and its column / split flags), JSON-able so it
  crosses into the fresh measurement processes. `load_task(spec)` takes a `TaskSpec`, its dict,
  or a plain string: a built-in name (`BUILTIN_TASKS`), a local file or folder, or `hf:NAME`.

The built-in tasks (`stdlib-module`, `def-kind`, `signature-match`, and the zero-shot tasks
`next-line`, `local-name` and `bracket-close`) are generated from the reference corpus by
`eval.reference.tasks` and ship with the suite as files (`SHIPPED_TASKS`: JSONL per task and
split, a card, and `checksums.json`), so every machine scores the same examples; a missing or
corrupted file is one error, and only an explicit rebuild (`docs/recipes/build_tasks.py`)
regenerates them.
`task_yaml_dir()` renders them for lm-eval into `$SLIMTUNE_CACHE/tasks-<hash>/`: one YAML per
task (`slimtune_def_kind`, ...) with train / validation / test splits, so that directory is an
lm-eval `include_path`. The user's data is read by `eval.user_tasks`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from eval.data import ClassificationExample, InstructionExample, MultipleChoiceExample
from eval.errors import UserInputError, require_positive
from eval.io import atomic_directory, read_json, write_json
from eval.reference.common import build_lock, cache_root, remove_stale_temporaries
from eval.reference.corpus import sha256_hex
from eval.reference.shipped import CHECKSUMS_NAME, SHIPPED_ROOT
from eval.reference.tasks import TASKS, TASKS_VERSION, generate_tasks, generation_info

_CARD = "tasks_card.json"
# The task files that ship with the suite (`write_task_files`); only `docs/recipes/build_tasks.py
# --ship` (a developer's explicit rebuild) writes them.
SHIPPED_TASKS = SHIPPED_ROOT / "tasks"
REBUILD_RECIPE = "docs/recipes/build_tasks.py"
_YAML_FORMAT = 2  # bump when the rendered lm-eval files or YAML change
BUILTIN_TASKS = TASKS  # the names `load_task` resolves to generated tasks
TASK_KINDS = ("classification", "multiple_choice", "instruction")
SPLITS = ("train", "validation", "test")
# Roles of a user's columns (`TaskSpec.columns` keys), each with the names tried when the user
# names none, in order. One table: the CLI's --*-column flags and the loader both read it.
COLUMN_ROLES: dict[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "sentence1", "question1", "premise"),
    "text_pair": ("text_pair", "sentence2", "question2", "hypothesis"),
    "label": ("label", "labels"),
    "question": ("question",),
    "choices": ("choices",),
    "answer": ("answer",),
    "instruction": ("instruction",),
    "input": ("input",),
    "output": ("output",),
    "messages": ("messages",),
}


@dataclass(frozen=True)
class TaskSpec:
    """What the user asked to tune on; every field is JSON-able (`dataclasses.asdict` / `TaskSpec(**d)`).

    `source`: a built-in task name, a local file or folder (CSV, TSV, JSON, JSONL, Parquet, or a
    `datasets.save_to_disk` directory), or `hf:NAME` for a dataset in the local `datasets` cache
    (`config`: its configuration, e.g. GLUE's `sst2`). `kind`: one of `TASK_KINDS`, or None to
    infer it from the columns. `columns`: {role: column name} for the roles in `COLUMN_ROLES`
    the user named. `labels`: class names for integer labels without a `ClassLabel`.
    `validation_fraction` / `test_fraction`: carved by a seeded shuffle from data that has no
    such split. `train_examples`: a seeded sample of train (None: all of it). Built-in tasks
    take only `source` and `train_examples`.
    """

    source: str
    config: str | None = None
    kind: str | None = None
    columns: dict = dataclasses.field(default_factory=dict)
    labels: tuple[str, ...] | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    train_examples: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise UserInputError("task source is empty; expected a built-in task name "
                                 f"({', '.join(BUILTIN_TASKS)}), a local file or folder, or hf:NAME")
        if self.kind is not None and self.kind not in TASK_KINDS:
            raise UserInputError(f"unknown task kind {self.kind!r}; expected one of {', '.join(TASK_KINDS)}")
        unknown = sorted(set(self.columns) - set(COLUMN_ROLES))
        if unknown:
            raise UserInputError(f"unknown column role(s) {', '.join(unknown)}; expected some of "
                                 f"{', '.join(COLUMN_ROLES)}")
        for name in ("validation_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise UserInputError(f"{name} must be in [0, 1), got {value}")
        if self.validation_fraction + self.test_fraction >= 1.0:
            raise UserInputError("validation_fraction + test_fraction must leave some training data (< 1), got "
                                 f"{self.validation_fraction + self.test_fraction}")
        if self.train_examples is not None:
            require_positive("train_examples", self.train_examples)
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_TASKS


@dataclass(frozen=True)
class Task:
    """A downstream task: examples (`eval.data` types) and how a causal LM is asked them.

    `labels`: class names (classification; label i is `labels[i]`), empty for multiple choice.
    `template`: the prompt around a classification example's text ("{text}"); a multiple-choice
    example's `question` is already the whole prompt.
    """

    name: str
    kind: str  # one of TASK_KINDS
    labels: tuple[str, ...]
    train: list
    test: list
    validation: list = dataclasses.field(default_factory=list)
    description: str = ""
    template: str = "{text}"
    # The corpus files the examples of each split come from (disjoint between the splits).
    files: dict = dataclasses.field(default_factory=dict)

    def split(self, split: str) -> list:
        """The examples of `split` (one of `SPLITS`); an empty validation split is an error, so
        nothing silently selects on nothing."""
        if split not in SPLITS:
            raise UserInputError(f"unknown task split {split!r}; expected one of {', '.join(SPLITS)}")
        examples = getattr(self, split)
        if split == "validation" and not examples:
            raise UserInputError(f"task {self.name!r} has no validation split; settings must be chosen on "
                                 "validation data (give the data a validation split or --validation-fraction)")
        return examples

    def prompt(self, example, tokenizer=None) -> str:
        """What a causal LM reads before the answer. An instruction is rendered with `tokenizer`'s
        chat template when it has one (`instruction_prompt`)."""
        if self.kind == "classification":
            return self.template.format(text=example.text)
        if self.kind == "instruction":
            return instruction_prompt(example, tokenizer)
        return example.question

    def answer(self, example) -> str:
        """What a causal LM is trained to write after `prompt(example)` (the loss falls on it
        alone): " <label name>" or " <right choice>", or an instruction's output."""
        if self.kind == "instruction":
            return example.output
        return " " + self.candidates(example)[self.target(example)]

    def candidates(self, example) -> list[str]:
        """The answers a causal LM chooses among (label names or choices)."""
        if self.kind == "instruction":
            raise UserInputError(f"task {self.name!r} is an instruction task: it has no answers to choose "
                                 "among; it is scored by held-out loss")
        return list(self.labels) if self.kind == "classification" else list(example.choices)

    def target(self, example) -> int:
        """Index of the right answer in `candidates(example)`."""
        return example.label if self.kind == "classification" else example.answer


# The plain prompt of an instruction example when the tokenizer has no chat template (Alpaca's
# own format, so that models tuned on Alpaca see what they were tuned with).
INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
INSTRUCTION_WITH_INPUT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
# A chat's turns in the plain format: a user turn reads as an instruction, an assistant turn as a
# response, so a one-turn chat renders exactly as an Alpaca record without input.
CHAT_TURN_HEADINGS = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}


def instruction_messages(example: InstructionExample) -> list[dict]:
    """The example as chat turns before the response: its `messages`, or one user turn holding
    the instruction and (after a blank line) the input."""
    if example.messages:
        return [dict(m) for m in example.messages]
    content = example.instruction + (f"\n\n{example.input}" if example.input else "")
    return [{"role": "user", "content": content}]


def instruction_prompt(example: InstructionExample, tokenizer=None) -> str:
    """The prompt of an instruction example: `tokenizer`'s chat template (with the generation
    prompt) when it has one, else the plain template (`INSTRUCTION_TEMPLATE`, `CHAT_TURN_HEADINGS`)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(instruction_messages(example), tokenize=False,
                                             add_generation_prompt=True)
    if example.messages:
        turns = [f"{CHAT_TURN_HEADINGS.get(m['role'], '### ' + m['role'].title() + ':')}\n{m['content']}\n\n"
                 for m in example.messages]
        return "".join(turns) + CHAT_TURN_HEADINGS["assistant"] + "\n"
    template = INSTRUCTION_WITH_INPUT_TEMPLATE if example.input else INSTRUCTION_TEMPLATE
    return template.format(instruction=example.instruction, input=example.input)


# --------------------------------------------------------------------------------------------
# Loading: the shipped task files, and the lm-eval view of them in the cache
# --------------------------------------------------------------------------------------------


def lm_eval_task_name(name: str) -> str:
    """The lm-eval name of suite task `name` (its YAML's `task:`), e.g. def-kind -> slimtune_def_kind."""
    return "slimtune_" + name.replace("-", "_")


def load_task(spec: str | dict | TaskSpec) -> Task:
    """The task `spec` names: a built-in task (read from the files that ship with the suite), or
    the user's data (`eval.user_tasks.load_user_task`). A string is `TaskSpec(source=string)`."""
    if isinstance(spec, dict):
        spec = TaskSpec(**spec)
    elif isinstance(spec, str):
        spec = TaskSpec(source=spec)
    if spec.is_builtin:
        task = _load_builtin_task(spec.source)
        picked = sampled_train_positions(len(task.train), spec)
        if picked is not None:
            task = dataclasses.replace(task, train=[task.train[i] for i in picked])
        return task
    if _looks_like_user_data(spec.source):
        from eval.user_tasks import load_user_task

        return load_user_task(spec)
    return _load_builtin_task(spec.source)  # an unknown name: the error lists the built-in tasks


def sampled_train_positions(count: int, spec: TaskSpec) -> list[int] | None:
    """The positions of the `spec.train_examples` training rows a run uses out of `count` (a
    seeded `random.sample`), or None to use them all. The one sampling rule: built-in tasks,
    the user's data (sampled before its rows become examples) and `tune` all take these."""
    if spec.train_examples is None or spec.train_examples >= count:
        return None
    import random

    return random.Random(spec.seed).sample(range(count), spec.train_examples)


def _looks_like_user_data(source: str) -> bool:
    return source.startswith("hf:") or Path(source).expanduser().exists() or any(
        sep in source for sep in ("/", "\\")) or Path(source).suffix != ""


def _load_builtin_task(name: str) -> Task:
    """One of `TASKS`, read from the shipped task files (checked against their checksums)."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=3, cutoff=0.5)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        raise UserInputError(f"unknown task {name!r}{hint}; expected one of {', '.join(TASKS)}")
    return read_task(name, str(shipped_tasks_dir()))


def shipped_tasks_dir() -> Path:
    """`SHIPPED_TASKS`, after checking every file against its `checksums.json` (once per process)."""
    return _verified(str(SHIPPED_TASKS))


@cache
def _verified(directory: str) -> Path:
    folder = Path(directory)
    how = f"reinstall slimtune, or regenerate the tasks with `python {REBUILD_RECIPE} --ship`"
    if not (folder / CHECKSUMS_NAME).is_file():
        raise UserInputError(f"the shipped task files are missing ({folder / CHECKSUMS_NAME} not found); {how}")
    for name, expected in read_json(folder / CHECKSUMS_NAME, what="shipped task checksums").items():
        path = folder / name
        if not path.is_file():
            raise UserInputError(f"the shipped task file {path} is missing; {how}")
        if sha256_hex(path.read_bytes()) != expected:
            raise UserInputError(f"the shipped task file {path} is corrupted (its SHA-256 does not match "
                                 f"{CHECKSUMS_NAME}); {how}")
    return folder


def build_tasks(documents: dict | None = None) -> dict[str, Task]:
    """Every task, generated from the reference corpus (`eval.reference.tasks.generate_tasks`:
    `documents` replaces the corpus, as there). Only a rebuild does this; loading reads the shipped files."""
    return {name: Task(**fields) for name, fields in generate_tasks(documents).items()}


def write_task_files(tasks: dict[str, Task], out: str | Path) -> Path:
    """The task files of `tasks` in a new directory `out` (atomically): `<task>/<split>.jsonl`
    per split, `tasks_card.json` (kinds, labels, sizes, prompts, source files, what generated
    them) and, last, `checksums.json` (the SHA-256 of every other file)."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        for task in tasks.values():
            (tmp / task.name).mkdir()
            for split in SPLITS:
                _write_jsonl(tmp / task.name / f"{split}.jsonl", [dataclasses.asdict(ex) for ex in task.split(split)])
        write_json(tmp / _CARD, {
            "generated": generation_info(),
            "tasks": {t.name: {"kind": t.kind, "labels": list(t.labels), "description": t.description,
                               "template": t.template, **{split: len(getattr(t, split)) for split in SPLITS},
                               "files": t.files} for t in tasks.values()},
        })
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        write_json(tmp / CHECKSUMS_NAME, {name: sha256_hex((tmp / name).read_bytes()) for name in files})
    return out


def rebuild_tasks(out: str | Path) -> dict:
    """Generate every task from this machine's corpus into `out` and compare with the shipped
    files: {task: {split: same examples?}} (they differ where the local standard library does)."""
    write_task_files(build_tasks(), out)
    shipped = read_json(SHIPPED_TASKS / CHECKSUMS_NAME, what="shipped task checksums") \
        if (SHIPPED_TASKS / CHECKSUMS_NAME).is_file() else {}
    rebuilt = read_json(Path(out) / CHECKSUMS_NAME, what="rebuilt task checksums")
    return {name: {split: shipped.get(f"{name}/{split}.jsonl") == rebuilt[f"{name}/{split}.jsonl"]
                   for split in SPLITS} for name in TASKS}


def task_yaml_dir(tasks_dir: str | Path | None = None) -> Path:
    """The lm-eval view of the task files in `tasks_dir` (default: the shipped ones): one YAML per
    task and its prompts rendered per split (`lm_eval_<split>.jsonl`), in the cache.

    Usable as lm-eval's `include_path`; written once (atomically, under a lock) per content of
    the task files (named by a hash of their checksums).
    """
    source = shipped_tasks_dir() if tasks_dir is None else Path(tasks_dir)
    key = sha256_hex(f"{_YAML_FORMAT}\n".encode() + (source / CHECKSUMS_NAME).read_bytes())[:12]
    final = cache_root() / f"tasks-{key}"
    if (final / _CARD).is_file():
        return final
    with build_lock(final):
        if (final / _CARD).is_file():
            return final
        remove_stale_temporaries(final)
        with atomic_directory(final) as tmp:
            for name in read_json(source / _CARD, what="task card")["tasks"]:
                _write_lm_eval_task(read_task(name, str(source)), tmp / name, final / name)
            shutil.copy2(source / _CARD, tmp / _CARD)  # last: the completion mark
    return final


@cache
def read_task(name: str, directory: str) -> Task:
    """Task `name` from a directory of task files (`write_task_files`), every line checked."""
    card = read_json(Path(directory) / _CARD, what="task card")["tasks"]
    if name not in card:
        raise UserInputError(f"task {name!r} is not in {Path(directory) / _CARD}; it has {', '.join(card)}")
    meta = card[name]
    splits = {}
    for split in SPLITS:
        path = Path(directory) / name / f"{split}.jsonl"
        if not path.is_file():
            raise UserInputError(f"task file {path} is missing; expected {', '.join(SPLITS)} splits "
                                 f"(regenerate the tasks with `python {REBUILD_RECIPE} --ship`)")
        rows = [_task_row(path, i, line, meta) for i, line in enumerate(path.read_text().splitlines(), 1)]
        if meta["kind"] == "classification":
            splits[split] = [ClassificationExample(text=r["text"], label=r["label"]) for r in rows]
        else:
            splits[split] = [MultipleChoiceExample(question=r["question"], choices=r["choices"], answer=r["answer"])
                             for r in rows]
    return Task(name=name, kind=meta["kind"], labels=tuple(meta["labels"]), description=meta["description"],
                template=meta["template"], files=meta["files"], **splits)


def _task_row(path: Path, line_number: int, line: str, meta: dict) -> dict:
    """One example of a task file, checked: a missing or out-of-range label is named, not a KeyError later."""
    classification = meta["kind"] == "classification"
    fields = ("text", "label") if classification else ("question", "choices", "answer")
    answer = fields[-1]
    try:
        row = json.loads(line)
        problem = None if isinstance(row, dict) else "is not a JSON object"
    except json.JSONDecodeError as e:
        row, problem = None, f"is not JSON ({e.msg})"
    if problem is None and any(f not in row for f in fields):
        problem = "has no " + ", ".join(repr(f) for f in fields if f not in row)
    if problem is None:
        count = len(meta["labels"]) if classification else len(row["choices"])
        if not (isinstance(row[answer], int) and 0 <= row[answer] < count):
            problem = f"has {answer} {row[answer]!r}, expected an index in [0, {count})"
    if problem is not None:
        raise UserInputError(f"task file {path}, line {line_number} {problem}; the task files are damaged: "
                             f"reinstall slimtune, or regenerate them with `python {REBUILD_RECIPE} --ship`")
    return row


def _write_lm_eval_task(task: Task, out: Path, final: Path) -> None:
    """`lm_eval_<split>.jsonl` (rendered prompts) per split + the task's YAML.

    The YAML's data_files name the paths the files will have after the atomic rename (`final`).
    """
    out.mkdir(parents=True)
    for split in SPLITS:
        _write_jsonl(out / f"lm_eval_{split}.jsonl",
                     [{"query": task.prompt(ex), "choices": task.candidates(ex), "answer": task.target(ex)}
                      for ex in task.split(split)])
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
            validation: {json.dumps(str(final / "lm_eval_validation.jsonl"))}
            test: {json.dumps(str(final / "lm_eval_test.jsonl"))}
        output_type: multiple_choice
        training_split: train
        validation_split: validation
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
# Batches and accuracy (shared by every tuning method)
# --------------------------------------------------------------------------------------------


def _check_batching(batch_size: int, seq_len: int) -> None:
    require_positive("batch_size", batch_size)
    require_positive("seq_len", seq_len, minimum=2)


def _order(n: int, shuffle: bool, seed: int) -> list[int]:
    if not shuffle:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def _right_padded(sequences: list[list[int]], seq_len: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [len(sequences), seq_len]: each sequence (at most seq_len
    tokens) at the left, `pad` after it."""
    input_ids = torch.full((len(sequences), seq_len), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), seq_len), dtype=torch.long)
    for r, ids in enumerate(sequences):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    return input_ids, attention_mask


def classification_batches(examples: Sequence, tokenizer, batch_size: int, seq_len: int, shuffle: bool = False,
                           seed: int = 0) -> list[dict]:
    """Batches for a sequence-classification model: `input_ids`, `attention_mask` ([B, seq_len],
    right-padded, texts truncated on the right) and `labels` ([B] class ids)."""
    _check_batching(batch_size, seq_len)
    if not examples:
        raise UserInputError("no examples to batch; expected at least one")
    pad = _pad_id(tokenizer)
    encoded = tokenizer([ex.text for ex in examples], add_special_tokens=True, verbose=False)["input_ids"]
    sequences = [ids[:seq_len] for ids in encoded]
    order = _order(len(examples), shuffle, seed)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = _right_padded([sequences[i] for i in rows], seq_len, pad)
        labels = torch.tensor([examples[i].label for i in rows], dtype=torch.long)
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def lm_batches(task: Task, split: str, tokenizer, batch_size: int, seq_len: int, shuffle: bool = False,
               seed: int = 0, max_examples: int | None = None) -> list[dict]:
    """Batches for causal-LM tuning: each example is its prompt + its answer (`Task.answer`: the
    label name, the right choice or the instruction's output), right-padded to `seq_len`; `labels`
    is -100 except on the answer's tokens, so the model learns only the answer. Long prompts lose
    tokens from the left; an instruction's response keeps its start (`response_ids`).
    `max_examples`: the first that many examples of the split only."""
    from eval.metrics import split_continuation

    _check_batching(batch_size, seq_len)
    examples = task.split(split)
    if max_examples is not None:
        examples = examples[: require_positive("max_examples", max_examples)]
    pad = _pad_id(tokenizer)
    if task.kind == "instruction":
        sequences = response_ids(tokenizer, [task.prompt(ex, tokenizer) for ex in examples],
                                 [task.answer(ex) for ex in examples], seq_len)
    else:  # context_continuation_ids per example, with the tokenizer called once per chunk (fast on 100k rows)
        sequences = []
        for start in range(0, len(examples), 1024):
            chunk = examples[start:start + 1024]
            prompts = [task.prompt(ex) for ex in chunk]
            contexts = tokenizer(prompts, verbose=False)["input_ids"]
            fulls = tokenizer([p + task.answer(ex) for p, ex in zip(prompts, chunk)], verbose=False)["input_ids"]
            sequences += [split_continuation(c, f, seq_len) for c, f in zip(contexts, fulls)]
    order = _order(len(sequences), shuffle, seed)
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, attention_mask = _right_padded([sequences[i][0] for i in rows], seq_len, pad)
        labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            ids, n_answer = sequences[i]
            labels[r, len(ids) - n_answer : len(ids)] = torch.tensor(ids[len(ids) - n_answer :])
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def response_ids(tokenizer, prompts: list[str], responses: list[str], seq_len: int) -> list[tuple[list[int], int]]:
    """(prompt + response + EOS ids, number of response tokens incl. EOS) per instruction example,
    at most `seq_len` tokens.

    What is cut when it is too long: the prompt loses tokens from its left, down to half of
    `seq_len` (its end, next to the response, says what to answer); then the response loses
    tokens from its right. So a response is never dropped whole, and its first tokens, the ones
    a model must learn to start with, stay. EOS ends the response so that the model learns to stop.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))  # the template writes its own BOS
    prompt_ids = tokenizer(prompts, add_special_tokens=not chat, verbose=False)["input_ids"]
    answer_ids = tokenizer(responses, add_special_tokens=False, verbose=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for prompt, answer in zip(prompt_ids, answer_ids):
        answer = answer + eos
        keep_prompt = max(1, min(len(prompt), max(seq_len - len(answer), seq_len // 2)))
        prompt = prompt[len(prompt) - keep_prompt:]
        answer = answer[: seq_len - len(prompt)]
        out.append((prompt + answer, len(answer)))
    return out


def response_loss(model, tokenizer, task: Task, split: str = "test", batch_size: int = 8, seq_len: int = 256,
                  max_examples: int | None = None) -> dict:
    """Held-out loss of an instruction task: mean cross-entropy per response token (the tokens the
    training loss falls on, truncated as in training) and its perplexity exp(loss)."""
    import math

    from eval.metrics import model_device

    device = model_device(model)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in lm_batches(task, split, tokenizer, batch_size, seq_len, max_examples=max_examples):
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())  # predicted positions (labels shift by one)
            if n:
                total += float(model(**batch).loss) * n
                tokens += n
    if not tokens:
        raise UserInputError(f"task {task.name!r}: the {split} split has no response tokens to score")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def task_scores(model, tokenizer, task: Task, split: str = "test", batch_size: int = 8,
                max_examples: int | None = None, seq_len: int = 256) -> dict:
    """What a task is scored by: {"accuracy"} for classification and multiple choice
    (`task_accuracy`), {"loss", "perplexity", "tokens"} of the responses for instruction tasks."""
    if task.kind == "instruction":
        return response_loss(model, tokenizer, task, split, batch_size=batch_size, seq_len=seq_len,
                             max_examples=max_examples)
    return {"accuracy": task_accuracy(model, tokenizer, task, split, batch_size=batch_size,
                                      max_examples=max_examples)}


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
        examples = examples[: require_positive("max_examples", max_examples)]
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
