"""QST: frozen backbone, exact start, side network shapes, training, save/load, generation."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

from eval.data import pack_token_blocks
from eval.errors import UserInputError
from eval.models import load_causal_lm
from eval.train import TrainConfig, train
from qst import (
    DOWNSAMPLERS,
    QSTConfig,
    QSTForCausalLM,
    QSTForSequenceClassification,
    downsampler_parameter_count,
)
from qst.config import OUTPUT_MIXES
from qst.layer import make_downsampler

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def opt(tiny_opt_dir):
    model, tokenizer = load_causal_lm(tiny_opt_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def llama_nf4(tiny_llama_dir):
    model, tokenizer = load_causal_lm(tiny_llama_dir, quantize="nf4")
    return model, tokenizer


@pytest.fixture(params=["llama", "opt"])
def backbone(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="module")
def blocks(tiny_texts, tiny_tokenizer):
    return pack_token_blocks(tiny_texts, tiny_tokenizer, block_size=24, max_blocks=8)


def _perturb(model: QSTForCausalLM, seed: int = 0) -> None:
    """Randomise the side network (the zero upsampler too) and move alpha off 1, so the side
    path's contribution shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.side_parameters().values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        if model.side.alpha is not None:  # alpha = alpha_init + alpha_lr * offset = 0.5
            model.side.alpha_offset.fill_((0.5 - model.qst_config.alpha_init) / model.qst_config.alpha_lr)


def _weights(model) -> dict[str, torch.Tensor]:
    """Every weight as the model holds it, 4-bit codes and their scales included.

    (Not `state_dict()`: for a 4-bit model on CPU that call itself converts bitsandbytes' CPU
    weight layout back, re-quantizing the block scales, so it is not a read-only view.)
    """
    snapshot = {}
    for name, p in model.named_parameters():
        snapshot[name] = p.data.clone()
        quant_state = getattr(p, "quant_state", None)
        if quant_state is not None:
            snapshot[name + ".absmax"] = quant_state.absmax.clone()
    return snapshot


# --- exact start, frozen backbone ----------------------------------------------------------


@pytest.mark.parametrize("mix", OUTPUT_MIXES)
def test_logits_equal_backbone_at_init(backbone, blocks, mix):
    model, _ = backbone
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix=mix))
    with torch.no_grad():
        expected = model(input_ids=blocks[:2]).logits
        got = qst(input_ids=blocks[:2]).logits
    assert torch.equal(got, expected)
    assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mix", OUTPUT_MIXES)
def test_logits_equal_nf4_backbone_at_init(llama_nf4, blocks, mix):
    model, _ = llama_nf4
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix=mix))
    assert qst.quantize == "nf4"
    mask = torch.ones_like(blocks[:2])
    mask[1, -5:] = 0  # right padding
    with torch.no_grad():
        expected = model(input_ids=blocks[:2], attention_mask=mask).logits
        got = qst(input_ids=blocks[:2], attention_mask=mask).logits
    assert torch.equal(got, expected)


def test_nf4_backbone_with_odd_mlp_width(tmp_path, tiny_tokenizer):
    # bitsandbytes' CPU kernel cannot repack layers whose width is not a multiple of 32 (ref-lm: 688)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    qst = QSTForCausalLM.from_base(str(tmp_path), QSTConfig(r=4), quantize="nf4")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(qst(input_ids=ids).logits, qst.backbone(input_ids=ids).logits)


