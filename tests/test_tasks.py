"""eval.reference.tasks: deterministic, file-disjoint tasks; eval.tasks: the cache and lm-eval
YAMLs; batches; accuracy.

Generation is tested on a slice of the corpus (four packages) to stay fast; the code path is
the one the full corpus takes.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import eval.reference.tasks as reference_tasks
import eval.tasks as tasks
from eval.data import ClassificationExample, MultipleChoiceExample
from eval.errors import UserInputError
from eval.reference import reference_corpus, split_of

_SLICE = ("asyncio/", "importlib/", "xml/", "multiprocessing/", "idlelib/")


def _slice_documents() -> dict:
    def keep(docs):
        return [d for d in docs if d.name.startswith(_SLICE)]

    return {"train": keep(reference_corpus("train")),
            "test": keep(reference_corpus("validation") + reference_corpus("test"))}


@pytest.fixture(scope="module")
def generated():
    return tasks.build_tasks(_slice_documents())


@pytest.fixture(scope="module")
def _slice_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("slice-task-cache")


@pytest.fixture
def cached_dir(generated, monkeypatch, _slice_cache):
    # task_yaml_dir() writes the slice's tasks into a cache of this module's own: the session's
    # cache may already hold the full tasks, built by another test (bench on def-kind) first.
    monkeypatch.setenv("SLIMTUNE_CACHE", str(_slice_cache))
    monkeypatch.setattr(tasks, "build_tasks", lambda: generated)
    return tasks.task_yaml_dir()


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def test_generation_is_deterministic(generated):
    again = tasks.build_tasks(_slice_documents())
    for name in tasks.TASKS:
        assert again[name].train == generated[name].train
        assert again[name].test == generated[name].test


def test_kinds_and_labels(generated):
    kinds = {name: task.kind for name, task in generated.items()}
    assert "classification" in kinds.values() and "multiple_choice" in kinds.values()
    assert len(generated) >= 3 and set(generated) == set(tasks.TASKS)
    for task in generated.values():
        assert task.train and task.test
        for ex in task.train + task.test:
            if task.kind == "classification":
                assert isinstance(ex, ClassificationExample) and 0 <= ex.label < len(task.labels)
            else:
                assert isinstance(ex, MultipleChoiceExample) and 0 <= ex.answer < len(ex.choices) == 4
                assert len(set(ex.choices)) == 4


def test_train_and_test_share_no_source_file_and_no_text(generated):
    for task in generated.values():
        train_files, test_files = set(task.files["train"]), set(task.files["test"])
        assert train_files and test_files and not train_files & test_files
        assert all(split_of(f) == "train" for f in train_files)
        assert all(split_of(f) in ("validation", "test") for f in test_files)
        key = (lambda ex: ex.text) if task.kind == "classification" else (lambda ex: ex.question)
        assert not {key(ex) for ex in task.train} & {key(ex) for ex in task.test}


def test_docstring_match_right_choice_is_the_documented_function(generated):
    task = generated["docstring-match"]
    source = "\n".join(d.text for d in _slice_documents()["test"])
    for ex in task.test[:20]:
        name = ex.choices[ex.answer].removeprefix("def ").split("(")[0]
        assert f"def {name}(" in source
        assert ex.question.startswith("Docstring:") and ex.question.endswith("Answer:")


_SNIPPET = '''
def plain(a, b=1, *args, **kw):
    """Add."""
    total = a + b
    return total


class Box:
    @property
    def size(self):
        return len(self.items)

    def each(self):
        def inner():
            yield 0  # the nested def yields, not `each`
        return list(inner())

    def walk(self):
        for item in self.items:
            yield from item


async def fetch(url):
    return await get(url)
'''


def test_function_records_kinds_signatures_and_bodies():
    from eval.reference import Document

    records = {r.name: r for r in reference_tasks._functions([Document("pkg/mod.py", _SNIPPET)])}
    assert {name: r.kind for name, r in records.items()} == {
        "plain": "function", "size": "method", "each": "method", "walk": "generator", "fetch": "coroutine"}
    plain = records["plain"]
    assert plain.signature == "def plain(a, b=1, *args, **kw):"
    assert plain.docstring == "Add."
    assert plain.body == "total = a + b\nreturn total"  # no def line, no docstring
    assert records["size"].source.startswith("def size(self):")  # decorators left out
    assert records["walk"].body == "for item in self.items:\n    yield from item"


def test_load_task_reads_the_cache(cached_dir, generated):
    card = json.loads((cached_dir / "tasks_card.json").read_text())
    assert set(card["tasks"]) == set(tasks.TASKS)
    for name in tasks.TASKS:
        task = tasks.load_task(name)
        assert task.kind == generated[name].kind and task.labels == generated[name].labels
        assert task.test == generated[name].test and task.files == generated[name].files
    assert tasks.task_yaml_dir() == cached_dir


def test_a_damaged_task_cache_names_the_file_and_line(cached_dir, tmp_path):
    import shutil

    damaged = tmp_path / "tasks"
    shutil.copytree(cached_dir, damaged)
    lines = (damaged / "def-kind" / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["label"]
    (damaged / "def-kind" / "test.jsonl").write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]))
    with pytest.raises(UserInputError, match=r"def-kind/test.jsonl, line 3 has no 'label'; the task cache is damaged"):
        tasks._load_cached_task("def-kind", str(damaged))
    lines = (damaged / "docstring-match" / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["answer"] = len(row["choices"])
    (damaged / "docstring-match" / "train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]))
    with pytest.raises(UserInputError, match=r"line 1 has answer 4, expected an index in \[0, 4\)"):
        tasks._load_cached_task("docstring-match", str(damaged))


def test_unknown_task_names_close_matches():
    with pytest.raises(UserInputError, match="docstring-match"):
        tasks.load_task("docstring_match")


def test_lm_eval_task_manager_loads_the_yaml(cached_dir, generated):
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=str(cached_dir), include_defaults=False)
    assert {"slimtune_docstring_match", "slimtune_stdlib_module", "slimtune_def_kind"} <= set(manager.all_tasks)
    assert {tasks.lm_eval_task_name(name) for name in tasks.TASKS} <= set(manager.all_tasks)
    task = get_task_dict(["slimtune_docstring_match"], manager)["slimtune_docstring_match"]
    docs = list(task.eval_docs)
    expected = generated["docstring-match"].test
    assert len(docs) == len(expected)
    assert task.doc_to_text(docs[0]) == expected[0].question
    assert task.doc_to_choice(docs[0]) == expected[0].choices
    assert task.doc_to_target(docs[0]) == expected[0].answer


def test_lm_batches_label_only_the_answer(generated, tiny_tokenizer):
    task = generated["stdlib-module"]
    batches = tasks.lm_batches(task, "train", tiny_tokenizer, batch_size=4, seq_len=96)
    assert sum(len(b["input_ids"]) for b in batches) == len(task.train)
    first = batches[0]
    assert first["input_ids"].shape == first["labels"].shape == first["attention_mask"].shape == (4, 96)
    answer = first["labels"][0][first["labels"][0] != -100]
    assert tiny_tokenizer.decode(answer) == " " + task.labels[task.train[0].label]
    # Right padding: the mask is a prefix of ones, and padded positions carry no label.
    mask = first["attention_mask"][0]
    assert torch.equal(mask, torch.sort(mask, descending=True).values)
    assert (first["labels"][0][mask == 0] == -100).all()
    shuffled = tasks.lm_batches(task, "train", tiny_tokenizer, batch_size=4, seq_len=96, shuffle=True, seed=1)
    again = tasks.lm_batches(task, "train", tiny_tokenizer, batch_size=4, seq_len=96, shuffle=True, seed=1)
    assert torch.equal(shuffled[0]["input_ids"], again[0]["input_ids"])
    assert not torch.equal(shuffled[0]["input_ids"], first["input_ids"])


def test_classification_batches(generated, tiny_tokenizer):
    examples = generated["def-kind"].test[:10]
    batches = tasks.classification_batches(examples, tiny_tokenizer, batch_size=4, seq_len=32)
    assert [len(b["labels"]) for b in batches] == [4, 4, 2]
    assert batches[0]["input_ids"].shape == (4, 32)
    assert batches[0]["labels"].tolist() == [ex.label for ex in examples[:4]]
    with pytest.raises(UserInputError):
        tasks.classification_batches(examples, tiny_tokenizer, batch_size=0, seq_len=32)


class AlwaysFirst(nn.Module):
    """A sequence classifier that always predicts class 0."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(num_labels=3)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(input_ids.shape[0], 3)
        logits[:, 0] = 1
        return SimpleNamespace(logits=logits + self.dummy)


def test_task_accuracy_for_both_model_kinds(generated, tiny_tokenizer, tiny_llama):
    from eval.metrics import multiple_choice_accuracy

    task = generated["def-kind"]
    examples = task.test[:12]
    expected = sum(ex.label == 0 for ex in examples) / len(examples)
    assert tasks.task_accuracy(AlwaysFirst(), tiny_tokenizer, task, max_examples=12) == pytest.approx(expected)

    mc = generated["docstring-match"]
    got = tasks.task_accuracy(tiny_llama, tiny_tokenizer, mc, max_examples=6, batch_size=4)
    assert got == multiple_choice_accuracy(tiny_llama, tiny_tokenizer, mc.test[:6], batch_size=4)
    with pytest.raises(UserInputError, match="multiple choice"):
        tasks.task_accuracy(AlwaysFirst(), tiny_tokenizer, mc, max_examples=2)
