"""Shared fixtures: tiny models and a tiny tokenizer built in the test session (no downloads).

Tiny random models test mechanics only; claims about quality come from the reference models.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sysconfig
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # pytest-xdist runs one worker per core

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # No test may read or write the user's real reference-model cache.
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path_factory.getbasetemp() / "slimtune-cache"))


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """A few real stdlib source files: enough text to train a small tokenizer and models."""
    names = ["textwrap.py", "string.py", "bisect.py", "heapq.py", "keyword.py", "glob.py", "fnmatch.py"]
    return [(STDLIB / n).read_text(encoding="utf-8") for n in names]


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_texts):
    from eval.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(tiny_texts, vocab_size=384, model_max_length=128)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _tiny_decoder_dir(tmp_path_factory, tokenizer, name: str, config_class, model_class, **sizes) -> Path:
    """A 2-layer, 64-wide, 4-head causal LM of `model_class` (seed 0), saved with `tokenizer`."""
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **sizes,
    )
    return _save(model_class(config), tokenizer, tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads), saved with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _tiny_decoder_dir(tmp_path_factory, tiny_tokenizer, "tiny-llama", LlamaConfig, LlamaForCausalLM,
                             intermediate_size=128, num_key_value_heads=2)


@pytest.fixture(scope="session")
def pruned_dir(tiny_llama_dir, tiny_tokenizer, tmp_path_factory) -> Path:
    """tiny_llama_dir with half of its structure removed by magnitude pruning, saved by `pruning`."""
    from transformers import AutoModelForCausalLM

    import pruning

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    out = tmp_path_factory.mktemp("pruned")
    pruning.baseline_prune("magnitude", model, 0.5).save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer OPT (LayerNorm, fc1/fc2), saved with a tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    return _tiny_decoder_dir(tmp_path_factory, tiny_tokenizer, "tiny-opt", OPTConfig, OPTForCausalLM,
                             ffn_dim=128, word_embed_proj_dim=64)


# --------------------------------------------------------------------------------------------
# Tiny lm-eval tasks

CHOICE_TASK_YAML = """task: {name}
dataset_path: {dataset_path}
{data_files}test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _write_choice_task(folder: Path, name: str, rows: list[tuple[str, list[str], int]] | None,
                       dataset_path: str = "json") -> Path:
    """lm-eval multiple-choice task `name` as `folder/name.yaml`, over `rows` (question, choices,
    answer index) written to `folder/name.jsonl`; `rows=None`: a task whose data is the hub
    dataset `dataset_path`, which no test machine has cached."""
    data_files = ""
    if rows is not None:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in rows))
        data_files = f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
    (folder / f"{name}.yaml").write_text(CHOICE_TASK_YAML.format(name=name, dataset_path=dataset_path,
                                                                 data_files=data_files))
    return folder


@pytest.fixture(scope="session")
def write_choice_task():
    """`write_choice_task(folder, name, rows)`: a local multiple-choice lm-eval task (see `_write_choice_task`)."""
    return _write_choice_task


def _sum_questions(n: int) -> list[tuple[str, list[str], int]]:
    """`n` (at most 8) questions "a + b =" whose first choice is right."""
    pairs = [(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (0, 3), (4, 4), (6, 2)][:n]
    return [(f"{a} + {b} =", [str(a + b), str(a + b + 1), str(a * b + 7)], 0) for a, b in pairs]


@pytest.fixture(scope="session")
def sum_questions():
    """`sum_questions(n)`: rows for `write_choice_task` (see `_sum_questions`)."""
    return _sum_questions