def test_training_leaves_nf4_backbone_untouched_and_gradient_free(llama_nf4, blocks):
    model, _ = llama_nf4
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, downsample="linear"))
    before = _weights(model)  # (from_base ran the backbone once: bitsandbytes' CPU layout is in place)
    side_before = {n: p.detach().clone() for n, p in qst.side_parameters().items()}
    batches = [{"input_ids": blocks[i:i + 2], "labels": blocks[i:i + 2]} for i in (0, 2)]
    train(qst, batches, TrainConfig(max_steps=3, lr=1e-2, warmup_ratio=0.0))
    assert all(p.grad is None for p in model.parameters())
    after = _weights(model)
    assert before.keys() == after.keys() and any(k.endswith(".absmax") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training  # train mode never reaches the backbone (no dropout there)
    # the side network did train, its blocks included (after the first step has moved `up`)
    moved = {n for n, p in qst.side_parameters().items() if not torch.equal(p, side_before[n])}
    assert "side.upsample.weight" in moved and "side.blocks.0.attn.q_proj.weight" in moved


def test_backbone_runs_without_autograd_graph(llama, blocks):
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    features = qst.backbone_features(blocks[:2])
    assert all(not h.requires_grad and h.grad_fn is None for h in features.hidden_states)
    assert features.last.grad_fn is None


def _first_step_gradients(model, blocks, config: QSTConfig) -> dict[str, torch.Tensor]:
    qst = QSTForCausalLM.from_base(model, config)
    qst.train()
    qst(input_ids=blocks[:2], labels=blocks[:2]).loss.backward()
    assert all(p.grad is None for p in model.parameters())  # nothing reaches the backbone
    return {n: p.grad for n, p in qst.side_parameters().items()}


def test_additive_mix_gives_the_side_path_a_gradient_at_step_0(llama_nf4, blocks):
    # additive: the zero upsampler gets a gradient at once (LoRA's zero B); the rest of the side
    # path receives one through `up` from the second step on
    grads = _first_step_gradients(llama_nf4[0], blocks, QSTConfig(r=4, output_mix="additive"))
    assert grads["side.upsample.weight"].abs().sum() > 0
    assert "side.alpha_offset" not in grads
    # the paper's mix at alpha = 1: (1 - alpha) = 0 stops every side gradient; only alpha gets one
    grads = _first_step_gradients(llama_nf4[0], blocks, QSTConfig(r=4, output_mix="paper"))
    assert grads["side.alpha_offset"].abs() > 0
    assert all(g is None or not g.any() for n, g in grads.items() if n != "side.alpha_offset")


def test_alpha_moves_alpha_lr_times_the_learning_rate_under_a_plain_optimizer(llama, blocks):
    model, _ = llama
    lr = 1e-4
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix="paper", alpha_lr=100.0))
    groups = qst.parameter_groups(lr)
    assert all("lr" not in g for g in groups)  # one learning rate: the speed-up is in alpha's parametrisation
    assert groups[1] == {"params": [qst.side.alpha_offset], "weight_decay": 0.0}
    assert sum(len(g["params"]) for g in groups) == len(qst.side_parameters())
    batch = {"input_ids": blocks[:2], "labels": blocks[:2]}
    # A plain AdamW over all trainable parameters, as transformers' Trainer builds it
    optimizer = torch.optim.AdamW([p for p in qst.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    qst(**batch).loss.backward()
    optimizer.step()
    # Adam's first step moves each parameter by its learning rate (sign of the gradient): the
    # offset by lr, so alpha by alpha_lr * lr
    assert 1 - qst.side.alpha.item() == pytest.approx(100 * lr, rel=1e-3)
    additive = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix="additive"))
    assert additive.side.alpha is None and len(additive.parameter_groups(lr)) == 1


def test_alpha_offset_gradient_is_the_gradient_of_alpha_whatever_its_speed(llama, blocks):
    # Gradient clipping must see d loss / d alpha, not alpha_lr times it (a 100x gradient would
    # dominate the clipped norm and shrink every side step): the offset's gradient is the same
    # at alpha_lr 1 and 100 for the same side network at the same alpha.
    model, _ = llama
    grads = []
    for alpha_lr in (1.0, 100.0):
        torch.manual_seed(0)  # the same side network both times
        qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix="paper", alpha_lr=alpha_lr))
        _perturb(qst)
        with torch.no_grad():
            qst.side.alpha_offset.fill_(-0.3 / alpha_lr)  # alpha = 0.7 in both
        qst(input_ids=blocks[:2], labels=blocks[:2]).loss.backward()
        grads.append(qst.side.alpha_offset.grad.clone())
    assert grads[0].abs() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_side_networks_saved_with_alpha_itself_load_into_the_offset(llama, tmp_path, blocks):
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix="paper", alpha_lr=100.0))
    _perturb(qst)
    with torch.no_grad():
        qst.side.alpha_offset.fill_(-0.002)  # alpha = 0.8
    qst.save_pretrained(tmp_path)
    _write_alpha_itself(qst, tmp_path)
    loaded = QSTForCausalLM.from_pretrained(tmp_path, base=model)
    assert loaded.side.alpha.item() == pytest.approx(0.8, abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=blocks[:2]).logits, qst(input_ids=blocks[:2]).logits)


