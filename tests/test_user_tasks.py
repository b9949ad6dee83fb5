"""eval.user_tasks: the user's data as a task (files, folders, save_to_disk, hf:), in the three kinds;
the docs/DATA.md recipes on tiny files in the official formats; bad input; `tune`, `bench` and
`prune --recover-task` on the user's data; the exported built-in task tunes to the same bits."""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch

import eval.tasks as tasks
from eval.data import ClassificationExample, InstructionExample
from eval.errors import UserInputError
from eval.tasks import Task, TaskSpec, load_task
from eval.user_tasks import export_task
from scripts.cli import main

POSITIVE = ["a lovely film", "great fun", "it is \"superb\"", "wonderful acting", "nice and warm", "a joy",
            "brilliant", "so good", "heartfelt", "charming"]
NEGATIVE = ["awful", "a bore", "terrible plot", "dull and long", "bad acting", "a mess", "ugly", "weak",
            "tedious", "pointless"]


def _load(source, **fields) -> Task:
    return load_task(TaskSpec(source=str(source), **fields))


# --------------------------------------------------------------------------------------------
# The docs/DATA.md recipes, each on a tiny file in the official format
# --------------------------------------------------------------------------------------------


@pytest.fixture
def sst2_dir(tmp_path):
    """GLUE's SST-2 folder: train.tsv / dev.tsv with `sentence\\tlabel`, an unlabelled test.tsv."""
    folder = tmp_path / "SST-2"
    folder.mkdir()
    rows = [(s, 1) for s in POSITIVE] + [(s, 0) for s in NEGATIVE]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows[2:-2]))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in rows[:2] + rows[-2:]))
    (folder / "test.tsv").write_text("index\tsentence\n0\tan unseen film\n1\tanother one\n")
    return folder


def test_recipe_glue_sst2_tsv(sst2_dir):
    with pytest.warns(UserWarning, match="test split has no labels"):
        task = _load(sst2_dir, labels=("negative", "positive"), test_fraction=0.25)
    assert task.kind == "classification" and task.labels == ("negative", "positive")
    assert [ex.label for ex in task.validation] == [1, 1, 0, 0]  # dev.tsv is validation
    assert len(task.test) == 4 and len(task.train) == 12  # test carved from train (unlabelled test.tsv)
    assert not {ex.text for ex in task.test} & {ex.text for ex in task.train}
    texts = {ex.text for ex in task.train + task.test}
    assert 'it is "superb" ' in texts  # unquoted TSV: a bare quote is text
    assert task.answer(task.validation[0]) == " positive"


@pytest.fixture
def mmlu_dir(tmp_path):
    """MMLU's data/ folder: header-less `question,A,B,C,D,answer` CSVs per subject and split."""
    root = tmp_path / "data"
    rows = {"auxiliary_train": [(f"aux question {i}?", "w", "x", "y", "z", "ABCD"[i % 4]) for i in range(8)],
            "dev": [("2 + 2 = ?", "3", "4", "5", "6", "B")],
            "val": [("Capital of France?", "Rome", "Paris", "Bern", "Oslo", "B")],
            "test": [("1 + 1 = ?", "2", "3", "4", "5", "A"), ("Red, green and ...?", "up", "blue", "cat", "x", "B")]}
    for split, items in rows.items():
        (root / split).mkdir(parents=True)
        name = "race.csv" if split == "auxiliary_train" else f"math_{split}.csv"
        with (root / split / name).open("w", newline="") as f:
            csv.writer(f).writerows(items)
    return root


def test_recipe_mmlu_csv(mmlu_dir):
    task = _load(mmlu_dir)
    assert task.kind == "multiple_choice"
    assert len(task.train) == 8 and len(task.validation) == 2 and len(task.test) == 2
    first = task.test[0]
    assert first.question == "1 + 1 = ?" and first.choices == ["2", "3", "4", "5"] and first.answer == 0
    assert task.test[1].answer == 1 and task.answer(task.test[1]) == " blue"
    assert task.candidates(first) == ["2", "3", "4", "5"]


def test_one_mmlu_file_is_split_by_fractions(mmlu_dir):
    task = _load(mmlu_dir / "auxiliary_train" / "race.csv", validation_fraction=0.25, test_fraction=0.25)
    assert (len(task.train), len(task.validation), len(task.test)) == (4, 2, 2)
    assert {t.question for t in task.train}.isdisjoint(t.question for t in task.test)


