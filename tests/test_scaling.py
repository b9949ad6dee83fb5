"""`slimtune bench --scaling`: its size list, its reports, and the speed sweeps on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from eval.errors import UserInputError


def test_scaling_sizes_must_be_given_and_grow():
    from qst.benchmark import check_scaling_archs

    assert check_scaling_archs("tiny-llama, llama-h128-l4") == ("tiny-llama", "llama-h128-l4")
    with pytest.raises(UserInputError, match="size list is empty"):
        check_scaling_archs(" , ")
    with pytest.raises(UserInputError, match="must grow strictly, smallest first"):
        check_scaling_archs("llama-h256-l8,llama-h128-l4")
    with pytest.raises(UserInputError, match="unknown architecture 'llama-9b'"):
        check_scaling_archs("tiny-llama,llama-9b")


@pytest.mark.parametrize("extra, message", [
    (["--sweeps", "tuning,speed"], "--sweeps takes a comma-separated list of tuning, pruned, vit; got 'tuning,speed'"),
    (["--sweeps", ","], "--sweeps takes a comma-separated list"),
    (["--methods", "qst,full"], "--scaling measures qst, qlora, qlora-gc, lora; got full"),
])
def test_scaling_sweeps_and_methods_are_checked_before_any_model(tmp_path, capsys, extra, message):
    from scripts.cli import main

    out = tmp_path / "o"
    assert main(["bench", "--scaling", "--sizes", "llama-h128-l4", "--out", str(out), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


def test_scaling_architectures_start_at_ref_lm_and_pass_200m():
    from eval.models import SCALING_ARCHITECTURES, architecture_config, param_count_of_arch
    from eval.reference import reference_path

    sizes = [param_count_of_arch(a) for a in SCALING_ARCHITECTURES]
    assert sizes == sorted(sizes) and sizes[-1] >= 200e6
    ref = json.loads((reference_path("lm") / "config.json").read_text())
    first = architecture_config(next(iter(SCALING_ARCHITECTURES)))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(first, key) == ref[key], key


def test_scaling_report_puts_the_ratios_against_parameter_count(tmp_path):
    from eval.measure import machine_info
    from eval.report import write_report
    from qst.benchmark import _plot_scaling, _scaling_row, format_scaling_markdown

    def bench(qst_mb, qlora_mb, qst_s, qlora_s, floor_s):
        entry = lambda mb, s: {"peak_memory_bytes": mb * 1e6, "step_time_s": s}  # noqa: E731
        return {"methods": {"qst": entry(qst_mb, qst_s), "qlora": entry(qlora_mb, qlora_s),
                            "lora": {"error": "out of memory"}},
                "floor": {"forward_time_s": floor_s, "forward_peak_memory_bytes": 1e6}}

    rows = [_scaling_row("a", 2e6, bench(30, 120, 0.1, 0.4, 0.08)),
            _scaling_row("b", 2e8, bench(300, 1500, 1.0, 4.0, 0.9))]
    assert rows[0]["qst_over_qlora_memory"] == pytest.approx(0.25)
    assert rows[1]["qst_over_qlora_step"] == pytest.approx(0.25)
    assert rows[1]["qst_over_floor_step"] == pytest.approx(1 / 0.9)
    assert rows[0]["lora_step_time_s"] is None and rows[0]["lora_error"] == "out of memory"
    data = {"batch": 4, "seq": 256, "steps": 2, "warmup": 1, "device": "cpu", "archs": ["a", "b"],
            "rows": rows, "machine": machine_info()}
    markdown = format_scaling_markdown(data)
    assert "| a " in markdown and "b lora: out of memory" in markdown and "Machine: CPU" in markdown
    paths = write_report(tmp_path, "scaling", data, markdown, plots={"scaling": _plot_scaling(data)})
    assert paths["plots"]["scaling"].stat().st_size > 0


def test_pruned_scaling_measures_each_size_and_share_in_a_fresh_process(tmp_path):
    from pruning.scaling import run_pruned_scaling

    report = run_pruned_scaling(("tiny-llama",), tmp_path, removed=(0.5,), batch=1, seq=16, rounds=1,
                                log=lambda _: None)
    (row,) = report["data"]["rows"]
    assert row.get("error") is None, row
    assert row["block_params_kept"] == pytest.approx(0.5, abs=0.1)
    assert row["speedup"] == pytest.approx(row["tokens_per_s_pruned"] / row["tokens_per_s_dense"])
    assert (tmp_path / "bench_scaling_pruned.json").is_file() and (tmp_path / "bench_scaling_pruned.png").is_file()


def test_uniform_lowrank_copy_removes_the_share_of_block_weights():
    from transformers import ViTConfig, ViTForImageClassification

    from lowrank_vit.model import find_targets
    from lowrank_vit.speed import lowrank_speed, uniform_lowrank_copy

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=128, image_size=32, patch_size=8,
                                                num_labels=10)).eval()
    targets = list(find_targets(model))
    dense = sum(model.get_submodule(n).weight.numel() for n in targets)
    copy = uniform_lowrank_copy(model, 0.6)
    kept = sum(copy.get_submodule(n).rank * (copy.get_submodule(n).in_features + copy.get_submodule(n).out_features)
               for n in targets)
    assert kept / dense == pytest.approx(0.4, abs=0.02)
    assert all(isinstance(model.get_submodule(n), torch.nn.Linear) for n in targets)  # the original is untouched
    result = lowrank_speed(model, removed=(0.5, 0.6), batch=2, rounds=1)
    assert set(result["images_per_s"]) == {"dense", "0.5", "0.6"}
    assert result["params"]["0.6"] < result["params"]["0.5"] < result["params"]["dense"]
    with pytest.raises(UserInputError, match="removed must be a fraction"):
        uniform_lowrank_copy(model, 1.0)
