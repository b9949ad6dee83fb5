"""Saved pruned and low-rank models load with transformers' Auto classes after `import pruning` /
`import lowrank_vit`: the same logits as the suite's own loaders, physically smaller, with
`generate` and `save_pretrained`; without the import, loading fails and the files name the import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForImageClassification

import lowrank_vit
import pruning
from lowrank_vit import MixedRankConfig, compress, load_compressed
from pruning import MASK_NAMES, PruningPlan, baseline_prune, load_pruned, prune_model


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _ids(model, n=2, t=12, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def _random_plan(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    widths = {"attn_in": 64, "attn_out": 64, "mlp_in": 64, "mlp_mid": 128, "mlp_out": 64}
    masks = [{m: (torch.rand(widths[m], generator=g) > 0.4).float() for m in MASK_NAMES} for _ in range(2)]
    return PruningPlan.from_masks("disp", masks)


def _pruned(method, llama):
    if method == "disp":
        return prune_model(llama, _random_plan(llama))
    return baseline_prune(method, llama, 0.5, _ids(llama, n=4, t=16, seed=2))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method", ["disp", "magnitude", "wanda-sp", "slicegpt"])
def test_pruned_models_load_with_auto_model_for_causal_lm(method, llama, tmp_path):
    pruned = _pruned(method, llama)
    pruned.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "slimtune_pruned" and config["base_model_type"] == "llama"
    assert "import pruning" in config["slimtune_load_hint"]

    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    ids = _ids(llama)
    expected = _logits(load_pruned(tmp_path / "m"), ids)
    assert torch.equal(_logits(auto, ids), expected)
    torch.testing.assert_close(expected, _logits(pruned, ids))
    assert sum(p.numel() for p in auto.parameters()) < sum(p.numel() for p in llama.parameters())
    greedy = auto.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert greedy.shape == (1, ids.shape[1] + 4)

    auto.save_pretrained(tmp_path / "again")  # a method of the loaded model, same format again
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), ids), expected)
    card = (tmp_path / "m" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "import pruning" in card and method in card


def test_pruned_directories_of_the_earlier_format_still_load(llama, tmp_path):
    pruned = prune_model(llama, _random_plan(llama))
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("base_model_type", "base_architecture", "slimtune_load_hint"):
        config.pop(key)
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])  # as written before the model type
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = _ids(llama)
    torch.testing.assert_close(_logits(load_pruned(tmp_path), ids), _logits(pruned, ids))


def test_lowrank_causal_lm_loads_with_auto_model_for_causal_lm(llama, tmp_path):
    import copy

    model = copy.deepcopy(llama)
    ids = _ids(llama, n=8, t=32)
    compress(model, list(ids.split(4)), MixedRankConfig(keep=0.5, compensate_steps=0, calib_images=8), progress=False)
    model.save_pretrained(tmp_path / "lm")  # compress() made save_pretrained write the low-rank type
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["model_type"] == "slimtune_lowrank"
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert any(isinstance(m, lowrank_vit.LowRankLinear) for m in auto.modules())
    expected = _logits(load_compressed(tmp_path / "lm"), ids[:2])
    assert torch.equal(_logits(auto, ids[:2]), expected)
    assert torch.equal(expected, _logits(model, ids[:2]))
    assert auto.generate(ids[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)
    assert "AutoModelForCausalLM" in (tmp_path / "lm" / "README.md").read_text()


def test_lowrank_vit_loads_with_auto_model_for_image_classification(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64, num_labels=3)).eval()
    pixels = torch.randn(48, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    compress(model, list(pixels.split(16)), MixedRankConfig(keep=0.5, compensate_steps=0, calib_images=48), progress=False)
    model.save_pretrained(tmp_path / "vit")
    auto = AutoModelForImageClassification.from_pretrained(tmp_path / "vit").eval()
    with torch.no_grad():
        expected = load_compressed(tmp_path / "vit")(pixel_values=pixels[:4]).logits
        assert torch.equal(auto(pixel_values=pixels[:4]).logits, expected)
        assert torch.equal(model(pixel_values=pixels[:4]).logits, expected)
    card = (tmp_path / "vit" / "README.md").read_text()
    assert "pipeline_tag: image-classification" in card and "import lowrank_vit" in card


def test_without_the_import_loading_fails_and_the_files_name_the_import(llama, tmp_path):
    prune_model(llama, _random_plan(llama)).save_pretrained(tmp_path / "pruned")
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n    print(e)\n    sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pruned")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "slimtune_pruned" in done.stdout  # transformers names the model type it does not know
    assert "import pruning" in json.loads((tmp_path / "pruned" / "config.json").read_text())["slimtune_load_hint"]
    assert "import pruning" in (tmp_path / "pruned" / "README.md").read_text()
    assert pruning.FAMILY.hint.startswith("import pruning")


def test_a_pruned_model_returns_every_layers_hidden_states(pruned_dir, tiny_llama_dir):
    """transformers records hidden states by hooking the decoder-layer class; pruned layers are
    still instances of it, so QST (which reads them) can tune a pruned backbone."""
    from transformers import AutoModelForCausalLM

    import pruning  # noqa: F401 - registers the pruned model type

    model = AutoModelForCausalLM.from_pretrained(pruned_dir).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert torch.equal(out.hidden_states[0], model.get_input_embeddings()(ids))