@pytest.fixture
def alpaca_json(tmp_path):
    records = [{"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w}"} for w in
               ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta")]
    records += [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                {"instruction": "Name a colour.", "input": "", "output": "blue"}]
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def test_recipe_alpaca_json(alpaca_json, tiny_tokenizer):
    task = _load(alpaca_json, validation_fraction=0.2, test_fraction=0.2)
    assert task.kind == "instruction" and task.labels == ()
    assert (len(task.train), len(task.validation), len(task.test)) == (6, 2, 2)
    with_input = next(ex for ex in task.train + task.validation + task.test if ex.input)
    assert task.prompt(with_input) == ("### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n"
                                       "### Response:\n")
    assert task.answer(with_input) == "5"
    batch = tasks.lm_batches(task, "train", tiny_tokenizer, batch_size=2, seq_len=64)[0]
    for row in range(2):  # the loss falls on the response and the EOS after it, nothing else
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        example = task.train[row]
        response = tiny_tokenizer(example.output, add_special_tokens=False)["input_ids"]
        assert labelled == response + [tiny_tokenizer.eos_token_id]


def test_instruction_truncation_keeps_the_response_start(tiny_tokenizer):
    long_prompt = InstructionExample(instruction="word " * 200, input="", output="the answer is here " * 30)
    task = Task(name="t", kind="instruction", labels=(), train=[long_prompt], test=[long_prompt])
    (ids, n_response), = tasks.response_ids(tiny_tokenizer, [task.prompt(long_prompt)], [long_prompt.output], 64)
    assert len(ids) == 64 and n_response == 32  # the prompt keeps half, the response the rest
    response = tiny_tokenizer(long_prompt.output, add_special_tokens=False)["input_ids"]
    assert ids[-n_response:] == response[:n_response]  # its first tokens, not its last
    prompt_ids = tiny_tokenizer(task.prompt(long_prompt))["input_ids"]
    assert ids[:32] == prompt_ids[-32:]  # the prompt's end, next to the response


def test_messages_use_the_chat_template_when_the_tokenizer_has_one(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}"},
                          {"role": "assistant", "content": w}]} for w in ("yes", "no", "maybe", "ok", "fine")]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = _load(path, validation_fraction=0.2, test_fraction=0.2)
    example = task.train[0]
    assert task.kind == "instruction" and example.output in {"yes", "no", "maybe", "ok", "fine"}
    assert task.prompt(example) == (f"### System:\nBe brief.\n\n### Instruction:\nSay {example.output}\n\n"
                                    "### Response:\n")  # the plain template: no chat template
    tokenizer = tiny_tokenizer.__class__.from_pretrained(_saved(tiny_tokenizer, tmp_path / "tok"))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert task.prompt(example, tokenizer) == f"<system>Be brief.\n<user>Say {example.output}\n<assistant>"


def _saved(tokenizer, path):
    tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------
# Other formats, column flags, labels, splits
# --------------------------------------------------------------------------------------------


def _reviews(n_per_class: int = 10) -> list[dict]:
    rows = [{"review": s, "verdict": "good"} for s in POSITIVE[:n_per_class]]
    rows += [{"review": s, "verdict": "bad"} for s in NEGATIVE[:n_per_class]]
    return rows


def test_unusual_columns_named_by_flags_and_string_labels(tmp_path):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "review", "verdict"])
        writer.writeheader()
        writer.writerows({"id": i, **r} for i, r in enumerate(_reviews()))
    task = _load(path, columns={"text": "review", "label": "verdict"})
    assert task.kind == "classification" and task.labels == ("bad", "good")  # string labels, sorted
    assert (len(task.train), len(task.validation), len(task.test)) == (16, 2, 2)
    ordered = _load(path, columns={"text": "review", "label": "verdict"}, labels=("good", "bad"))
    assert ordered.labels == ("good", "bad") and ordered.train[0].label == 1 - task.train[0].label


def test_carving_is_seeded_by_the_data_seed_only(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"text": r["review"], "label": r["verdict"]}) + "\n" for r in _reviews()))
    a, b = _load(path), _load(path)
    assert a.test == b.test and a.train == b.train
    assert _load(path, seed=1).test != a.test


