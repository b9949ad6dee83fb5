"""eval.reference.tasks: deterministic, document-disjoint tasks; eval.tasks: the shipped task
files, their checks, the lm-eval YAMLs; batches; accuracy.

Generation is tested on a slice of the corpus (five packages) to stay fast; the code path is
the one the full corpus takes. Leakage, label noise and labels are checked on the shipped files.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import shutil
import tokenize
from collections import Counter
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
    documents = {split: [] for split in tasks.SPLITS}
    for corpus_split in ("train", "validation", "test"):
        for doc in reference_corpus(corpus_split):
            if doc.name.startswith(_SLICE):
                documents[reference_tasks.task_split_of(doc.name, corpus_split)].append(doc)
    return documents


@pytest.fixture(scope="module")
def generated():
    return tasks.build_tasks(_slice_documents())


@pytest.fixture(scope="module")
def slice_files(generated, tmp_path_factory):
    return tasks.write_task_files(generated, tmp_path_factory.mktemp("slice-tasks") / "tasks")


@pytest.fixture(scope="module")
def shipped():
    return {name: tasks.load_task(name) for name in tasks.TASKS}


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _key(task):
    return (lambda ex: ex.text) if task.kind == "classification" else (lambda ex: ex.question)


def test_generation_is_deterministic(generated):
    again = tasks.build_tasks(_slice_documents())
    for name in tasks.TASKS:
        for split in tasks.SPLITS:
            assert getattr(again[name], split) == getattr(generated[name], split)


def test_kinds_and_labels(generated):
    kinds = {name: task.kind for name, task in generated.items()}
    assert "classification" in kinds.values() and "multiple_choice" in kinds.values()
    assert set(generated) == set(tasks.TASKS) and set(reference_tasks.ZERO_SHOT_TASKS) <= set(tasks.TASKS)
    for task in generated.values():
        assert task.train and task.validation and task.test
        for ex in task.train + task.validation + task.test:
            if task.kind == "classification":
                assert isinstance(ex, ClassificationExample) and 0 <= ex.label < len(task.labels)
            else:
                assert isinstance(ex, MultipleChoiceExample) and 0 <= ex.answer < len(ex.choices) == 4
                assert len(set(ex.choices)) == 4


def test_validation_is_carved_from_train_documents(generated):
    for task in generated.values():
        assert all(split_of(f) == "train" for f in task.files["train"] + task.files["validation"])
        assert all(split_of(f) in ("validation", "test") for f in task.files["test"])
        assert all(reference_tasks.task_split_of(f, "train") == "validation" for f in task.files["validation"])


def test_shipped_splits_share_no_source_file_and_no_text(shipped):
    # The real shipped files, whole: no source document and no text (exact or with whitespace
    # collapsed) in two splits, and no text twice within a split.
    for task in shipped.values():
        files = {split: set(task.files[split]) for split in tasks.SPLITS}
        texts = {split: [reference_tasks.normalized(_key(task)(ex)) for ex in task.split(split)]
                 for split in tasks.SPLITS}
        for split in tasks.SPLITS:
            assert files[split] and len(set(texts[split])) == len(texts[split]), (task.name, split)
        for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
            assert not files[a] & files[b], (task.name, a, b)
            assert not set(texts[a]) & set(texts[b]), (task.name, a, b)
        assert all(split_of(f) == "train" for f in files["train"] | files["validation"])
        assert all(split_of(f) in ("validation", "test") for f in files["test"])


def test_shipped_sizes_and_card(shipped):
    card = json.loads((tasks.SHIPPED_TASKS / "tasks_card.json").read_text())
    assert card["generated"]["version"] == tasks.TASKS_VERSION
    for name, task in shipped.items():
        assert {split: len(task.split(split)) for split in tasks.SPLITS} == \
            {split: card["tasks"][name][split] for split in tasks.SPLITS}
        assert len(task.validation) >= 200 and len(task.test) >= 200
        if task.kind == "multiple_choice":  # the right answer in every position equally often
            for split in tasks.SPLITS:
                positions = Counter(ex.answer for ex in task.split(split))
                assert max(positions.values()) - min(positions.values()) <= 1, (name, split)


def test_every_shipped_generator_example_shows_its_yield(shipped):
    task = shipped["def-kind"]
    generator = task.labels.index("generator")
    for split in tasks.SPLITS:
        examples = [ex for ex in task.split(split) if ex.label == generator]
        assert examples and all(re.search(r"\byield\b", ex.text) for ex in examples), split


def test_stdlib_module_labels_exist_in_this_python(shipped):
    labels = shipped["stdlib-module"].labels
    assert "distutils" not in labels  # removed in Python 3.12
    assert all(importlib.util.find_spec(label) is not None for label in labels)


def _copy_of_shipped(tmp_path, monkeypatch):
    copy = tmp_path / "tasks"
    shutil.copytree(tasks.SHIPPED_TASKS, copy)
    monkeypatch.setattr(tasks, "SHIPPED_TASKS", copy)
    return copy


def test_a_corrupted_or_missing_shipped_file_is_one_clear_error(tmp_path, monkeypatch):
    copy = _copy_of_shipped(tmp_path, monkeypatch)
    assert tasks.shipped_tasks_dir() == copy
    path = copy / "def-kind" / "validation.jsonl"
    path.write_text(path.read_text().replace("self", "this", 1))
    tasks._verified.cache_clear()
    with pytest.raises(UserInputError, match=r"def-kind/validation.jsonl is corrupted .*build_tasks.py --ship"):
        tasks.load_task("def-kind")
    path.unlink()
    tasks._verified.cache_clear()
    with pytest.raises(UserInputError, match=r"def-kind/validation.jsonl is missing"):
        tasks.load_task("def-kind")
    tasks._verified.cache_clear()


def test_signature_match_right_choice_is_the_def_line_of_the_body(generated):
    task = generated["signature-match"]
    source = "\n".join(d.text for d in _slice_documents()["test"])
    for ex in task.test[:20]:
        name = ex.choices[ex.answer].removeprefix("def ").split("(")[0]
        assert f"def {name}(" in source
        assert ex.question.endswith("# Answer:")
        parameters = re.findall(r"(\w+)\s*(?:[:=,)])", ex.choices[ex.answer].split("(", 1)[1])
        assert set(parameters) & set(re.findall(r"\w+", ex.question))


def test_next_line_right_choice_is_the_line_that_follows(generated):
    task = generated["next-line"]
    lines = {line.strip() for d in _slice_documents()["test"] for line in d.text.splitlines()}
    for ex in task.test[:30]:
        right = ex.choices[ex.answer]
        assert right in lines and ex.question.endswith("\n" + " " * (len(ex.question) - len(ex.question.rstrip(" "))))
        assert all(abs(len(c) - len(right)) <= max(3, len(right) // 5) for c in ex.choices)


def test_local_name_right_choice_was_defined_before(generated):
    task = generated["local-name"]
    for ex in task.test[:30]:
        words = set(re.findall(r"\w+", ex.question))
        assert ex.choices[ex.answer] in words
        assert not any(c in words for i, c in enumerate(ex.choices) if i != ex.answer)


def test_every_shipped_choice_reads_the_same_to_the_suite_and_to_lm_eval(shipped):
    # lm-eval puts target_delimiter " " before every choice; the suite's scorer puts a space before
    # a choice that does not start with whitespace. They score the same text only if none does.
    from eval.metrics import _as_continuation

    for task in shipped.values():
        if task.kind == "multiple_choice":
            for split in tasks.SPLITS:
                assert all(_as_continuation(c) == " " + c for ex in task.split(split) for c in ex.choices), task.name


def _brackets_in_window(text: str, first_line: int) -> str | None:
    """How the brackets of `text` from line `first_line` on close: "wrong" (a closer of the wrong
    kind), "closed" (every closer matches), or None (one closes a bracket above the window, or the
    window does not tokenize)."""
    stack = []
    try:
        for token in tokenize.generate_tokens(io.StringIO("\n".join(text.splitlines()[first_line:]) + "\n").readline):
            if token.type == tokenize.OP and token.string in "([{":
                stack.append(token.string)
            elif token.type == tokenize.OP and token.string in ")]}":
                if not stack:
                    return None
                if stack.pop() != "([{"[")]}".index(token.string)]:
                    return "wrong"
    except tokenize.TokenError as e:
        return "closed" if "statement" in str(e) else None  # brackets opened above stay open
    except SyntaxError:
        return None
    return "closed"


def _bracket_close_checked(ex) -> None:
    """The right choice closes the brackets of the question's last lines and each distractor
    closes one of them with the wrong kind, read in the same lines."""
    right = ex.choices[ex.answer]
    text = ex.question + " " + right
    for first_line in range(len(text.splitlines()) - 1, -1, -1):  # the smallest window that shows the openers
        outcome = _brackets_in_window(text, first_line)
        assert outcome != "wrong", ex
        if outcome == "closed":
            break
    else:
        raise AssertionError(f"the right choice closes no bracket of the question: {ex}")
    closers = re.search(r"[)\]}]+(?=[:,]?$)", right).group()
    head = right[: right.rindex(closers)]
    trailing = right[len(head) + len(closers):]
    assert len(closers) >= 2 and trailing in ("", ":", ",") and not right[:1].isspace()
    for i, choice in enumerate(ex.choices):
        if i != ex.answer:
            other = choice[len(head) : len(choice) - len(trailing)]
            assert choice.startswith(head) and choice.endswith(trailing) and len(choice) == len(right), ex
            assert set(other) <= set(")]}") and other != closers, ex
            assert _brackets_in_window(ex.question + " " + choice, first_line) == "wrong", (choice, ex)


def test_bracket_close_right_choice_ends_a_real_line(generated):
    task = generated["bracket-close"]
    lines = {line.strip() for d in _slice_documents()["test"] for line in d.text.splitlines()}
    for ex in task.test[:50]:
        right = ex.choices[ex.answer]
        assert (ex.question + " " + right).splitlines()[-1].strip() in lines
        _bracket_close_checked(ex)


def test_every_shipped_bracket_close_distractor_closes_a_bracket_wrongly(shipped):
    task = shipped["bracket-close"]
    for split in tasks.SPLITS:
        for ex in task.split(split):
            _bracket_close_checked(ex)


def test_closing_runs_of_a_def():
    from eval.reference import Document

    source = (
        "def f(names, table):\n"
        "    first = names[0]\n"
        "    result = sorted(set(names))\n"
        "    if table.get(str(first)):\n"
        "        print('(]', len(names))  # a comment after them: not a run\n"
        "        table.update(dict(a=1),\n"
        "                     b=[first])\n"
        "    call(x for x in g())\n"
        "    return [(key,\n"
        "             str(value)) for key, value in table.items()]\n")
    (record,) = reference_tasks._functions([Document("pkg/mod.py", source)])
    runs = {(r.lineno, r.closers, r.trailing, r.cut, r.opened) for r in reference_tasks._closing_runs(record)}
    assert runs == {(3, "))", "", 13, (3, 19)),  # the answer "sorted(set(names))": set( and sorted(
                    (4, "))", ":", 7, (4, 16)),  # "table.get(str(first)):", ":" after the closers
                    (7, "])", "", 21, (6, 20)),  # "b=[first])" also closes update( on line 6
                    (8, "))", "", 20, (8, 8)),   # "g())": the first closer may follow its opener
                    (10, ")]", "", 43, (9, 11))}  # "table.items()]" closes the [ of line 9
    # Not runs: line 5's "))" (a comment follows; "(]" is in a string), line 6's one ")", line
    # 10's "))" (code follows).


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


def test_read_task_reads_written_files(slice_files, generated):
    card = json.loads((slice_files / "tasks_card.json").read_text())
    checksums = json.loads((slice_files / "checksums.json").read_text())
    assert set(card["tasks"]) == set(tasks.TASKS)
    assert {f"{name}/{split}.jsonl" for name in tasks.TASKS for split in tasks.SPLITS} | {"tasks_card.json"} == set(checksums)
    for name in tasks.TASKS:
        task = tasks.read_task(name, str(slice_files))
        assert task.kind == generated[name].kind and task.labels == generated[name].labels
        assert task.validation == generated[name].validation and task.test == generated[name].test
        assert task.files == generated[name].files


def test_a_damaged_task_file_names_the_file_and_line(slice_files, tmp_path):
    damaged = tmp_path / "tasks"
    shutil.copytree(slice_files, damaged)
    lines = (damaged / "def-kind" / "test.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["label"]
    (damaged / "def-kind" / "test.jsonl").write_text("\n".join(lines[:2] + [json.dumps(row)] + lines[3:]))
    with pytest.raises(UserInputError, match=r"def-kind/test.jsonl, line 3 has no 'label'; the task files are damaged"):
        tasks.read_task("def-kind", str(damaged))
    lines = (damaged / "signature-match" / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[0])
    row["answer"] = len(row["choices"])
    (damaged / "signature-match" / "train.jsonl").write_text("\n".join([json.dumps(row)] + lines[1:]))
    with pytest.raises(UserInputError, match=r"line 1 has answer 4, expected an index in \[0, 4\)"):
        tasks.read_task("signature-match", str(damaged))


def test_unknown_task_names_close_matches():
    with pytest.raises(UserInputError, match="signature-match"):
        tasks.load_task("signature_match")


def test_lm_eval_task_manager_loads_the_yaml_with_its_validation_split(slice_files, generated):
    from lm_eval.tasks import TaskManager, get_task_dict

    yaml_dir = tasks.task_yaml_dir(slice_files)
    assert tasks.task_yaml_dir(slice_files) == yaml_dir
    manager = TaskManager(include_path=str(yaml_dir), include_defaults=False)
    assert {tasks.lm_eval_task_name(name) for name in tasks.TASKS} <= set(manager.all_tasks)
    task = get_task_dict(["slimtune_signature_match"], manager)["slimtune_signature_match"]
    assert task.has_validation_docs()
    expected = generated["signature-match"]
    assert len(list(task.validation_docs())) == len(expected.validation)
    docs = list(task.eval_docs)
    assert len(docs) == len(expected.test)
    assert task.doc_to_text(docs[0]) == expected.test[0].question
    assert task.doc_to_choice(docs[0]) == expected.test[0].choices
    assert task.doc_to_target(docs[0]) == expected.test[0].answer


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

    mc = generated["signature-match"]
    got = tasks.task_accuracy(tiny_llama, tiny_tokenizer, mc, max_examples=6, batch_size=4)
    assert got == multiple_choice_accuracy(tiny_llama, tiny_tokenizer, mc.test[:6], batch_size=4)
    with pytest.raises(UserInputError, match="multiple choice"):
        tasks.task_accuracy(AlwaysFirst(), tiny_tokenizer, mc, max_examples=2)
