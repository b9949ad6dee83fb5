"""Shared fixtures: tiny models and a tiny tokenizer built in the test session (no downloads).

Tiny random models test mechanics only; claims about quality come from the reference models.
"""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Llama with grouped-query attention (4 heads, 2 key/value heads), saved with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return _save(LlamaForCausalLM(config), tiny_tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer OPT (LayerNorm, fc1/fc2), saved with a tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=len(tiny_tokenizer), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return _save(OPTForCausalLM(config), tiny_tokenizer, tmp_path_factory.mktemp("tiny-opt"))