def test_parquet_and_save_to_disk_with_class_label(tmp_path):
    import datasets

    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"])})
    rows = {"sentence1": [f"premise {i}" for i in range(20)], "sentence2": [f"hypothesis {i}" for i in range(20)],
            "label": [i % 2 for i in range(20)]}
    data = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": data.select(range(16)), "validation": data.select(range(16, 18)),
                          "test": data.select(range(18, 20))}).save_to_disk(tmp_path / "rte")
    task = _load(tmp_path / "rte")
    assert task.labels == ("entailment", "not_entailment")  # from the ClassLabel
    assert task.test[0] == ClassificationExample(text="premise 18\nhypothesis 18", label=0)  # a text pair
    data.to_parquet(tmp_path / "rte.parquet")  # datasets keeps the ClassLabel in the file's metadata
    task = _load(tmp_path / "rte.parquet")
    assert task.labels == ("entailment", "not_entailment") and len(task.train) == 16
    path = _jsonl(tmp_path, [{"sentence1": f"s{i}", "label": i % 2} for i in range(20)])
    with pytest.warns(UserWarning, match="--labels"):  # bare integers: their digits are the answers
        assert _load(path).labels == ("0", "1")


def test_split_names_map_like_mmlus_on_the_hub(tmp_path):
    """cais/mmlu's splits: auxiliary_train is train; dev and validation together are validation."""
    import datasets

    def part(n, start):
        return datasets.Dataset.from_dict({"question": [f"q{start + i}" for i in range(n)],
                                           "choices": [["a", "b", "c", "d"]] * n, "answer": [i % 4 for i in range(n)]})

    datasets.DatasetDict({"auxiliary_train": part(8, 0), "dev": part(2, 10), "validation": part(3, 20),
                          "test": part(4, 30)}).save_to_disk(tmp_path / "mmlu")
    task = _load(tmp_path / "mmlu")
    assert (task.kind, len(task.train), len(task.validation), len(task.test)) == ("multiple_choice", 8, 5, 4)


def test_train_examples_materialises_only_the_sample(tmp_path):
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 3}) + "\n" for i in range(3000)))
    spec = TaskSpec(source=str(path), labels=("a", "b", "c"), train_examples=50)
    task = load_task(spec)
    assert len(task.train) == 50 and len(task.test) == 300 and len(task.validation) == 300
    assert load_task(spec).train == task.train  # seeded


# --------------------------------------------------------------------------------------------
# Bad input: one clear error (or a counted warning), before any work
# --------------------------------------------------------------------------------------------


