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
