"""`slimtune tune`: end to end on a tiny backbone and a tiny task; bad input is one clear line."""

from __future__ import annotations

import json

import pytest
import torch

import eval.tasks
from eval.data import ClassificationExample
from qst import QSTForCausalLM, QSTForSequenceClassification
from scripts.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tiny_task(monkeypatch, tiny_texts):
    # A small classification task (which file a line comes from), so the test does not build the
    # reference tasks (tens of seconds).
    lines = [(i % 2, line) for i, text in enumerate(tiny_texts[:2]) for line in text.splitlines() if len(line) > 20]
    examples = [ClassificationExample(text=line[:60], label=label) for label, line in lines]
    task = eval.tasks.Task(name="tiny", kind="classification", labels=("textwrap", "string"),
                           train=examples[:12] + examples[-12:], test=examples[20:24] + examples[-24:-20],
                           template="{text}\nfile:")
    monkeypatch.setattr(eval.tasks, "load_task", lambda name: task)
    return task


def test_tune_writes_side_network_and_report(tiny_task, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["tune", "--model", str(tiny_llama_dir), "--task", "tiny", "--out", str(out), "--steps", "6",
            "--batch", "4", "--seq", "32", "--r", "4", "--lr", "1e-2", "--cache-backbone", "--train-examples", "12",
            "--cache-dir", str(tmp_path / "features")]
    assert main(argv) == 0
    report = json.loads((out / "tune_report.json").read_text())
    assert report["quantize"] == "nf4" and report["steps"] == 6 and len(report["losses"]) == 6
    assert 0 < report["trainable_share"] < 1 and report["trainable_parameters"] > 0
    assert 0 <= report["accuracy_before"] <= 1 and 0 <= report["accuracy_after"] <= 1
    # 12 examples = 3 batches per epoch: the first epoch fills the cache, the second reads it
    assert report["train_batches_per_epoch"] == 3
    assert report["feature_cache"]["misses"] == 3 and report["feature_cache"]["hits"] == 3
    assert {"tune_report.md", "loss.png", "qst_config.json", "side_network.safetensors"} <= {p.name for p in out.iterdir()}
    assert "trainable parameters" in capsys.readouterr().out
    model = QSTForCausalLM.from_pretrained(out, base=str(tiny_llama_dir))
    assert model.quantize == "nf4" and model.side.alpha.item() != 1.0
    card = (out / "README.md").read_text()  # the model card carries what was measured
    assert f"accuracy after: {report['accuracy_after']:.6g}" in card and "tiny (test split" in card


def test_tune_lst_with_classifier_head(tiny_task, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["tune", "--method", "lst", "--head", "classifier", "--model", str(tiny_llama_dir), "--task", "tiny",
            "--out", str(out), "--steps", "2", "--batch", "4", "--seq", "32", "--r", "4", "--skip-before"]
    assert main(argv) == 0
    report = json.loads((out / "tune_report.json").read_text())
    assert report["quantize"] is None and report["accuracy_before"] is None
    model = QSTForSequenceClassification.from_pretrained(out)
    assert model.num_labels == 2 and model.quantize is None
    assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.shape == (1, 2)


@pytest.mark.parametrize("extra, message", [
    (["--r", "5", "--downsample", "maxpool"], "r=5 does not divide the backbone's hidden size 64"),
    (["--side-layers", "0,x"], "--side-layers must be comma-separated integers"),
    (["--steps", "0"], "--steps must be a positive integer"),
])
def test_tune_bad_input_is_one_line(tiny_task, tiny_llama_dir, tmp_path, capsys, extra, message):
    argv = ["tune", "--model", str(tiny_llama_dir), "--task", "tiny", "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimtune tune: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert not (tmp_path / "o" / "tune_report.json").exists()