def _jsonl(tmp_path, rows, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_missing_column_names_the_files_columns(tmp_path):
    path = _jsonl(tmp_path, [{"review": s, "verdict": "good"} for s in POSITIVE])
    with pytest.raises(UserInputError, match=r"--label-column 'stars': no such column .* \['review', 'verdict'\]"):
        _load(path, columns={"text": "review", "label": "stars"})
    with pytest.raises(UserInputError, match=r"cannot tell the kind .*\['review', 'verdict'\]"):
        _load(path)


@pytest.mark.parametrize("labels, message", [
    ([1, "good"] * 5, "mixes numbers and names"),  # in a CSV every value is text
    ([0.5, 1.5] * 5, "holds real numbers"),  # JSONL keeps their types
    ([[1], [0]] * 5, "expected integer or string labels"),
])
def test_unknown_or_mixed_label_types(tmp_path, labels, message):
    rows = [{"text": f"t{i}", "label": y} for i, y in enumerate(labels)]
    path = tmp_path / "d.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    source = path if isinstance(labels[1], str) else _jsonl(tmp_path, rows)
    with pytest.raises(UserInputError, match=message):
        _load(source)


def test_integer_labels_in_a_csv_index_the_given_names(sst2_dir):
    task = _load(sst2_dir / "train.tsv", labels=("negative", "positive"))
    assert {task.answer(ex) for ex in task.train} == {" negative", " positive"}
    assert all(task.answer(ex) == " positive" for ex in task.train if ex.text.strip() in POSITIVE)


def test_an_empty_split_is_an_error(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\nc,x\n")
    (tmp_path / "test.csv").write_text("text,label\n")
    with pytest.raises(UserInputError, match="test split is empty"):
        _load(tmp_path)


def test_unparseable_rows_are_skipped_and_counted_and_none_left_is_an_error(tmp_path):
    rows = [{"question": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(10)]
    rows += [{"question": "bad", "choices": ["a", "b"], "answer": 7}, {"question": "", "choices": ["a"], "answer": 0}]
    with pytest.warns(UserWarning, match=r"skipped (1|2) of"):
        task = _load(_jsonl(tmp_path, rows), validation_fraction=0.0, test_fraction=0.2)
    assert len(task.train) + len(task.test) == 10
    bad = [{"question": "q", "choices": ["a", "b"], "answer": 9}] * 4
    with pytest.raises(UserInputError, match="no usable rows: all .* could not be parsed .*answer 9"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _load(_jsonl(tmp_path, bad, "bad.jsonl"), validation_fraction=0.0, test_fraction=0.25)


def test_test_texts_shared_with_train_are_counted_in_a_warning(tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": s, "label": "p"}) + "\n" for s in POSITIVE))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": s, "label": "p"}) + "\n"
                                                 for s in POSITIVE[:3] + ["new"]))
    with pytest.warns(UserWarning, match="3 of 4 test examples have a text that train also holds"):
        _load(tmp_path)


@pytest.mark.parametrize("name", ["data.csv", "data.json", "data.parquet", "data.jsonl", "data.bin"])
def test_a_file_that_is_not_data_is_one_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(UserInputError, match="(could not be read|not text data|unknown data format|cannot tell)"):
        _load(path)


def test_a_hub_dataset_not_in_the_cache_says_how_to_put_it_there(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserInputError, match=r"hf:nyu-mll/glue/sst2 is not in the local datasets cache.*save_to_disk"):
        _load("hf:nyu-mll/glue", config="sst2")


def test_a_missing_path_is_an_error():
    with pytest.raises(UserInputError, match="neither a built-in task nor an existing path"):
        _load("no/such/file.csv")


def test_bad_data_leaves_nothing_under_out(tmp_path, tiny_llama_dir, capsys):
    path = _jsonl(tmp_path, [{"review": s} for s in POSITIVE])
    for command in (["tune", "--model", str(tiny_llama_dir)], ["bench", "--model", str(tiny_llama_dir)]):
        out = tmp_path / f"out-{command[0]}"
        assert main([*command, "--task", str(path), "--seq", "48", "--out", str(out)]) == 2
        assert "cannot tell the kind of task" in capsys.readouterr().err
        assert not out.exists()


# --------------------------------------------------------------------------------------------
# tune, bench and prune on the user's data
# --------------------------------------------------------------------------------------------

TUNE = ["--steps", "4", "--batch", "4", "--seq", "48", "--r", "4", "--lr", "1e-2"]


def test_tune_on_each_kind(tmp_path, tiny_llama_dir, sst2_dir, mmlu_dir, alpaca_json):
    cases = {"sst2": [str(sst2_dir), "--labels", "negative,positive", "--test-fraction", "0.25"],
             "mmlu": [str(mmlu_dir)],
             "alpaca": [str(alpaca_json), "--validation-fraction", "0.2", "--test-fraction", "0.2"]}
    for name, task_args in cases.items():
        out = tmp_path / name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(["tune", "--model", str(tiny_llama_dir), "--task", *task_args, "--out", str(out), *TUNE]) == 0
        report = json.loads((out / "tune_report.json").read_text())
        assert report["task_spec"]["source"] == task_args[0]
        if name == "alpaca":
            assert report["task_kind"] == "instruction" and report["accuracy_after"] is None
            assert report["perplexity_after"] == pytest.approx(torch.tensor(report["heldout_loss_after"]).exp().item())
            assert "held-out perplexity" in (out / "tune_report.md").read_text()
        else:
            assert 0 <= report["accuracy_after"] <= 1 and report["perplexity_after"] is None


def test_bench_on_user_csv_and_instruction_data(tmp_path, tiny_llama_dir, alpaca_json):
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["review", "verdict"])
        writer.writeheader()
        writer.writerows(_reviews())
    common = ["--model", str(tiny_llama_dir), "--methods", "qst,qlora", "--batch", "2", "--seq", "48", "--steps", "1",
              "--warmup", "1", "--train-steps", "2", "--no-fit-check"]
    assert main(["bench", *common, "--task", str(path), "--text-column", "review", "--label-column", "verdict",
                 "--out", str(tmp_path / "cls")]) == 0
    data = json.loads((tmp_path / "cls" / "bench_tuning.json").read_text())
    assert data["task"] == str(path) and data["task_spec"]["columns"] == {"text": "review", "label": "verdict"}
    assert data["majority_rate"] is not None and data["chance_rate"] == 0.5
    for method in ("qst", "qlora"):
        assert 0 <= data["methods"][method]["accuracy"] <= 1, data["methods"][method]
    assert main(["bench", *common, "--task", str(alpaca_json), "--out", str(tmp_path / "inst")]) == 0
    data = json.loads((tmp_path / "inst" / "bench_tuning.json").read_text())
    for method in ("qst", "qlora"):
        entry = data["methods"][method]
        assert entry["accuracy"] is None and entry["perplexity"] > 1, entry
    assert "held-out ppl" in (tmp_path / "inst" / "bench_tuning.md").read_text()


