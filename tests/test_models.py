"""eval.models: loading (full precision and NF4), named architectures, random-weight builds, errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from eval.errors import UserInputError
from eval.models import (
    ARCHITECTURES,
    architecture_config,
    build_model_from_arch,
    load_causal_lm,
    load_image_classifier,
    param_breakdown_of_arch,
    param_count_of_arch,
)


def _linear4bit_names(model) -> set[str]:
    import bitsandbytes as bnb

    return {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def sample_ids(tiny_tokenizer):
    return torch.tensor([tiny_tokenizer("def wrap(text, width=70):\n    return text.split()\n")["input_ids"]])


# ---------------------------------------------------------------------------- load_causal_lm

@pytest.mark.parametrize("fixture, n_quantized", [("tiny_llama_dir", 14), ("tiny_opt_dir", 12)])
def test_load_causal_lm_full_precision_and_nf4(request, fixture, n_quantized, sample_ids):
    path = request.getfixturevalue(fixture)
    model, tokenizer = load_causal_lm(path)
    assert not model.training and model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.pad_token is not None
    reference = _logits(model, sample_ids)
    assert reference.shape == (1, sample_ids.shape[1], model.config.vocab_size)

    q_model, _ = load_causal_lm(str(path), quantize="nf4")
    assert not q_model.training
    quantized = _linear4bit_names(q_model)
    assert len(quantized) == n_quantized  # every projection / fc layer of both blocks
    assert "lm_head" not in quantized and type(q_model.get_output_embeddings()) is nn.Linear
    layer = q_model.get_submodule(sorted(quantized)[0])
    state = layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # NF4 with double quantization
    from eval.bnb import compute_dtype

    assert layer.compute_dtype == compute_dtype("cpu")  # bf16 only where the CPU has bf16 hardware
    assert q_model.get_input_embeddings().weight.dtype == compute_dtype("cpu")  # QLoRA: the rest in it too

    # The 4-bit weights dequantize to the originals within NF4's resolution, and the logits follow.
    import bitsandbytes as bnb

    original = model.get_submodule(sorted(quantized)[0]).weight
    restored = bnb.functional.dequantize_4bit(layer.weight.data, state).float()
    assert (restored - original).norm() / original.norm() < 0.15
    approx = _logits(q_model, sample_ids)
    assert (approx - reference).norm() / reference.norm() < 0.25
    assert torch.nn.functional.cosine_similarity(approx.flatten(), reference.flatten(), dim=0) > 0.97


def test_nf4_runs_on_cpu_with_widths_bitsandbytes_cannot_repack(tmp_path, tiny_tokenizer, sample_ids):
    # bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first
    # inference pass and fails for widths like these (96 % 64, 200 % 32); load_causal_lm avoids it.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=96, intermediate_size=200, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = load_causal_lm(tmp_path, quantize="nf4")
    for _ in range(2):  # the repacking would happen on the first pass and be reused after
        assert torch.isfinite(_logits(model, sample_ids)).all()


def test_load_causal_lm_dtype_and_pad_token(tmp_path, tiny_llama_dir, tiny_tokenizer):
    model, _ = load_causal_lm(tiny_llama_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    model, _ = load_causal_lm(tiny_llama_dir, dtype=torch.float16)
    assert model.dtype == torch.float16

    # A tokenizer saved without a pad token (as Llama's and GPT-2's are) gets its EOS as pad.
    copy_dir = tmp_path / "no-pad"
    shutil.copytree(tiny_llama_dir, copy_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(copy_dir)
    tok.pad_token = None
    tok.save_pretrained(copy_dir)
    assert AutoTokenizer.from_pretrained(copy_dir).pad_token is None
    _, loaded = load_causal_lm(copy_dir)
    assert loaded.pad_token == tiny_tokenizer.eos_token and loaded.pad_token_id == tiny_tokenizer.eos_token_id


def test_ref_lm_resolves_through_the_reference_cache(monkeypatch, tiny_llama_dir):
    import eval.reference

    asked = []
    monkeypatch.setattr(eval.reference, "reference_path", lambda kind, **kw: asked.append(kind) or tiny_llama_dir)
    model, _ = load_causal_lm("ref-lm")
    assert asked == ["lm"] and model.config.num_key_value_heads == 2


def test_hub_id_loads_from_the_local_hub_cache(tmp_path, monkeypatch, tiny_llama_dir):
    # The hub cache layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--slimtune-test--tiny-llama"
    shutil.copytree(tiny_llama_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    model, tokenizer = load_causal_lm("slimtune-test/tiny-llama")
    assert model.config.num_key_value_heads == 2 and len(tokenizer) == model.config.vocab_size


def test_load_causal_lm_errors(tmp_path, monkeypatch, tiny_llama_dir):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserInputError, match=r"not found\. Tried: local path .*no-such-model \(does not exist\)"):
        load_causal_lm(missing)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(UserInputError) as info:
        load_causal_lm("meta-llama/Llama-2-7b-hf")
    message = str(info.value)
    assert "hub cache" in message and "empty-hub-cache" in message and "HF_HUB_OFFLINE" in message
    assert "huggingface-cli download meta-llama/Llama-2-7b-hf" in message

    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "weights.bin").write_bytes(b"")
    with pytest.raises(UserInputError, match="holds no config.json"):
        load_causal_lm(tmp_path / "not-a-model")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", config_only)
    with pytest.raises(UserInputError, match="could not load a tokenizer.*expected tokenizer files"):
        load_causal_lm(config_only)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, config_only)
    with pytest.raises(UserInputError, match="could not load the weights.*no file named model.safetensors"):
        load_causal_lm(config_only)
    with pytest.raises(UserInputError, match=r"quantize='int8' is not supported; expected None .* or 'nf4'"):
        load_causal_lm(tiny_llama_dir, quantize="int8")
    with pytest.raises(UserInputError, match="dtype='fp8' is not supported"):
        load_causal_lm(tiny_llama_dir, dtype="fp8")
    if not torch.cuda.is_available():
        with pytest.raises(UserInputError, match="CUDA is not available"):
            load_causal_lm(tiny_llama_dir, device="cuda")


# ---------------------------------------------------------------------------- image classifiers

def _save_image_classifier(path, model_type):
    import transformers

    torch.manual_seed(0)
    if model_type == "swin":
        config = transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                         window_size=4, num_labels=3)
    else:
        config = transformers.AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
    model_class = {"vit": transformers.ViTForImageClassification, "deit": transformers.DeiTForImageClassification,
                   "swin": transformers.SwinForImageClassification}[model_type]
    model_class(config).save_pretrained(path)
    processor = transformers.DeiTImageProcessor if model_type == "deit" else transformers.ViTImageProcessor
    processor(size={"height": 32, "width": 32}, do_center_crop=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    return _save_image_classifier(tmp_path_factory.mktemp("tiny-vit"), "vit")


@pytest.mark.parametrize("model_type", ["vit", "deit", "swin"])
def test_load_image_classifier(tmp_path, model_type):
    from PIL import Image

    model, processor = load_image_classifier(_save_image_classifier(tmp_path, model_type))
    assert not model.training and model.dtype == torch.float32 and model.config.model_type == model_type
    pixels = processor(images=Image.new("RGB", (40, 30), (10, 120, 200)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (1, 3)


def test_model_kind_mismatch_errors(tiny_vit_dir, tiny_llama_dir):
    with pytest.raises(UserInputError, match="'vit' model.*not.*causal language model"):
        load_causal_lm(tiny_vit_dir)
    with pytest.raises(UserInputError, match="'llama' model.*image classifier"):
        load_image_classifier(tiny_llama_dir)


def test_ref_vit_resolves_through_the_reference_cache(monkeypatch, tiny_vit_dir):
    import eval.reference

    asked = []
    monkeypatch.setattr(eval.reference, "reference_path", lambda kind, **kw: asked.append(kind) or tiny_vit_dir)
    model, _ = load_image_classifier("ref-vit")
    assert asked == ["vit"] and model.config.num_labels == 3


# ---------------------------------------------------------------------------- named architectures

PUBLISHED_PARAMETERS = {  # as reported for the released checkpoints
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "opt-1.3b": 1_315_758_080,
    "opt-6.7b": 6_658_473_984,
}


def test_llama_2_7b_config_and_parameter_count_without_materialising():
    config = architecture_config("llama-2-7b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 11008, 32)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 32)
    assert (config.vocab_size, config.max_position_embeddings) == (32000, 4096)
    seventy = architecture_config("llama-2-70b")
    assert (seventy.hidden_size, seventy.num_attention_heads, seventy.num_key_value_heads) == (8192, 64, 8)

    model = build_model_from_arch("llama-2-7b", device="meta")  # shapes only
    assert all(p.device.type == "meta" for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS["llama-2-7b"]
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (11008, 4096)


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMETERS))
def test_analytic_parameter_counts_match_the_published_sizes(arch):
    assert param_count_of_arch(arch) == PUBLISHED_PARAMETERS[arch]
    breakdown = param_breakdown_of_arch(arch)  # counted on an empty model: an independent check
    assert breakdown["total"] == PUBLISHED_PARAMETERS[arch]
    assert breakdown["quantizable"] > 0.9 * breakdown["total"]


@pytest.mark.parametrize("arch", ["tiny-llama", "tiny-llama-gqa", "tiny-opt"])
def test_tiny_architectures_build_and_run(arch):
    torch.manual_seed(0)
    model = build_model_from_arch(arch, vocab_size=300)
    assert not model.training and model.dtype == torch.float32 and model.config.vocab_size == 300
    assert sum(p.numel() for p in model.parameters()) == param_count_of_arch(architecture_config(arch, vocab_size=300))
    ids = torch.randint(0, 300, (2, 10))
    logits = _logits(model, ids)
    assert logits.shape == (2, 10, 300) and torch.isfinite(logits).all()

    q_model = build_model_from_arch(arch, quantize="nf4", vocab_size=300)
    per_block = 7 if "llama" in arch else 6  # q, k, v, o + gate, up, down | q, k, v, out + fc1, fc2
    assert len(_linear4bit_names(q_model)) == per_block * 2
    q_logits = _logits(q_model, ids)
    assert q_logits.shape == (2, 10, 300) and torch.isfinite(q_logits).all() and q_logits.std() > 0


def test_nf4_build_quantizes_the_same_modules_as_loading(tiny_llama_dir, tiny_opt_dir, tiny_tokenizer):
    loaded_llama, _ = load_causal_lm(tiny_llama_dir, quantize="nf4")  # a 2-layer GQA Llama
    built_llama = build_model_from_arch("tiny-llama-gqa", quantize="nf4", vocab_size=len(tiny_tokenizer))
    assert _linear4bit_names(built_llama) == _linear4bit_names(loaded_llama)
    assert built_llama.model.layers[0].self_attn.k_proj.out_features == 32  # 2 kv heads x 16

    loaded_opt, _ = load_causal_lm(tiny_opt_dir, quantize="nf4")
    built_opt = build_model_from_arch("tiny-opt", quantize="nf4", vocab_size=len(tiny_tokenizer))
    assert _linear4bit_names(built_opt) == _linear4bit_names(loaded_opt)
    assert built_opt.lm_head.weight is built_opt.model.decoder.embed_tokens.weight  # OPT ties the head


def test_architecture_errors(monkeypatch):
    with pytest.raises(UserInputError, match="unknown architecture 'llama-3'.*llama-2-7b.*tiny-opt"):
        build_model_from_arch("llama-3")
    with pytest.raises(UserInputError, match="unknown architecture"):
        architecture_config("gpt-5")
    with pytest.raises(UserInputError, match="quantize='nf4' needs real weights"):
        build_model_from_arch("tiny-llama", device="meta", quantize="nf4")
    with pytest.raises(UserInputError, match="quantize='int4' is not supported"):
        build_model_from_arch("tiny-llama", quantize="int4")
    # A model that cannot fit is refused before anything is allocated.
    import eval.models

    monkeypatch.setattr(eval.models, "available_memory_bytes", lambda device: 8 * 2**30)
    with pytest.raises(UserInputError, match=r"llama-2-7b \(6\.74B parameters\) needs about 25\.1 GiB.*only 8\.0 GiB"):
        build_model_from_arch("llama-2-7b")
    assert set(ARCHITECTURES) >= {"llama-2-7b", "llama-2-13b", "llama-2-70b", "opt-1.3b", "opt-6.7b",
                                  "tiny-llama", "tiny-llama-gqa", "tiny-opt"}
