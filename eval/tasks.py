"""The suite's downstream tasks as the harness sees them: `Task`, loading, batches, accuracy.

The tasks themselves (`stdlib-module`, `docstring-match`, `def-kind`) are generated from the
reference corpus by `eval.reference.tasks`. The generated examples are cached as JSONL under
`$SLIMTUNE_CACHE/tasks-<hash>/`, together with one lm-eval task YAML per task
(`slimtune_stdlib_module`, `slimtune_docstring_match`, `slimtune_def_kind`), so that directory is
an lm-eval `include_path` (`task_yaml_dir()`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from eval.data import ClassificationExample, MultipleChoiceExample
from eval.errors import UserInputError, require_positive
from eval.io import atomic_directory, read_json, write_json
from eval.reference.common import build_lock, cache_root, remove_stale_temporaries
from eval.reference.tasks import TASKS, TASKS_VERSION, generate_tasks, tasks_hash

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
    final = cache_root() / f"tasks-{tasks_hash()}"
    if (final / _CARD).is_file():
        return final
    with build_lock(final):
        if (final / _CARD).is_file():
            return final
        remove_stale_temporaries(final)
        with atomic_directory(final) as tmp:
            tasks = build_tasks()
            for task in tasks.values():
                _write_task(task, tmp / task.name, final / task.name)
            write_json(tmp / _CARD, {  # last: the completion mark
                "version": TASKS_VERSION,
                "tasks": {t.name: {"kind": t.kind, "labels": list(t.labels), "train": len(t.train),
                                   "test": len(t.test), "description": t.description,
                                   "template": t.template, "files": t.files} for t in tasks.values()},
            })
    return final


def build_tasks(documents: dict | None = None) -> dict[str, Task]:
    """Every task, generated from the reference corpus (`eval.reference.tasks.generate_tasks`:
    `documents` replaces the corpus, as there)."""
    return {name: Task(**fields) for name, fields in generate_tasks(documents).items()}


@cache
def _load_cached_task(name: str, directory: str) -> Task:
    meta = read_json(Path(directory) / _CARD, "task card")["tasks"][name]
    splits = {}
    for split in ("train", "test"):
        path = Path(directory) / name / f"{split}.jsonl"
        rows = [_task_row(path, i, line, meta) for i, line in enumerate(path.read_text().splitlines(), 1)]
        if meta["kind"] == "classification":
            splits[split] = [ClassificationExample(text=r["text"], label=r["label"]) for r in rows]
        else:
            splits[split] = [MultipleChoiceExample(question=r["question"], choices=r["choices"], answer=r["answer"])
                             for r in rows]
    return Task(name=name, kind=meta["kind"], labels=tuple(meta["labels"]), train=splits["train"],
                test=splits["test"], description=meta["description"], template=meta["template"],
                files=meta["files"])


def _task_row(path: Path, line_number: int, line: str, meta: dict) -> dict:
    """One cached example, checked: a missing or out-of-range label is named, not a KeyError later."""
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
        raise UserInputError(f"task file {path}, line {line_number} {problem}; the task cache is damaged: delete "
                             f"{path.parent.parent} and it is generated again")
    return row


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
        input_ids, attention_mask = _right_padded([sequences[i][0] for i in rows], seq_len, pad)
        labels = torch.full((len(rows), seq_len), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            ids, n_answer = sequences[i]
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