def test_prune_recovers_on_a_task(tmp_path, tiny_llama_dir, tiny_texts, sst2_dir):
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, text in enumerate(tiny_texts):
        (calib / f"doc{i}.txt").write_text(text)
    out = tmp_path / "pruned"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["prune", "--model", str(tiny_llama_dir), "--method", "magnitude", "--kept", "0.7",
                     "--calib", str(calib), "--block-size", "32", "--calib-blocks", "6", "--eval-blocks", "3",
                     "--batch-size", "2", "--recover-steps", "2", "--recover-task", str(sst2_dir),
                     "--labels", "negative,positive", "--out", str(out)]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["recover_task"] == "SST-2"
    scores = report["recover_task_scores"]
    assert 0 <= scores["before_recovery"]["accuracy"] <= 1 and 0 <= scores["after_recovery"]["accuracy"] <= 1
    assert main(["prune", "--model", str(tiny_llama_dir), "--calib", str(calib), "--recover-task", str(sst2_dir),
                 "--out", str(tmp_path / "no")]) == 2  # a task without recovery steps
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------------------------
# Equivalence: a built-in task exported to JSONL tunes to the same bits
# --------------------------------------------------------------------------------------------


@pytest.fixture
def builtin_tiny(monkeypatch, tiny_texts):
    """A built-in-like classification task (with a prompt template) served as the built-in 'tiny'."""
    lines = [(i % 2, line) for i, text in enumerate(tiny_texts[:2]) for line in text.splitlines() if len(line) > 20]
    examples = [ClassificationExample(text=line[:60], label=label) for label, line in lines]
    task = Task(name="tiny", kind="classification", labels=("textwrap", "string"),
                train=examples[:12] + examples[-12:], test=examples[20:28] + examples[-28:-20],
                template="{text}\n# file:")
    monkeypatch.setattr(tasks, "BUILTIN_TASKS", (*tasks.BUILTIN_TASKS, "tiny"))
    monkeypatch.setattr(tasks, "_load_builtin_task", lambda name: task)
    return task


def test_an_exported_builtin_task_tunes_to_the_same_bits(builtin_tiny, tmp_path, tiny_llama_dir, capsys):
    exported = tmp_path / "tiny-jsonl"
    assert main(["export-task", "--task", "tiny", "--out", str(exported)]) == 0
    data = json.loads((exported / "export_task.json").read_text())
    assert data["load_flags"] == ["--task-kind", "classification", "--labels", "textwrap,string",
                                  "--validation-fraction", "0"]
    assert (exported / "export_task.png").stat().st_size > 0
    reports = []
    for task_args in (["tiny"], [str(exported), *data["load_flags"]]):
        out = tmp_path / f"run{len(reports)}"
        argv = ["tune", "--model", str(tiny_llama_dir), "--task", *task_args, "--out", str(out), *TUNE,
                "--train-examples", "16", "--seed", "3"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert main(argv) == 0
        reports.append(json.loads((out / "tune_report.json").read_text()))
    builtin, user = reports
    assert user["accuracy_after"] == builtin["accuracy_after"] and user["accuracy_before"] == builtin["accuracy_before"]
    assert user["losses"] == builtin["losses"]  # the same batches in the same order


def test_export_refuses_a_non_empty_folder(builtin_tiny, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty"):
        export_task(builtin_tiny, tmp_path / "x")


def test_tune_scores_lm_eval_tasks_after_instruction_tuning(tmp_path, tiny_llama_dir, alpaca_json):
    """--eval-tasks: an lm-eval task on local data (here a tiny multiple-choice JSONL and its YAML),
    as the QST paper scores MMLU after instruction tuning."""
    yamls = tmp_path / "yamls"
    yamls.mkdir()
    rows = [{"query": "2 + 2 =", "choices": ["4", "5"], "answer": 0}, {"query": "Sky is", "choices": ["blue", "up"],
                                                                        "answer": 0}]
    (yamls / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (yamls / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(yamls / 'tiny_mc.jsonl'))}\noutput_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: query\ndoc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["tune", "--model", str(tiny_llama_dir), "--task", str(alpaca_json), "--out", str(out), *TUNE,
                     "--eval-tasks", "tiny_mc", "--eval-include-path", str(yamls)]) == 0
    report = json.loads((out / "tune_report.json").read_text())
    assert 0 <= report["eval_tasks"]["tiny_mc"]["acc,none"] <= 1
    assert "lm-eval tiny_mc after tuning" in (out / "tune_report.md").read_text()
