"""The backbone feature cache: same training as running the backbone, never a stale entry."""

from __future__ import annotations

import json

import pytest
import torch

from eval.bnb import compute_dtype_name
from eval.data import pack_token_blocks
from eval.models import load_causal_lm
from eval.train import TrainConfig, train
from qst import QSTConfig, QSTForCausalLM
from qst.cache import BackboneFeatureCache, backbone_fingerprint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llama_nf4(tiny_llama_dir):
    return load_causal_lm(tiny_llama_dir, quantize="nf4")[0]


@pytest.fixture(scope="module")
def blocks(tiny_texts, tiny_tokenizer):
    return pack_token_blocks(tiny_texts, tiny_tokenizer, block_size=16, max_blocks=4)


def _train(model, blocks, steps=6):
    batches = [{"input_ids": blocks[i:i + 2], "attention_mask": torch.ones_like(blocks[i:i + 2]),
                "labels": blocks[i:i + 2]} for i in (0, 2)]
    return train(model, batches, TrainConfig(max_steps=steps, lr=1e-2, warmup_ratio=0.0, seed=3)).losses


def test_cached_training_gives_the_same_losses(llama_nf4, blocks, tmp_path):
    torch.manual_seed(0)
    plain = QSTForCausalLM.from_base(llama_nf4, QSTConfig(r=4, dropout=0.1))
    torch.manual_seed(0)
    cached = QSTForCausalLM.from_base(llama_nf4, QSTConfig(r=4, dropout=0.1))
    cache = cached.enable_feature_cache(tmp_path)
    expected = _train(plain, blocks)
    got = _train(cached, blocks)  # 3 epochs of 2 batches: the first fills, the others read
    assert got == expected
    assert (cache.misses, cache.hits) == (2, 4)
    # a rerun (a new process, say) reads everything from disk
    torch.manual_seed(0)
    again = QSTForCausalLM.from_base(llama_nf4, QSTConfig(r=4, dropout=0.1))
    cache2 = again.enable_feature_cache(tmp_path)
    assert _train(again, blocks) == expected
    assert (cache2.misses, cache2.hits) == (0, 6)


@pytest.fixture(scope="module")
def llama_bf16(tiny_llama_dir):
    return load_causal_lm(tiny_llama_dir, dtype="bfloat16")[0]


@pytest.mark.parametrize("backbone", ["nf4", "bf16"])
def test_entries_are_memory_maps_in_the_states_dtype(backbone, llama_nf4, llama_bf16, blocks, tmp_path):
    # An NF4 backbone computes in what eval.bnb chose for this machine's CPU (bf16 only with bf16
    # hardware, float32 otherwise); a bf16 backbone has bf16 states on any CPU, so the raw-bits
    # bf16 path is exercised everywhere.
    base, dtype = (llama_nf4, compute_dtype_name("cpu")) if backbone == "nf4" else (llama_bf16, "bfloat16")
    qst = QSTForCausalLM.from_base(base, QSTConfig(r=4))
    cache = qst.enable_feature_cache(tmp_path)
    qst.train()
    qst(input_ids=blocks[:2])
    (entry,) = [p for p in (tmp_path / cache.backbone_key).glob("seq16/*") if p.is_dir()]
    meta = json.loads((entry / "meta.json").read_text())
    assert meta["dtype"] == dtype and meta["states_shape"] == [3, 2, 16, 64]
    assert (entry / "states.bin").stat().st_size == 3 * 2 * 16 * 64 * getattr(torch, dtype).itemsize
    features = cache.load(blocks[:2], None)
    direct = qst.backbone_features(blocks[:2].clone(), use_cache=True)  # use_cache bypasses the cache
    assert all(a.dtype == getattr(torch, dtype) for a in features.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(features.hidden_states, direct.hidden_states, strict=True))
    assert torch.equal(features.last, direct.last)


def test_cache_is_only_used_while_training(llama_nf4, blocks, tmp_path):
    qst = QSTForCausalLM.from_base(llama_nf4, QSTConfig(r=4))
    cache = qst.enable_feature_cache(tmp_path)
    qst.eval()
    qst(input_ids=blocks[:2])
    assert cache.hits == cache.misses == 0 and not any(tmp_path.iterdir())


def test_keys_change_with_data_length_and_backbone(llama_nf4, tiny_llama_dir, tiny_opt_dir, blocks, tmp_path):
    key = backbone_fingerprint(llama_nf4, "tiny", "nf4")
    assert key == backbone_fingerprint(llama_nf4, "tiny", "nf4")
    assert key != backbone_fingerprint(llama_nf4, "tiny", None)
    assert key != backbone_fingerprint(llama_nf4, "other", "nf4")
    full = load_causal_lm(tiny_llama_dir)[0]
    assert backbone_fingerprint(full, "tiny", "nf4") != key  # same name, other weights (16-bit vs 4-bit)
    opt = load_causal_lm(tiny_opt_dir)[0]
    assert backbone_fingerprint(opt, "tiny", "nf4") != key
    cache = BackboneFeatureCache(tmp_path, key)
    a = cache.entry_dir(blocks[:2], None)
    assert a == cache.entry_dir(blocks[:2].clone(), None)
    assert a != cache.entry_dir(blocks[:2, :8], None)
    assert a != cache.entry_dir(blocks[1:3], None)
    assert a != cache.entry_dir(blocks[:2], torch.ones_like(blocks[:2]))


def test_incomplete_entry_is_never_read(llama_nf4, blocks, tmp_path):
    qst = QSTForCausalLM.from_base(llama_nf4, QSTConfig(r=4))
    cache = qst.enable_feature_cache(tmp_path)
    entry = cache.entry_dir(blocks[:2], None)
    entry.mkdir(parents=True)
    (entry / "states.bin").write_bytes(b"\0" * 10)  # as a crash mid-write would leave it (no meta.json)
    assert cache.load(blocks[:2], None) is None
    qst.train()
    qst(input_ids=blocks[:2])  # recomputes and replaces the entry
    assert cache.load(blocks[:2], None) is not None
