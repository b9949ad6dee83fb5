"""`slimtune compress-lm` writes its model and reports; lm-eval's own Python API, given a saved
pruned directory by path (`model="hf"`, after `import pruning`), agrees with `slimtune zero-shot`."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from scripts.cli import main


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, write_choice_task, sum_questions):
    return write_choice_task(tmp_path_factory.mktemp("tasks"), "tiny_sum", sum_questions(8))


def test_compress_lm_writes_model_reports_and_card(tmp_path, tiny_llama_dir, tiny_texts):
    (tmp_path / "calib.txt").write_text("\n\n".join(tiny_texts))
    out = tmp_path / "lm"
    code = main(["compress-lm", "--model", str(tiny_llama_dir), "--calib", str(tmp_path / "calib.txt"),
                 "--eval", str(tmp_path / "calib.txt"), "--calib-blocks", "8", "--block-size", "32", "--eval-blocks", "4",
                 "--keep", "0.5", "--compensate-steps", "0", "--batch-size", "4", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "compress_report.json").read_text())
    assert report["targeted_params_after"] <= 0.5 * report["targeted_params_before"]
    assert report["perplexity_before"] > 1 and report["perplexity_after"] > 1
    assert "perplexity" in (out / "compress_report.md").read_text() and (out / "ranks.png").stat().st_size > 0
    card = (out / "model" / "README.md").read_text()
    assert "compress-lm" in card and f"{report['perplexity_after']:.6g}" in card  # the measured number, in the card
    import lowrank_vit  # noqa: F401 - registers slimtune_lowrank

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]


def test_lm_eval_called_directly_agrees_with_zero_shot(tmp_path, task_dir, tiny_llama_dir, tiny_tokenizer):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import pruning

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    pruned_dir = tmp_path / "pruned"
    pruning.baseline_prune("magnitude", dense, 0.5).save_pretrained(pruned_dir)
    tiny_tokenizer.save_pretrained(pruned_dir)

    # what the README shows: lm-eval's own API on the directory, after the registering import
    direct = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={pruned_dir},dtype=float32",
                                     tasks=["tiny_sum"], task_manager=TaskManager(include_path=str(task_dir)),
                                     batch_size=4, device="cpu", log_samples=False)
    assert direct["config"]["model"] == "hf"
    out = tmp_path / "zs"
    assert main(["zero-shot", "--pruned", str(pruned_dir), "--tasks", "tiny_sum", "--include-path", str(task_dir),
                 "--batch-size", "4", "--out", str(out)]) == 0
    ours = json.loads((out / "zero_shot.json").read_text())["models"][0]["results"]["tiny_sum"]
    assert direct["results"]["tiny_sum"]["acc,none"] == pytest.approx(ours["acc,none"])
    assert direct["n-samples"]["tiny_sum"]["effective"] == 8
    with torch.no_grad():  # and lm-eval scored the pruned model, not a dense one
        assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(pruned_dir).parameters()) < \
            sum(p.numel() for p in dense.parameters())
