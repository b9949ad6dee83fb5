"""`slimtune zero-shot` plumbing on tiny models and a tiny local lm-eval task (the bridge's own
equivalence with lm-eval is tested with the bridge)."""

from __future__ import annotations

import argparse
import json

import pytest

from scripts.cli import main
from scripts.zero_shot import ModelSpec, load_model, parse_model_specs, primary_metric


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, write_choice_task, sum_questions):
    """A folder with `tiny_sum` (6 local multiple-choice questions) and `missing_data` (a hub dataset)."""
    folder = write_choice_task(tmp_path_factory.mktemp("tasks"), "tiny_sum", sum_questions(6))
    return write_choice_task(folder, "missing_data", None, dataset_path="slimtune-absent/no_such_dataset")


def test_compare_evaluates_several_models_into_one_table(tmp_path, task_dir, tiny_llama_dir, tiny_opt_dir):
    out = tmp_path / "zs"
    code = main(["zero-shot", "--compare", f"llama={tiny_llama_dir},opt={tiny_opt_dir}", "--tasks", "tiny_sum",
                 "--include-path", str(task_dir), "--out", str(out)])
    assert code == 0
    data = json.loads((out / "zero_shot.json").read_text())
    assert [m["label"] for m in data["models"]] == ["llama", "opt"]
    for m in data["models"]:
        acc = m["results"]["tiny_sum"]["acc,none"]
        assert 0.0 <= acc <= 1.0 and acc * 6 == pytest.approx(round(acc * 6))  # a fraction of 6 questions
        assert m["n-samples"]["tiny_sum"]["effective"] == 6 and "tiny_sum" in m["versions"]
    table = (out / "zero_shot.md").read_text()
    assert "| llama |" in table and "| opt |" in table and "tiny_sum (acc)" in table
    assert (out / "zero_shot.png").stat().st_size > 0


def test_an_unknown_task_lists_the_close_ones(tmp_path, task_dir, tiny_llama_dir, capsys):
    code = main(["zero-shot", "--model", str(tiny_llama_dir), "--tasks", "tiny_summ", "--include-path", str(task_dir),
                 "--out", str(tmp_path / "zs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task" in err and "tiny_sum" in err
    assert not (tmp_path / "zs" / "zero_shot.json").exists()


def test_a_task_whose_data_is_not_cached_names_the_dataset(tmp_path, task_dir, tiny_llama_dir, capsys):
    code = main(["zero-shot", "--model", str(tiny_llama_dir), "--tasks", "missing_data", "--include-path",
                 str(task_dir), "--out", str(tmp_path / "zs")])
    assert code == 2
    assert "slimtune-absent/no_such_dataset" in capsys.readouterr().err


def _args(**kwargs):
    base = {"model": None, "qst": None, "pruned": None, "lowrank": None, "compare": None}
    return argparse.Namespace(**{**base, **kwargs})


def test_model_specs():
    specs = parse_model_specs(_args(compare="dense=ref-lm, qst:runs/q,pruned:runs/p/model,lr=lowrank:runs/l,/m/x"))
    assert specs == [ModelSpec("dense", "plain", "ref-lm"), ModelSpec("qst:runs/q", "qst", "runs/q"),
                     ModelSpec("pruned:runs/p/model", "pruned", "runs/p/model"), ModelSpec("lr", "lowrank", "runs/l"),
                     ModelSpec("/m/x", "plain", "/m/x")]
    assert parse_model_specs(_args(pruned="runs/p")) == [ModelSpec("pruned", "pruned", "runs/p")]
    assert parse_model_specs(_args()) == [ModelSpec("ref-lm", "plain", "ref-lm")]
    from eval.errors import UserInputError

    with pytest.raises(UserInputError, match="distinct"):
        parse_model_specs(_args(compare="a=ref-lm,a=pruned:x"))
    with pytest.raises(UserInputError, match="names no directory"):
        parse_model_specs(_args(compare="qst:"))


def test_method_outputs_load_through_their_own_packages(monkeypatch, tiny_llama_dir, tmp_path):
    """--pruned / --lowrank / --qst reach pruning.load_pruned, lowrank_vit.load_compressed and
    QSTForCausalLM.from_pretrained; the tokenizer comes from the directory, else from the base model."""
    from transformers import AutoModelForCausalLM

    import lowrank_vit
    import pruning
    import qst

    tiny = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    calls = []

    def fake_loader(name):
        def load(path, *args, **kwargs):
            calls.append((name, str(path), kwargs.get("base"), kwargs.get("device")))
            return tiny
        return load

    monkeypatch.setattr(pruning, "load_pruned", fake_loader("pruned"))
    monkeypatch.setattr(lowrank_vit, "load_compressed", fake_loader("lowrank"))
    monkeypatch.setattr(qst.QSTForCausalLM, "from_pretrained", fake_loader("qst"))

    model, tokenizer = load_model(ModelSpec("p", "pruned", str(tiny_llama_dir)), None, "cpu")
    assert model is tiny and tokenizer.name_or_path == str(tiny_llama_dir)
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    _, tokenizer = load_model(ModelSpec("l", "lowrank", str(bare)), str(tiny_llama_dir), "cpu")
    assert tokenizer.name_or_path == str(tiny_llama_dir)  # fell back to the base model's tokenizer
    _, tokenizer = load_model(ModelSpec("q", "qst", str(bare)), str(tiny_llama_dir), "cpu")
    assert tokenizer.pad_token is not None
    assert calls == [("pruned", str(tiny_llama_dir), None, "cpu"), ("lowrank", str(bare), None, "cpu"),
                     ("qst", str(bare), str(tiny_llama_dir), "cpu")]


def test_primary_metric_prefers_accuracy_and_carries_its_stderr():
    results = {"alias": "t", "acc_norm,none": 0.5, "acc_norm_stderr,none": 0.1, "acc,none": 0.25,
               "acc_stderr,none": 0.05}
    assert primary_metric(results) == ("acc", 0.25, 0.05)
    assert primary_metric({"exact_match,strict": 0.3}) == ("exact_match", 0.3, None)
    assert primary_metric({"alias": "t"}) is None


def test_the_suite_tasks_answer_to_their_own_names_and_are_the_default():
    from scripts.zero_shot import _task_names

    assert _task_names(None) == ["slimtune_stdlib_module", "slimtune_def_kind", "slimtune_signature_match",
                                 "slimtune_next_line", "slimtune_local_name", "slimtune_bracket_close"]
    assert _task_names("def-kind, arc_easy,slimtune_def_kind") == ["slimtune_def_kind", "arc_easy"]
