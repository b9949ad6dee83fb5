"""The lm-eval bridge: in-memory models (PreTrainedModel or not) on local task YAMLs."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from eval.errors import UserInputError
from eval.lm_eval_bridge import run_lm_eval

# Single-character choices: every continuation is one space token plus one character token,
# and the right answers' characters never appear among the wrong ones.
QUESTIONS = [
    ("def add(a, b): return a", ["+", "1", "2"], 0),
    ("import os\nos.path.", ["3", "j", "4"], 1),
    ("for i in", ["5", "6", "r"], 2),
    ("class Foo", [":", "7", "8"], 0),
    ("return", ["9", "N", "0"], 1),
    ("x = [1, 2,", ["!", "?", "]"], 2),
]

@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, write_choice_task):
    """A tiny multiple-choice lm-eval task reading a local JSONL file."""
    return write_choice_task(tmp_path_factory.mktemp("lm-eval-tasks"), "slimtune_tiny_mc", QUESTIONS)


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path_factory, monkeypatch):
    # datasets caches the converted JSON; keep it out of the user's home
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf-datasets")


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), AutoTokenizer.from_pretrained(tiny_llama_dir)


class NotAPretrainedModel(nn.Module):
    """A wrapper like QST's or a pruned model's: .config and .logits, no PreTrainedModel API."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def _direct_acc(model, tokenizer, task_dir):
    """lm-eval called by hand, as its documentation shows, for comparison."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4)
    out = simple_evaluate(model=lm, tasks=["slimtune_tiny_mc"], num_fewshot=0, log_samples=False,
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False))
    return out["results"]["slimtune_tiny_mc"]["acc,none"]


def test_bridge_matches_lm_eval_called_directly(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    results = run_lm_eval(model, tokenizer, ["slimtune_tiny_mc"], include_path=task_dir, batch_size=4)
    metrics = results["results"]["slimtune_tiny_mc"]
    assert results["n-samples"]["slimtune_tiny_mc"]["effective"] == len(QUESTIONS)
    assert metrics["acc,none"] == _direct_acc(model, tokenizer, task_dir)
    json.dumps(results)  # JSON-safe for reports

    wrapped = NotAPretrainedModel(model).train()
    wrapped_results = run_lm_eval(wrapped, tokenizer, "slimtune_tiny_mc", include_path=task_dir, batch_size=2)
    assert wrapped_results["results"]["slimtune_tiny_mc"]["acc,none"] == metrics["acc,none"]
    assert wrapped.training  # returned to its mode

    limited = run_lm_eval(model, tokenizer, ["slimtune_tiny_mc"], include_path=task_dir, limit=2)
    assert limited["n-samples"]["slimtune_tiny_mc"]["effective"] == 2


def test_accuracy_follows_the_model(model_and_tokenizer, task_dir):
    """A model whose logits favour the right answers' tokens scores 1.0 on this task."""
    model, tokenizer = model_and_tokenizer

    def tokens(text):  # lm-eval puts a space between question and choice
        return set(tokenizer(" " + text, add_special_tokens=False).input_ids)

    favoured = set().union(*(tokens(c[a]) for _, c, a in QUESTIONS))  # includes the space token

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.register_buffer("bias", torch.zeros(len(tokenizer)))
            self.bias.data[sorted(favoured)] = 10.0

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": self.bias.expand(*input_ids.shape, -1)})()

    results = run_lm_eval(Oracle(), tokenizer, ["slimtune_tiny_mc"], include_path=task_dir)
    assert results["results"]["slimtune_tiny_mc"]["acc,none"] == 1.0


def test_unknown_task_names_suggest_close_ones(model_and_tokenizer, task_dir):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(UserInputError, match="slimtune_tiny_mc"):
        run_lm_eval(model, tokenizer, ["slimtune_tiny_mcq"], include_path=task_dir, include_defaults=False)
    with pytest.raises(UserInputError, match="does not exist"):
        run_lm_eval(model, tokenizer, ["x"], include_path=task_dir / "missing", include_defaults=False)
    with pytest.raises(UserInputError, match=r"\.config"):
        run_lm_eval(nn.Linear(2, 2), tokenizer, ["slimtune_tiny_mc"], include_path=task_dir)


def test_missing_local_data_names_the_dataset(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    (tmp_path / "gone.yaml").write_text(
        f"""task: slimtune_gone
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "missing.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
"""
    )
    with pytest.raises(UserInputError, match="slimtune_gone: json"):
        run_lm_eval(model, tokenizer, ["slimtune_gone"], include_path=tmp_path)