def test_configs_saved_before_output_mix_load_as_the_paper_mix(llama, tmp_path, blocks):
    import json

    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, output_mix="paper"))
    _perturb(qst)
    qst.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "qst_config.json").read_text())
    assert saved["qst"].pop("output_mix") == "paper" and saved["qst"].pop("alpha_lr") == 100.0
    (tmp_path / "qst_config.json").write_text(json.dumps(saved))  # as written before the fields existed
    _write_alpha_itself(qst, tmp_path)  # and files of that time held alpha itself
    loaded = QSTForCausalLM.from_pretrained(tmp_path, base=model)
    assert (loaded.qst_config.output_mix, loaded.qst_config.alpha_lr) == ("paper", 1.0)  # as they were trained
    assert loaded.side.alpha.item() == pytest.approx(qst.side.alpha.item(), abs=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=blocks[:2]).logits, qst(input_ids=blocks[:2]).logits)


def _write_alpha_itself(qst: QSTForCausalLM, directory) -> None:
    """Rewrite a saved side network as files were written before alpha's parametrisation:
    alpha itself under `side.alpha`, no offset."""
    from safetensors.torch import load_file, save_file

    weights = load_file(directory / "side_network.safetensors")
    del weights["side.alpha_offset"]
    weights["side.alpha"] = qst.side.alpha.detach().clone()
    save_file(weights, directory / "side_network.safetensors")


# --- side network pieces -------------------------------------------------------------------


@pytest.mark.parametrize("kind", DOWNSAMPLERS)
def test_downsampler_shapes_and_parameter_counts(kind):
    d, r, rank = 64, 8, 4
    module = make_downsampler(kind, d, d // r, r, rank)
    out = module(torch.randn(2, 5, d))
    assert out.shape == (2, 5, d // r)
    assert sum(p.numel() for p in module.parameters()) == downsampler_parameter_count(kind, d, d // r, rank)


def test_pooling_downsamplers_pool_groups_of_r():
    h = torch.arange(16.0).reshape(1, 1, 16)
    assert make_downsampler("maxpool", 16, 4, 4, 1)(h).flatten().tolist() == [3.0, 7.0, 11.0, 15.0]
    assert make_downsampler("avgpool", 16, 4, 4, 1)(h).flatten().tolist() == [1.5, 5.5, 9.5, 13.5]


@pytest.mark.parametrize("kind", DOWNSAMPLERS)
def test_side_network_size_per_downsampler(llama, kind):
    model, _ = llama
    d, w, layers = 64, 16, 2
    n_down = (layers + 1) * downsampler_parameter_count(kind, d, w, 8)
    block = 4 * w * w + 3 * w * (128 // 4) + 2 * w  # attention, SwiGLU, two RMSNorms
    rest = layers * w + w + w * d  # gates, final norm, upsampler
    for mix, alpha in (("additive", 0), ("paper", 1)):
        qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, downsample=kind, adapter_rank=8, output_mix=mix))
        assert sum(p.numel() for p in qst.side_parameters().values()) == n_down + layers * block + rest + alpha


def test_side_layers_subset(llama, blocks):
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, side_layers=[1]))
    assert len(qst.side.blocks) == 1 and len(qst.side.downsamplers) == 2
    assert qst(input_ids=blocks[:1]).logits.shape == (1, 24, model.config.vocab_size)


def test_gradient_checkpointing_gives_the_same_gradients_including_gates(llama, blocks):
    model, _ = llama
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, gradient_checkpointing=checkpointing, dropout=0.1))
        _perturb(qst)
        qst.train()
        torch.manual_seed(1)
        qst(input_ids=blocks[:2], labels=blocks[:2]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in qst.side_parameters().items()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    assert grads[1]["side.gates.0.gamma"].abs().sum() > 0


def test_pruned_init_at_full_width_reproduces_the_backbone_block(llama):
    # r = 1 keeps every channel: the side block must then compute exactly the backbone's layer.
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=1, side_init="pruned"))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    features = qst.backbone_features(ids)
    side = qst.side
    from qst.layer import rotary_tables, side_attention_mask, side_position_ids

    positions = side_position_ids(None, 2, 9, 0, ids.device)
    cos, sin = rotary_tables(positions, side.spec.head_dim, side.spec.rope_theta, torch.float32)
    mask = side_attention_mask(None, 2, 9, 0, ids.device)
    with torch.no_grad():
        out = side.blocks[0](features.hidden_states[0], cos, sin, mask)
    torch.testing.assert_close(out, features.hidden_states[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_nf4", "opt"])
def test_pruned_init_copies_backbone_weights(request, name, blocks):
    model, _ = request.getfixturevalue(name)
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, side_init="pruned"))
    spec = qst.side.spec
    assert spec.ffn_kind == ("plain" if name == "opt" else "gated")
    up_name = "fc1" if name == "opt" else "mlp.up_proj"
    layer = (model.model.decoder.layers if name == "opt" else model.model.layers)[0]
    from eval.bnb import dense_weight

    dense = dense_weight(layer.get_submodule(up_name))
    side_up = qst.side.blocks[0].mlp.up_proj.weight
    # every side weight is one of the backbone's weights (a sub-matrix)
    assert torch.isin(side_up.detach(), dense).all()
    assert torch.equal(qst(input_ids=blocks[:1]).logits, model(input_ids=blocks[:1]).logits)


