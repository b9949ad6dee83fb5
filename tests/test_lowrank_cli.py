"""`slimtune compress-vit` on a tiny ViT and an ImageNet-style folder (with a corrupt image)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scripts.cli import main


@pytest.fixture(scope="module")
def vit_and_folder(tmp_path_factory):
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("vit-cli")
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64, num_labels=2))
    model.save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for label, name in enumerate(["cats", "dogs"]):
        (root / "data" / name).mkdir(parents=True)
        for i in range(12):
            pixels = (rng.random((8, 8, 3)) * 128 + 100 * label).astype(np.uint8)
            Image.fromarray(pixels).resize((40, 40)).save(root / "data" / name / f"{i}.png")
    (root / "data" / "cats" / "broken.png").write_bytes(b"not a png")
    return root


def test_compress_vit_writes_model_and_report(vit_and_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["compress-vit", "--model", str(vit_and_folder / "model"), "--data", str(vit_and_folder / "data"),
                 "--calib", "8", "--keep", "0.5", "--compensate-steps", "5", "--batch-size", "8", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "compress_report.json").read_text())
    for key in ("params_before", "params_after", "accuracy_before", "accuracy_after", "ranks", "compress_time_s",
                "images_per_s_before", "images_per_s_after"):
        assert key in report
    assert report["params_after"] < report["params_before"]
    assert 0.0 <= report["accuracy_after"] <= 1.0 and report["eval_images"] == 16  # 24 readable - 8 calibration
    assert "1 unreadable" in report["data"]
    assert (out / "compress_report.md").is_file() and (out / "ranks.png").is_file()

    from lowrank_vit import load_compressed

    model = load_compressed(out / "model")
    assert sum(type(m).__name__ == "LowRankLinear" for m in model.modules()) > 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--keep", "1.5"], "keep must be a fraction"),
    (["--calib", "1"], "need at least"),
    (["--calib", "30"], "leaves no images"),
])
def test_compress_vit_bad_input_is_one_clear_error(vit_and_folder, tmp_path, capsys, argv, message):
    code = main(["compress-vit", "--model", str(vit_and_folder / "model"), "--data", str(vit_and_folder / "data"),
                 "--out", str(tmp_path / "out"), "--compensate-steps", "1", *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_compress_vit_refuses_to_overwrite_an_unrelated_directory(vit_and_folder, tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code = main(["compress-vit", "--model", str(vit_and_folder / "model"), "--data", str(vit_and_folder / "data"),
                 "--out", str(tmp_path)])
    assert code == 2 and "not an earlier compress-vit output" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_lowrank_bench_command_runs_the_library_comparison(monkeypatch, tmp_path, capsys):
    """`slimtune lowrank-bench lm` hands its options to `run_benchmark`, which writes the report."""
    import lowrank_vit.benchmark as bench

    seen = {}

    def fake_bench_lm(keeps, variants, base):  # the comparison itself is covered by test_lowrank
        seen.update(keeps=keeps, variants=variants, base=base)
        return {"model": "ref-lm", "rows": [{"variant": "dense", "keep": 1.0, "perplexity": 7.5},
                                            {"variant": "svd", "keep": 0.6, "keep_achieved": 0.6,
                                             "targeted_params": 10, "perplexity": 9.0, "compress_time_s": 0.1}]}

    monkeypatch.setattr(bench, "bench_lm", fake_bench_lm)
    out = tmp_path / "bench"
    assert main(["lowrank-bench", "lm", "--keeps", "0.6", "--variants", "svd", "aa-mixed",
                 "--compensate-steps", "3", "--out", str(out)]) == 0
    assert seen["keeps"] == [0.6] and seen["variants"] == ["svd", "aa-mixed"]
    assert seen["base"].calib_images == bench.DEFAULT_CALIB["lm"] and seen["base"].compensate_steps == 3
    report = json.loads((out / "bench_lm.json").read_text())
    assert report["command"].startswith("slimtune lowrank-bench lm") and report["config"]["compensate_steps"] == 3
    assert "| svd" in (out / "bench_lm.md").read_text() and "perplexity" in capsys.readouterr().out


def test_lowrank_bench_refuses_unknown_variants(tmp_path):
    from eval.errors import UserInputError
    from lowrank_vit.benchmark import run_benchmark

    with pytest.raises(UserInputError, match="unknown variant.*'nope'"):
        run_benchmark("lm", tmp_path / "o", variants=["svd", "nope"])
    with pytest.raises(UserInputError, match="unknown benchmark model 'gpt'"):
        run_benchmark("gpt", tmp_path / "o")
