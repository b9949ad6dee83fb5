"""lowrank_vit: decompositions, allocation, the layer, compress() on tiny ViT / DeiT / Swin / Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from eval.errors import UserInputError
from lowrank_vit import (
    LowRankLinear,
    MixedRankConfig,
    compress,
    find_targets,
    load_compressed,
    save_pretrained,
)
from lowrank_vit.allocate import (
    budget,
    greedy_ranks,
    is_dense,
    layer_cost,
    total_cost,
    uniform_ranks,
)
from lowrank_vit.decompose import output_error, plain_svd, whitened_svd
from lowrank_vit.layer import quantize_rows_int8

FAST = {"compensate_steps": 10, "calib_images": 64}  # exercises refit and the trained residual


def tiny_vit(kind: str = "vit", seed: int = 0) -> nn.Module:
    from transformers import (
        DeiTConfig,
        DeiTForImageClassification,
        SwinConfig,
        SwinForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(seed)
    common = {"image_size": 32, "num_labels": 5}
    if kind == "swin":
        config = SwinConfig(patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, **common)
        return SwinForImageClassification(config).eval()
    vit_like = {"patch_size": 8, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, **common}
    if kind == "deit":
        return DeiTForImageClassification(DeiTConfig(**vit_like)).eval()
    return ViTForImageClassification(ViTConfig(**vit_like)).eval()


def image_batches(n: int = 64, batch: int = 16, seed: int = 1) -> list[torch.Tensor]:
    # Correlated "images": smooth low-frequency patterns, so activations are far from white.
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return list(x.split(batch))


def logits(model, batches):
    with torch.no_grad():
        return torch.cat([model(pixel_values=b).logits for b in batches])


def correlated_inputs(n_tokens: int, width: int, generator: torch.Generator) -> torch.Tensor:
    mixing = torch.randn(width, width, generator=generator, dtype=torch.float64)
    decay = torch.logspace(0, -2, width, dtype=torch.float64)  # strongly anisotropic
    return (torch.randn(n_tokens, width, generator=generator, dtype=torch.float64) * decay) @ mixing


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("bad", [{"keep": 0.0}, {"keep": 1.5}, {"keep": -0.1}, {"method": "pca"},
                                 {"targets": ("mlp_in", "conv")}, {"residual_rank": -1}, {"calib_images": 0}, {"lr": 0}])
def test_config_rejects_bad_values(bad):
    with pytest.raises(UserInputError):
        MixedRankConfig(**bad)


def test_config_round_trips_through_dict():
    config = MixedRankConfig(keep=0.4, method="asvd", targets=("mlp_in",))
    assert MixedRankConfig.from_dict(config.to_dict()) == config
    assert not config.compensates and config.effective_residual_rank == 0


# ------------------------------------------------------------------------------- decompositions


@settings(max_examples=25, deadline=None)
@given(m=st.integers(2, 12), n=st.integers(2, 12), frac=st.floats(0.0, 1.0), seed=st.integers(0, 10_000))
def test_whitened_truncation_error_is_dropped_energy_and_beats_plain_svd(m, n, frac, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = correlated_inputs(4 * n + 8, n, g)  # [N, n]
    xtx = x.T @ x
    rank = int(frac * min(m, n))
    white = whitened_svd(w, xtx)
    up, down = white.factors(rank)
    actual = (x @ (w - up @ down).T).square().sum()
    dropped = white.s[rank:].square().sum()
    assert torch.isclose(actual, dropped, rtol=1e-6, atol=1e-9 * float(xtx.trace()) * float(w.square().sum()))
    up_p, down_p = plain_svd(w).factors(rank)
    plain = (x @ (w - up_p @ down_p).T).square().sum()
    assert actual <= plain * (1 + 1e-9) + 1e-9
    # the relative form the report uses agrees
    assert abs(output_error(w, up @ down, xtx) - float(dropped / (x @ w.T).square().sum())) < 1e-8


def test_whitening_adds_jitter_only_when_inputs_are_degenerate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 6, generator=g, dtype=torch.float64)  # rank 3 < 6
    d = whitened_svd(torch.randn(4, 6, dtype=torch.float64, generator=g), x.T @ x)
    assert d.jitter > 0 and torch.isfinite(d.vt).all()
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    assert whitened_svd(torch.randn(4, 6, dtype=torch.float64), x.T @ x).jitter == 0.0


# ------------------------------------------------------------------------------------- layer


def test_full_rank_lowrank_linear_reproduces_dense_layer_and_folds_back():
    torch.manual_seed(0)
    dense = nn.Linear(24, 16)
    x = torch.randn(40, 24)
    d = whitened_svd(dense.weight, (x.T @ x).double())
    up, down = d.factors(d.max_rank)
    layer = LowRankLinear.from_factors(up.float(), down.float(), dense.bias.detach(), residual_rank=3)
    with torch.no_grad():
        assert torch.allclose(layer(x), dense(x), atol=1e-5)  # residual starts at exactly zero
        assert torch.allclose(layer.fold_to_dense()(x), dense(x), atol=1e-5)
        layer.residual_up.normal_()
        before = layer(x)
        layer.merge_residual()
        assert layer.residual_rank == 0 and layer.rank == 16 + 3
        assert torch.allclose(layer(x), before, atol=1e-5)
    assert layer.weight_parameters() == 19 * (24 + 16)


def test_int8_rows_are_close_and_layer_quantizes():
    w = torch.randn(8, 30)
    q, scale = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (8, 1)
    assert ((q.float() * scale - w).abs() <= scale / 2 + 1e-6).all()  # half a step per row
    layer = LowRankLinear.from_factors(torch.randn(6, 4), torch.randn(4, 10), torch.zeros(6))
    x = torch.randn(5, 10)
    with torch.no_grad():
        before = layer(x)
        layer.quantize_int8()
        assert layer.is_int8 and layer.down is None
        assert torch.allclose(layer(x), before, rtol=0.05, atol=0.05)


def test_refit_recovers_an_exact_low_rank_map_and_never_hurts():
    from lowrank_vit.compensate import compensate_layer, refit_principal, relative_error

    g = torch.Generator().manual_seed(0)
    x = correlated_inputs(300, 12, g).float()
    true = (torch.randn(10, 3, generator=g) @ torch.randn(3, 12, generator=g))  # rank 3
    bias = torch.randn(10, generator=g)
    y = x @ true.T + bias
    layer = LowRankLinear.from_factors(torch.randn(10, 3, generator=g), torch.randn(3, 12, generator=g), bias)
    refit_principal(layer, x, y, ridge=0.0)
    assert relative_error(layer, x, y) < 1e-8
    refit_principal(layer, x, y)  # the default small ridge costs next to nothing
    assert relative_error(layer, x, y) < 1e-4
    noisy = y + 0.5 * torch.randn(y.shape, generator=g)
    layer = LowRankLinear.from_factors(torch.randn(10, 2, generator=g), torch.randn(2, 12, generator=g), bias, residual_rank=1)
    result = compensate_layer(layer, x, noisy, steps=0, lr=1e-3, refit=True)
    assert result.error_after < result.error_before and not result.reverted


def test_activation_scaled_int8_survives_outlier_channels():
    from lowrank_vit.quantize import input_column_scales

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g, dtype=torch.float64)
    x[:, 0] *= 300.0  # one outlier channel, as after a ViT LayerNorm
    w = torch.randn(12, 16, generator=g, dtype=torch.float64)
    w[:, 0] /= 300.0
    up, down = whitened_svd(w, x.T @ x).factors(8)
    exact = x @ (up @ down).T

    def int8_output_error(scales):
        layer = LowRankLinear.from_factors(up.float(), down.float(), None)
        layer.quantize_int8(scales)
        with torch.no_grad():
            got = layer(x.float()).double()
        return float((got - exact).square().sum() / exact.square().sum())

    scaled = int8_output_error(input_column_scales(down, x.T @ x / x.shape[0]))
    assert scaled < 1e-3 and scaled < int8_output_error(None) / 10


# -------------------------------------------------------------------------------- allocation


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 40), st.integers(2, 40)), min_size=1, max_size=6),
       st.floats(0.05, 1.0), st.integers(0, 2), st.integers(0, 1000))
def test_greedy_allocation_meets_the_budget_exactly(shapes, keep, residual, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {f"l{i}": s for i, s in enumerate(shapes)}
    gains = {}
    for name, (m, n) in shapes.items():
        s = torch.rand(min(m, n), generator=g, dtype=torch.float64).sort(descending=True).values
        gains[name] = s / s.sum()
    limit = budget(shapes, keep)
    try:
        ranks = greedy_ranks(shapes, gains, limit, residual_rank=residual)
    except UserInputError:
        floor = sum(layer_cost(None if is_dense(1, s, residual) else 1, s, residual) for s in shapes.values())
        assert floor > limit  # refused only when even rank 1 everywhere does not fit
        return
    spent = total_cost(ranks, shapes, residual)
    assert spent <= limit
    for name, rank in ranks.items():  # nothing more fits: every layer's next step is over budget
        if rank is not None:
            nxt = None if is_dense(rank + 1, shapes[name], residual) else rank + 1
            assert spent + layer_cost(nxt, shapes[name], residual) - layer_cost(rank, shapes[name], residual) > limit
    if keep == 1.0:
        assert all(r is None for r in ranks.values())


def test_greedy_gives_more_rank_where_the_spectrum_is_flat():
    shapes = {"flat": (20, 20), "steep": (20, 20)}
    gains = {"flat": torch.full((20,), 1 / 20, dtype=torch.float64),
             "steep": torch.tensor([0.9] + [0.1 / 19] * 19, dtype=torch.float64)}
    ranks = greedy_ranks(shapes, gains, budget(shapes, 0.4))
    assert ranks["flat"] > ranks["steep"] >= 1


def test_uniform_ranks_keep_the_same_fraction():
    ranks = uniform_ranks({"a": (32, 32), "b": (128, 32)}, 0.5)
    assert ranks == {"a": 8, "b": 12}
    assert all(r is None for r in uniform_ranks({"a": (32, 32)}, 1.0).values())


# ------------------------------------------------------------------------------ compress()


def test_find_targets_by_structure():
    vit = find_targets(tiny_vit("vit"))
    assert len(vit) == 12 and vit["vit.layers.0.attention.o_proj"] == "attn_out"
    assert vit["vit.layers.1.mlp.fc1"] == "mlp_in" and vit["vit.layers.1.mlp.fc2"] == "mlp_out"
    swin = find_targets(tiny_vit("swin"))
    assert len(swin) == 12 and not any("reduction" in n or "classifier" in n for n in swin)
    assert set(find_targets(tiny_vit("vit"), ("mlp_out",)).values()) == {"mlp_out"}


@pytest.mark.parametrize("method", ["aa-mixed", "svd"])
def test_keep_one_leaves_outputs_unchanged(method):
    model, batches = tiny_vit(), image_batches()
    before = logits(model, batches)
    report = compress(model, batches, MixedRankConfig(keep=1.0, method=method, **FAST), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert set(report["ranks"].values()) == {"dense"}
    assert torch.equal(logits(model, batches), before)


def test_compensation_lowers_block_output_error():
    dense, batches = tiny_vit(), image_batches()

    def last_block_error(model):
        with torch.no_grad():
            got = torch.cat([model(pixel_values=b, output_hidden_states=True).hidden_states[-1] for b in batches])
            want = torch.cat([dense(pixel_values=b, output_hidden_states=True).hidden_states[-1] for b in batches])
        return float((got - want).square().sum() / want.square().sum())

    def run(**kw):
        model = copy.deepcopy(dense)
        report = compress(model, batches, MixedRankConfig(keep=0.5, calib_images=64, **kw), progress=False)
        return last_block_error(model), [e["compensation"] for e in report["layers"].values() if "compensation" in e]

    # closed-form refit against no compensation: same ranks (no residual in either)
    plain, _ = run(refit=False, compensate_steps=0)
    refit, comp = run(refit=True, compensate_steps=0)
    assert refit < plain
    assert comp and all(c["error_after"] <= c["error_before"] for c in comp)
    # gradient descent on the residual: same ranks and residual, only the training differs
    untrained, _ = run(refit=False, compensate_steps=60, lr=1e-12)
    trained, comp = run(refit=False, compensate_steps=60, lr=3e-3)
    assert trained < untrained
    assert sum(c["error_after"] for c in comp) < sum(c["error_before"] for c in comp)


@pytest.mark.parametrize("kind", ["vit", "deit", "swin"])
def test_compress_tiny_models_meets_budget_and_round_trips(kind, tmp_path):
    model, batches = tiny_vit(kind), image_batches()
    report = compress(model, batches, MixedRankConfig(keep=0.5, **FAST), progress=False)
    assert report["targeted_params_after"] <= report["budget"] <= 0.5 * report["targeted_params_before"]
    assert report["params_after"] < report["params_before"]
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    out = logits(model, batches)
    assert torch.isfinite(out).all()
    save_pretrained(model, tmp_path / "m", report)
    loaded = load_compressed(tmp_path / "m")
    assert torch.equal(logits(loaded, batches), out)


def test_int8_model_round_trips_and_stays_close(tmp_path):
    model, batches = tiny_vit(), image_batches()
    report = compress(model, batches, MixedRankConfig(keep=0.6, int8=True, calib_images=64), progress=False)
    float_model = tiny_vit()
    compress(float_model, batches, MixedRankConfig(keep=0.6, calib_images=64), progress=False)
    out, ref = logits(model, batches), logits(float_model, batches)
    assert all(m.is_int8 for m in model.modules() if isinstance(m, LowRankLinear))
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    save_pretrained(model, tmp_path / "q", report)
    assert torch.equal(logits(load_compressed(tmp_path / "q"), batches), out)


def test_causal_lm_linears(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    roles = find_targets(model)
    assert len(roles) == 14 and roles["model.layers.0.mlp.down_proj"] == "mlp_out"
    assert roles["model.layers.0.mlp.gate_proj"] == roles["model.layers.0.mlp.up_proj"] == "mlp_in"
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    batches = list(ids.split(4))
    report = compress(model, batches, MixedRankConfig(keep=0.5, compensate_steps=5, calib_images=8), progress=False)
    assert report["targeted_params_after"] <= report["budget"]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    save_pretrained(model, tmp_path / "lm", report)
    with torch.no_grad():
        assert torch.equal(load_compressed(tmp_path / "lm")(input_ids=ids).logits, out)


# ----------------------------------------------------------------------------------- bad input


def test_too_few_calibration_images_says_how_many():
    model = tiny_vit()
    with pytest.raises(UserInputError, match=r"need at least \d+ samples"):
        compress(model, image_batches(n=2, batch=2), MixedRankConfig(keep=0.5), progress=False)


def test_model_without_targets_is_refused():
    with pytest.raises(UserInputError, match="no layers to compress"):
        compress(nn.Sequential(nn.Linear(4, 4)), [torch.randn(2, 4)], MixedRankConfig(), progress=False)


def test_calibration_batches_as_dataloader_pairs_and_bad_batches():
    model, batches = tiny_vit(), image_batches()
    pairs = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches]
    report = compress(model, pairs, MixedRankConfig(keep=0.5, calib_images=40), progress=False)
    assert report["calib_samples"] == 40
    with pytest.raises(UserInputError, match="calibration batch"):
        compress(tiny_vit(), ["not a tensor"], MixedRankConfig(), progress=False)


def test_budget_below_rank_one_everywhere_is_refused():
    with pytest.raises(UserInputError, match="too small"):
        compress(tiny_vit(), image_batches(), MixedRankConfig(keep=0.01, residual_rank=4, calib_images=64), progress=False)


def test_load_rejects_a_directory_that_is_not_a_compressed_model(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_compressed(tmp_path)
