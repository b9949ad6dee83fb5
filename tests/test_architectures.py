"""eval.architectures: the one table of decoder layouts, and a family added through it (Qwen3)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from eval import architectures as arch
from eval.errors import UserInputError


def tiny_decoder(model_type: str, seed: int = 0, **overrides):
    """A 2-layer random model of a table family: hidden 64, 4 heads (2 key/value heads where the family has them)."""
    sizes = dict(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if arch.LAYOUTS[model_type].kv_heads:
        sizes["num_key_value_heads"] = 2
    if model_type == "gpt2":
        sizes = dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    if model_type == "opt":
        sizes["ffn_dim"] = sizes.pop("intermediate_size")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**sizes, **overrides})).eval()


def tiny_qwen3():
    # head_dim 32 with 4 heads: q is 128 rows wide, twice the hidden size (Qwen3's head_dim is its own setting)
    return tiny_decoder("qwen3", head_dim=32)


@pytest.mark.parametrize("model_type", sorted(arch.LAYOUTS))
def test_every_path_of_every_entry_exists(model_type):
    model = tiny_decoder(model_type)
    layout = arch.decoder_layout(model)
    assert model_type in layout.model_types
    for path in (layout.embed_tokens, layout.final_norm, layout.lm_head):
        model.get_submodule(path)
    assert model.get_submodule(layout.lm_head) is model.get_output_embeddings()
    layers = arch.decoder_layers(model, layout)
    assert len(layers) == 2
    layer = layers[0]
    per_layer = [*arch.block_linears(layout), layout.attn, layout.attn_norm, *layout.qk_norms]
    per_layer += [p for p in (layout.mlp, layout.mlp_norm, layout.activation_module) if p]
    for path in per_layer:
        layer.get_submodule(path)
    linear = torch.nn.Linear if layout.linear == "linear" else type(layer.get_submodule(layout.o))
    assert all(isinstance(layer.get_submodule(p), linear) for p in arch.block_linears(layout))
    # every linear of the block has a role, so the low-rank search and DISP miss none
    block = {n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert block == (set(arch.linear_roles(layout)) if layout.linear == "linear" else set())
    heads, kv = arch.head_counts(model.config, layout)
    assert heads == 4 and kv == (2 if layout.kv_heads else 4)
    assert layout.norm_eps is None or isinstance(getattr(model.config, layout.norm_eps), float)
    assert getattr(model.config, layout.activation)


@pytest.mark.parametrize("model_type", ["llama", "opt", "qwen3"])
def test_mlp_forward_is_the_layers_mlp(model_type):
    model = tiny_decoder(model_type)
    layout = arch.decoder_layout(model)
    layer = arch.decoder_layers(model, layout)[0]
    h = torch.randn(2, 5, 64)
    hooked = {}
    handle = arch.mlp_output_module(layer, layout).register_forward_hook(lambda m, a, out: hooked.setdefault("y", out))
    with torch.no_grad():
        y = arch.mlp_forward(layer, layout, h)
    handle.remove()
    assert torch.equal(y, hooked["y"])
    if model_type == "opt":  # no MLP module: fc2(act(fc1(h)))
        torch.testing.assert_close(y, layer.fc2(torch.relu(layer.fc1(h))))


def test_unsupported_model_type_names_the_supported_ones():
    from transformers import BloomConfig

    with pytest.raises(UserInputError, match=r"the test does not support model type 'bloom'; supported: .*qwen3"):
        arch.decoder_layout(BloomConfig(), purpose="the test")
    assert arch.find_layout(BloomConfig()) is None
    sequential = arch.supported_model_types(lambda layout: layout.residual == "sequential")
    assert "phi" not in sequential and "gpt_neox" not in sequential and "llama" in sequential
    with pytest.raises(UserInputError, match="supported: gpt_neox, phi$"):
        arch.decoder_layout(BloomConfig(), needs=lambda layout: layout.residual == "parallel")


def test_slimtune_models_report_their_base_type():
    config = AutoConfig.for_model("qwen3")
    config.base_model_type = "llama"  # as a pruned model's config reads
    assert arch.decoder_layout(config).model_types == ("llama", "mistral", "qwen2")


@pytest.mark.parametrize("model_type", ["llama", "opt", "qwen3", "phi", "gpt_neox"])
def test_low_rank_targets_from_the_table_match_the_structural_search(model_type):
    from lowrank_vit.model import _roles_by_structure, find_blocks, find_targets

    model = tiny_decoder(model_type)
    by_structure = {f"{b}.{n}": role for b, block in find_blocks(model) for n, role in _roles_by_structure(block)}
    targets = find_targets(model)
    assert list(targets.items()) == list(by_structure.items())
    assert set(find_targets(model, ("mlp_in",)).values()) == {"mlp_in"}


def test_low_rank_targets_of_phi3_come_from_the_table():
    from lowrank_vit.model import _roles_by_structure, find_targets

    model = tiny_decoder("phi3")
    targets = find_targets(model)
    prefix = "model.layers.0."
    assert {n[len(prefix):]: r for n, r in targets.items() if n.startswith(prefix)} == {
        "self_attn.o_proj": "attn_out", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "mlp_in",
        "mlp.down_proj": "mlp_out"}
    # Phi-3 registers o_proj before qkv_proj: registration order alone would swap the two roles
    assert dict(_roles_by_structure(model.model.layers[0]))["self_attn.o_proj"] == "attn_qkv"


# --- Qwen3, added through the table only ----------------------------------------------------


def test_qwen3_qst_starts_exact_trains_and_inits_from_the_pruned_backbone():
    from eval.bnb import dense_weight
    from qst import QSTConfig, QSTForCausalLM

    model = tiny_qwen3()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    for side_init in ("random", "pruned"):
        qst = QSTForCausalLM.from_base(model, QSTConfig(r=4, side_init=side_init))
        with torch.no_grad():
            assert torch.equal(qst(input_ids=ids).logits, model(input_ids=ids).logits)
        qst.train()
        qst(input_ids=ids, labels=ids).loss.backward()
        grads = [p.grad for p in qst.side_parameters().values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
        assert all(p.grad is None for p in model.parameters())
    spec = qst.side.spec
    assert (spec.ffn_kind, spec.norm, spec.width, spec.num_heads) == ("gated", "rms", 16, 4)
    layer = model.model.layers[0]
    block = qst.side.blocks[0]
    for side_lin, name in ((block.attn.q_proj, "self_attn.q_proj"), (block.mlp.gate_proj, "mlp.gate_proj"),
                           (block.attn.o_proj, "self_attn.o_proj")):
        assert torch.isin(side_lin.weight.detach(), dense_weight(layer.get_submodule(name))).all(), name


def test_qwen3_pruned_init_keeps_per_head_dims_of_its_own_head_dim():
    from qst import QSTConfig, QSTForCausalLM

    model = tiny_qwen3()  # head_dim 32 ≠ hidden / heads = 16
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=2, side_init="pruned"))  # side: 32 wide, 4 heads of 8
    q = model.model.layers[0].self_attn.q_proj.weight.detach()  # [4·32, 64]
    side_q = qst.side.blocks[0].attn.q_proj.weight.detach()  # [4·8, 32]
    for h in range(4):  # head h's side rows come from backbone head h's rows
        rows = side_q[h * 8:(h + 1) * 8]
        head = q[h * 32:(h + 1) * 32]
        assert all(torch.isin(r, head).all() for r in rows)


def test_side_init_pruned_refuses_a_parallel_block_and_names_the_supported():
    from qst import QSTConfig, QSTForCausalLM

    with pytest.raises(UserInputError, match=r"side_init='pruned' does not support model type 'phi'.*qwen3.*side_init='random'"):
        QSTForCausalLM.from_base(tiny_decoder("phi"), QSTConfig(r=4, side_init="pruned"))


@pytest.mark.parametrize("model_type", ["gpt_neox", "qwen3", "opt"])
def test_adapter_baseline_sites_come_from_the_table(model_type):
    from qst.baselines import add_houlsby_adapters

    model = tiny_decoder(model_type)
    layout = arch.decoder_layout(model)
    assert add_houlsby_adapters(model, 4) == 4
    layer = arch.decoder_layers(model, layout)[0]
    sites = {n.removesuffix(".houlsby_adapter") for n, _ in layer.named_modules() if n.endswith("houlsby_adapter")}
    # GPT-NeoX registers post_attention_layernorm before attention: a name search would pick the norm
    assert sites == {layout.attn, layout.mlp or layout.down}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(6)[None]).logits).all()


@pytest.mark.parametrize("model_type", ["phi3", "llama"])
def test_pruned_init_at_full_width_reproduces_the_block_fused_projections_too(model_type):
    # r = 1 keeps every channel, so the side block computes the backbone's layer exactly: Phi-3's
    # fused qkv ([q; k; v] rows) and gate_up ([gate; up] rows) must be split in the right places.
    from qst import QSTConfig, QSTForCausalLM
    from qst.layer import rotary_tables, side_attention_mask, side_position_ids

    model = tiny_decoder(model_type)
    qst = QSTForCausalLM.from_base(model, QSTConfig(r=1, side_init="pruned"))
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    features = qst.backbone_features(ids)
    side = qst.side
    cos, sin = rotary_tables(side_position_ids(None, 2, 9, 0, ids.device), side.spec.head_dim, side.spec.rope_theta,
                             torch.float32)
    with torch.no_grad():
        out = side.blocks[0](features.hidden_states[0], cos, sin, side_attention_mask(None, 2, 9, 0, ids.device))
    torch.testing.assert_close(out, features.hidden_states[1], rtol=1e-4, atol=1e-5)
