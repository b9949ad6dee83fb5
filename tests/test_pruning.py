"""DISP-LLM pruning: masks, regulariser, export, save/load, accounting, baselines (tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from eval.errors import UserInputError
from pruning import (
    MASK_NAMES,
    DispConfig,
    HyperNetwork,
    PruningPlan,
    baseline_prune,
    block_params,
    budget_regulariser,
    deterministic_masks,
    gumbel_sigmoid,
    kept_block_params,
    layout_for,
    load_pruned,
    masks_applied,
    model_geometry,
    prune_model,
    reinmax_bernoulli,
    slicegpt_prune,
)
from pruning.baselines import slicegpt_width
from pruning.masking import MaskState
from pruning.model import PrunedDecoderLayer


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


@pytest.fixture(scope="module")
def opt(tiny_opt_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_opt_dir).eval()


@pytest.fixture(scope="module")
def qwen3():
    """Qwen3: a family supported through eval.architectures' table only (per-head q/k RMSNorms,
    head_dim 32 ≠ hidden / heads, grouped-query attention)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norm gains, so slicing and folding them is tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape))
    return model


@pytest.fixture(scope="module")
def phi3():
    """Phi-3: fused projections (qkv [q; k; v], gate_up [gate; up]), supported through the table."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape))
    return model


def _random_masks(model, p=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for geo in model_geometry(model):
        layer = {m: (torch.rand(geo.width(m), generator=g) < p).float() for m in MASK_NAMES}
        for m in layer.values():
            m[0] = 1.0  # never empty
        masks.append(layer)
    return masks


def _masked_logits(model, masks, ids):
    state = MaskState()
    with masks_applied(model, state), torch.no_grad():
        state.masks = masks
        return model(input_ids=ids).logits


def _ids(model, n=2, t=12, seed=0):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


# --- masks and geometry -------------------------------------------------------------------------

def test_geometry_and_mask_shapes_llama_gqa(llama):
    geo = model_geometry(llama)
    # 4 query heads, 2 key/value heads of 16 dims: q 64 + k 32 + v 32 rows read the attention input
    assert [(g.hidden, g.intermediate, g.attn_in_rows, g.attn_out_cols, g.n_mlp_in) for g in geo] == [(64, 128, 128, 64, 2)] * 2
    assert geo[0].dense_block_params() == sum(
        llama.get_submodule(f"model.layers.0.{p}").weight.numel()
        for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    net = HyperNetwork([{m: g.width(m) for m in MASK_NAMES} for g in geo], seed=0)
    logits = net()
    assert len(logits) == 2
    assert {m: tuple(t.shape) for m, t in logits[0].items()} == {
        "attn_in": (64,), "attn_out": (64,), "mlp_in": (64,), "mlp_mid": (128,), "mlp_out": (64,)}
    assert net.z.shape == (1, 10, 32) and net.gru.bidirectional and net.gru.hidden_size == 64


def test_geometry_of_fused_projections_phi3(phi3):
    geo = model_geometry(phi3)
    # qkv: (4 + 2·2)·16 = 128 rows; gate_up: 2 × 96 rows, counted as two intermediate-wide blocks
    assert [(g.hidden, g.intermediate, g.attn_in_rows, g.attn_out_cols, g.n_mlp_in) for g in geo] == [(64, 96, 128, 64, 2)] * 2
    assert geo[0].dense_block_params() == sum(phi3.get_submodule(f"model.layers.0.{p}").weight.numel()
                                              for p in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
                                                        "mlp.down_proj"))


def test_geometry_and_mask_shapes_opt(opt):
    geo = model_geometry(opt)
    assert [(g.hidden, g.intermediate, g.attn_in_rows, g.attn_out_cols, g.n_mlp_in) for g in geo] == [(64, 128, 192, 64, 1)] * 2
    logits = HyperNetwork([{m: g.width(m) for m in MASK_NAMES} for g in geo])()
    assert tuple(logits[1]["mlp_mid"].shape) == (128,)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config

    with pytest.raises(UserInputError, match="supported: llama, mistral, opt, phi3, qwen2, qwen3$"):
        layout_for(GPT2Config())


def test_config_validation():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserInputError, match="kept"):
            DispConfig(kept=bad)
    with pytest.raises(UserInputError, match="estimator"):
        DispConfig(estimator="st")
    assert DispConfig(kept=1.0).kept == 1.0


# --- estimators and regulariser -------------------------------------------------------------------

def test_regulariser_value_and_sign():
    p = 0.5
    for r in (0.25, 0.5, 0.8):
        ratio = torch.tensor(r, requires_grad=True)
        reg = budget_regulariser(ratio, p)
        reg.backward()
        assert reg.item() == pytest.approx(abs(torch.log(torch.tensor(r / p)).item()), abs=1e-6)
        assert reg.item() >= 0
        if r > p:
            assert ratio.grad.item() > 0  # too many kept: descending lowers the count
        elif r < p:
            assert ratio.grad.item() < 0
    assert budget_regulariser(torch.tensor(0.8), 0.5).item() == pytest.approx(torch.log(torch.tensor(1.6)).item())


def test_reinmax_forward_is_binary_and_gradient_matches_the_formula():
    torch.manual_seed(0)
    logits = torch.randn(2000, requires_grad=True)
    tau = 0.4
    mask = reinmax_bernoulli(logits, tau)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    mask.sum().backward()
    d = mask.detach()
    pi0 = torch.sigmoid(logits.detach())
    pi1 = (d + torch.sigmoid(logits.detach() / tau)) / 2
    expected = 2 * pi1 * (1 - pi1) - 0.5 * pi0 * (1 - pi0)
    torch.testing.assert_close(logits.grad, expected)
    # samples follow Bernoulli(σ(ℓ)): mean close to the mean probability
    assert abs(d.mean().item() - pi0.mean().item()) < 0.05


def test_gumbel_sigmoid_is_binary_with_straight_through_gradient():
    torch.manual_seed(0)
    logits = torch.full((4000,), 1.0, requires_grad=True)
    mask = gumbel_sigmoid(logits, 0.4)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert abs(mask.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.05
    mask.sum().backward()
    assert (logits.grad >= 0).all() and logits.grad.mean() > 0  # dσ((ℓ+g)/τ)/dℓ, tiny far from 0


# --- export ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "opt", "qwen3", "phi3"])
def test_export_equals_masked_model_and_counts_exactly(name, request):
    model = request.getfixturevalue(name)
    masks = _random_masks(model)
    ids = _ids(model)
    expected = _masked_logits(model, masks, ids)
    pruned = prune_model(model, PruningPlan.from_masks("test", masks))
    with torch.no_grad():
        got = pruned(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert block_params(pruned) == int(kept_block_params(model_geometry(model), masks))
    assert block_params(pruned) < block_params(model)
    # heads stay whole: k/v projections keep num_kv_heads·head_dim rows
    if name in ("llama", "qwen3"):
        head_dim = 32 if name == "qwen3" else 16
        assert pruned.model.layers[0].self_attn.k_proj.out_features == 2 * head_dim
    if name == "qwen3":  # the per-head norms act on head_dim, which no selection touches
        assert pruned.model.layers[0].self_attn.q_norm.weight.shape == (32,)
    if name == "phi3":  # fused: qkv keeps every row; gate_up keeps the same channels in both halves
        kept_mid = int(masks[0]["mlp_mid"].sum())
        assert pruned.model.layers[0].self_attn.qkv_proj.out_features == 128
        assert pruned.model.layers[0].mlp.gate_up_proj.out_features == 2 * kept_mid


def test_disp_trains_and_exports_a_fused_projection_family_on_budget(phi3):
    from pruning import train_disp

    blocks = _ids(phi3, n=4, t=16, seed=4)
    result = train_disp(phi3, blocks, DispConfig(kept=0.5, steps=4, lr=1e-2, estimator="gumbel"), batch_size=2)
    pruned = prune_model(phi3, result.plan)
    assert abs(block_params(pruned) / block_params(phi3) - 0.5) <= 0.01 * 0.5
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=blocks).logits).all()


def test_kept_one_gives_back_the_dense_logits(llama):
    full = [{m: torch.ones(g.width(m)) for m in MASK_NAMES} for g in model_geometry(llama)]
    pruned = prune_model(llama, PruningPlan.from_masks("disp", full))
    ids = _ids(llama)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, llama(input_ids=ids).logits)
    assert block_params(pruned) == block_params(llama)


def test_deterministic_export_meets_budget_without_noise(llama):
    geo = model_geometry(llama)
    g = torch.Generator().manual_seed(1)
    logits = [{m: torch.randn(x.width(m), generator=g) + 2.0 for m in MASK_NAMES} for x in geo]
    a, t_a = deterministic_masks(logits, geo, kept=0.5)
    b, t_b = deterministic_masks(logits, geo, kept=0.5)
    assert t_a == t_b and all(torch.equal(x[m], y[m]) for x, y in zip(a, b) for m in MASK_NAMES)
    dense = sum(x.dense_block_params() for x in geo)
    assert abs(float(kept_block_params(geo, a)) / dense - 0.5) <= 0.01 * 0.5
    # logits already on budget at threshold 0: the rule is exactly "keep iff logit > 0"
    sharp = [{m: torch.where(x[m] > 0, 5.0, -5.0) for m in MASK_NAMES} for x in a]
    c, t_c = deterministic_masks(sharp, geo, kept=0.5)
    assert t_c == 0.0 and all(torch.equal(x[m], y[m]) for x, y in zip(a, c) for m in MASK_NAMES)


# --- save / load -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "opt", "qwen3", "phi3"])
def test_save_load_round_trip_and_generate(name, request, tmp_path):
    model = request.getfixturevalue(name)
    masks = _random_masks(model, seed=3)
    pruned = prune_model(model, PruningPlan.from_masks("disp", masks))
    pruned.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["slimtune_pruning"]
    assert set(saved["layers"][0]) == set(MASK_NAMES)
    assert saved["layers"][1]["mlp_mid"] == torch.nonzero(masks[1]["mlp_mid"]).flatten().tolist()
    loaded = load_pruned(tmp_path)
    assert isinstance(loaded.get_submodule(layout_for(loaded.config).layers)[0], PrunedDecoderLayer)
    ids = _ids(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, pruned(input_ids=ids).logits)
    cached = loaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = loaded.generate(ids[:1], max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 18) and torch.equal(cached, uncached)


def test_load_rejects_index_lists_that_do_not_fit(llama, tmp_path):
    pruned = prune_model(llama, PruningPlan.from_masks("disp", _random_masks(llama)))
    pruned.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["slimtune_pruning"]["layers"][0]["attn_in"] = config["slimtune_pruning"]["layers"][0]["attn_in"][:-1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="don't fit the saved weights"):
        load_pruned(tmp_path)
    config["slimtune_pruning"]["layers"][0]["attn_in"] = [5, 3, 999]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserInputError, match="strictly increasing"):
        load_pruned(tmp_path)


# --- baselines -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda-sp"])
@pytest.mark.parametrize("name", ["llama", "opt", "qwen3", "phi3"])
def test_shared_set_baselines_meet_budget(method, name, request):
    model = request.getfixturevalue(name)
    blocks = _ids(model, n=4, t=16, seed=2)
    pruned = baseline_prune(method, model, 0.5, blocks)
    ratio = block_params(pruned) / block_params(model)
    # granularity: one residual dim changes the count by ~2 % of this tiny model's blocks
    assert abs(ratio - 0.5) <= 0.02
    plan = pruned.config.slimtune_pruning
    assert plan["layers"][0]["attn_in"] == plan["layers"][1]["mlp_out"]  # one shared residual set
    with torch.no_grad():
        assert torch.isfinite(pruned(input_ids=blocks).logits).all()


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3"])
def test_slicegpt_meets_budget_counts_rotations_and_is_exact_unsliced(name, request, tmp_path):
    llama = request.getfixturevalue(name)
    blocks = _ids(llama, n=4, t=16, seed=2)
    pruned = slicegpt_prune(llama, 0.5, blocks)
    geo = model_geometry(llama)
    k = pruned.config.hidden_size
    assert k == slicegpt_width(geo, 0.5, multiple_of=4) and k % 4 == 0
    rotations = 2 * k * k * len(geo)
    assert block_params(pruned) == sum(g.block_params({"attn_in": k, "attn_out": k, "mlp_in": k, "mlp_mid": g.intermediate,
                                                       "mlp_out": k}) for g in geo) + rotations
    step = (slicegpt_width(geo, 0.6, 4) - k) or 4  # budget is met to within one width step
    assert abs(block_params(pruned) / block_params(llama) - 0.5) <= 0.5 * step * 1.1 * (
        sum(g.attn_in_rows + g.attn_out_cols + 3 * g.intermediate for g in geo) + 4 * 64 * len(geo)) / block_params(llama)
    pruned.save_pretrained(tmp_path)
    loaded = load_pruned(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=blocks).logits, pruned(input_ids=blocks).logits)
    # no slicing: fold + rotate only, so the logits are the dense model's
    full = slicegpt_prune(llama, 1.0, blocks, width=64)
    with torch.no_grad():
        torch.testing.assert_close(full(input_ids=blocks).logits, llama(input_ids=blocks).logits, atol=1e-4, rtol=1e-4)


def test_slicegpt_rejects_layernorm_models(opt):
    with pytest.raises(UserInputError, match="RMSNorm"):
        slicegpt_prune(opt, 0.5, _ids(opt))


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_llama_style_families_export_and_reload(family, tmp_path):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model(family, vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).eval()
    masks = _random_masks(model, seed=5)
    ids = _ids(model)
    expected = _masked_logits(model, masks, ids)
    prune_model(model, PruningPlan.from_masks("disp", masks)).to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = load_pruned(tmp_path)
    assert loaded.dtype == torch.bfloat16  # the checkpoint's dtype is kept
    with torch.no_grad():
        torch.testing.assert_close(loaded.float()(input_ids=ids).logits, expected, atol=0.1, rtol=0.05)


def test_calibration_blocks_spread_over_the_whole_text(tiny_tokenizer, tiny_texts):
    from eval.data import pack_token_blocks, pick_token_blocks

    everything = pack_token_blocks(tiny_texts, tiny_tokenizer, 16)
    first = pick_token_blocks(tiny_texts, tiny_tokenizer, 16, 4, pick="first")
    spread = pick_token_blocks(tiny_texts, tiny_tokenizer, 16, 4, pick="spread")
    assert torch.equal(first, everything[:4])
    # evenly spaced over the packed text: the first and the last block, and two between
    assert spread.shape == (4, 16)
    assert torch.equal(spread[0], everything[0]) and torch.equal(spread[-1], everything[-1])
    assert torch.equal(pick_token_blocks(tiny_texts, tiny_tokenizer, 16, 10**6), everything)  # fewer than asked: all
    with pytest.raises(UserInputError, match="pick"):
        pick_token_blocks(tiny_texts, tiny_tokenizer, 16, 4, pick="random")


def test_prune_settings_reject_an_unknown_calibration_pick():
    from pruning.pipeline import PruneSettings

    with pytest.raises(UserInputError, match="calib_pick"):
        PruneSettings(model="ref-lm", calib_pick="middle")


def test_rotated_residual_keeps_the_logits_and_the_parameter_count(llama):
    from pruning.baselines import rotate_residual

    ids = _ids(llama, n=2, t=12)
    rotated = rotate_residual(llama, _ids(llama, n=4, t=12, seed=1), batch_size=2)
    with torch.no_grad():
        torch.testing.assert_close(rotated(ids).logits, llama(ids).logits, atol=1e-4, rtol=1e-4)
    assert block_params(rotated) == block_params(llama)
    assert not torch.allclose(rotated.get_input_embeddings().weight, llama.get_input_embeddings().weight)