# --- training, save / load -----------------------------------------------------------------


def test_training_loss_on_labelled_positions_equals_full_loss(llama, blocks):
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    _perturb(qst)
    labels = blocks[:2].clone()
    labels[:, :15] = -100  # a prompt, then the answer
    qst.train()
    train_out = qst(input_ids=blocks[:2], labels=labels)
    assert train_out.logits is None
    qst.eval()
    full = qst(input_ids=blocks[:2], labels=labels)
    assert full.logits.shape == (2, 24, model.config.vocab_size)
    torch.testing.assert_close(train_out.loss, full.loss)


def test_loss_falls(backbone, blocks):
    model, _ = backbone
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    batches = [{"input_ids": blocks[i:i + 4], "labels": blocks[i:i + 4]} for i in (0, 4)]
    result = train(qst, batches, TrainConfig(max_steps=50, lr=3e-2, warmup_ratio=0.0))
    assert sum(result.losses[-4:]) / 4 < sum(result.losses[:4]) / 4 - 0.3


@pytest.mark.parametrize("mix", OUTPUT_MIXES)
def test_save_load_round_trip(backbone, tmp_path, blocks, mix):
    model, _ = backbone
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, downsample="lora", adapter_rank=4, side_layers=[0, 1],
                                                    output_mix=mix))
    _perturb(qst)
    qst.save_pretrained(tmp_path)
    assert {"qst_config.json", "side_network.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    from safetensors.torch import load_file

    assert all(not k.startswith("backbone") for k in load_file(tmp_path / "side_network.safetensors"))
    loaded = QSTForCausalLM.from_pretrained(tmp_path)  # finds the backbone from its config
    assert loaded.qst_config == qst.qst_config
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=blocks[:2]).logits, qst(input_ids=blocks[:2]).logits)


def test_loading_onto_a_different_backbone_is_refused(llama, opt, tmp_path):
    qst = QSTForCausalLM.from_base(llama[0], QSTConfig(r=4))
    qst.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="different backbone"):
        QSTForCausalLM.from_pretrained(tmp_path, base=opt[0])
    with pytest.raises(ValueError, match="expected slimtune-qst/sequence_classification"):
        QSTForSequenceClassification.from_pretrained(tmp_path, base=llama[0])


def test_classification_head(backbone, tmp_path, blocks):
    model, _ = backbone
    qst = QSTForSequenceClassification.from_base(model, QSTConfig(r=4), num_labels=3)
    mask = torch.ones_like(blocks[:4])
    mask[0, -6:] = 0
    labels = torch.tensor([0, 1, 2, 1])
    out = qst(input_ids=blocks[:4], attention_mask=mask, labels=labels)
    assert out.logits.shape == (4, 3)
    out.loss.backward()
    assert qst.score.weight.grad is not None and all(p.grad is None for p in model.parameters())
    # padding after the last real token does not change that row's prediction
    alone = qst(input_ids=blocks[:1, :-6]).logits
    torch.testing.assert_close(alone[0], out.logits[0], rtol=1e-4, atol=1e-5)
    qst.save_pretrained(tmp_path)
    loaded = QSTForSequenceClassification.from_pretrained(tmp_path, base=model)
    assert loaded.num_labels == 3
    assert torch.equal(loaded(input_ids=blocks[:4], attention_mask=mask).logits, out.logits)


# --- generation ----------------------------------------------------------------------------


class _Ban(LogitsProcessor):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores):
        scores[:, self.token] = -float("inf")
        return scores


def test_greedy_generation_same_with_and_without_cache(backbone, blocks):
    model, tokenizer = backbone
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    _perturb(qst)
    prompts = blocks[:2, :6].clone()
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = tokenizer.pad_token_id, 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    with_cache = qst.generate(prompts, use_cache=True, **kwargs)
    without = qst.generate(prompts, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 16)
    assert torch.equal(with_cache, without)
    # the cached forward gives the same last-step logits as the full forward
    out = qst(input_ids=with_cache[:, :-1], attention_mask=torch.cat([mask, torch.ones(2, 9, dtype=mask.dtype)], 1))
    first = qst(input_ids=prompts, attention_mask=mask)
    assert torch.equal(first.logits.argmax(-1)[:, -1], with_cache[:, 6])
    assert out.logits.shape[1] == 15


def test_generation_applies_logits_processors(llama, blocks):
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    plain = qst.generate(blocks[:1, :4], max_new_tokens=5, eos_token_id=None)
    banned = int(plain[0, 4])
    constrained = qst.generate(blocks[:1, :4], max_new_tokens=5, eos_token_id=None, logits_processor=[_Ban(banned)])
    assert banned not in constrained[0, 4:].tolist()
    sampled = qst.generate(blocks[:1, :4], max_new_tokens=5, do_sample=True, top_k=5, temperature=0.7, eos_token_id=None)
    assert sampled.shape == (1, 9)
    several = qst.generate(blocks[:2, :4], max_new_tokens=3, do_sample=True, num_return_sequences=3, eos_token_id=None)
    assert several.shape == (6, 7) and torch.equal(several[:3, :4], blocks[[0, 0, 0], :4])


def test_generate_matches_backbone_greedy_at_init(llama, blocks):
    model, _ = llama
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    ours = qst.generate(blocks[:2, :5], max_new_tokens=6, eos_token_id=None)
    theirs = model.generate(blocks[:2, :5], attention_mask=torch.ones_like(blocks[:2, :5]), max_new_tokens=6,
                            do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"downsample": "conv"}, "downsample must be one of"),
    ({"r": 0}, "r must be a positive integer"),
    ({"dropout": 1.5}, "dropout"),
    ({"side_init": "copy"}, "side_init"),
    ({"side_layers": [1, 0]}, "increasing"),
    ({"output_mix": "gated"}, "output_mix must be one of"),
    ({"output_mix": "paper", "alpha_lr": 0}, "alpha_lr must be a positive finite number"),
    ({"output_mix": "additive", "alpha_init": 0.5}, "belongs to output_mix='paper'"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QSTConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"lora_rank": 0}, "BaselineConfig.lora_rank must be a positive integer"),
    ({"num_virtual_tokens": True}, "num_virtual_tokens"),
    ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
])
def test_baseline_config_validation_is_a_user_input_error(kwargs, match):
    from qst.baselines import BaselineConfig

    with pytest.raises(UserInputError, match=match):  # docs/HARNESS_API.md: all bad input
        BaselineConfig(**kwargs)


def test_bad_shapes_against_the_backbone(llama):
    model, _ = llama
    with pytest.raises(ValueError, match="r=5 does not divide the backbone's hidden size 64"):
        QSTForCausalLM.from_base(model, QSTConfig(r=5, downsample="maxpool"))
    with pytest.raises(ValueError, match="not a positive multiple of the backbone's 4 attention heads"):
        QSTForCausalLM.from_base(model, QSTConfig(r=32))
    with pytest.raises(ValueError, match="out of range"):
        QSTForCausalLM.from_base(model, QSTConfig(r=4, side_layers=[5]))


def test_model_without_hidden_states_is_refused():
    class NoStates(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(ValueError, match="decoder-only causal LM, got NoStates"):
        QSTForCausalLM.from_base(NoStates(), QSTConfig())
    with pytest.raises(UserInputError, match="base must be"):
        QSTForCausalLM.from_base(123, QSTConfig())


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "qwen2", "phi"])
def test_other_architectures_need_no_special_code(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if arch == "qwen2":
        sizes["num_key_value_heads"] = 2
    if arch == "gpt2":
        sizes = dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **sizes)).eval()
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=4))
    ids = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        assert torch.equal(qst(input_ids=ids).logits, model(input_ids=ids).logits)
    _perturb(qst)
    kwargs = dict(max_new_tokens=4, eos_token_id=None)
    assert torch.equal(qst.generate(ids, **kwargs), qst.generate(ids, use_cache=False, **kwargs))
