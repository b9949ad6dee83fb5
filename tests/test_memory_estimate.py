"""The analytic memory estimator: the course's worked example, counts that match the real models, CLI."""

from __future__ import annotations

import json

import pytest

from eval.errors import UserInputError
from eval.memory_estimate import COMPONENTS, estimate_memory

COURSE = dict(assumptions="course", param_count=6.515e9)  # the course's 13.03 GB of 16-bit weights


def test_course_full_finetuning_reproduces_67_22_gb():
    est = estimate_memory("llama-2-7b", "full", batch=1, seq=4096, dtype="float16", **COURSE)
    assert est["breakdown_gb"] == {"cuda_context": 1.0, "weights": 13.03, "gradients": 26.06,
                                   "optimizer": 26.06, "activations": 1.07}
    assert est["total_gb"] == 67.22


def test_course_two_percent_trainable_reproduces_15_88_gb():
    est = estimate_memory("llama-2-7b", "full", batch=1, seq=4096, dtype="float16", trainable_fraction=0.02, **COURSE)
    assert est["breakdown_gb"]["gradients"] == 0.26
    assert est["breakdown_gb"]["optimizer"] == 0.52
    assert est["total_gb"] == 15.88


def test_real_parameter_count_of_llama_2_7b_is_used_by_default():
    est = estimate_memory("llama-2-7b", "full", batch=1, seq=4096, dtype="float16", assumptions="course")
    assert est["params"] == 6_738_415_616
    assert est["breakdown_gb"]["weights"] == 13.48


def test_total_is_the_sum_of_the_shown_components():
    est = estimate_memory("opt-1.3b", "qlora", batch=16, seq=512)
    assert set(est["breakdown_gb"]) == set(COMPONENTS)
    assert est["total_gb"] == pytest.approx(sum(est["breakdown_gb"].values()), abs=1e-9)


def test_detailed_ordering_and_qst_side_size_on_llama_2_7b():
    # The paper's MMLU setting: batch 4, seq 384 (QLoRA 15.6 GB vs QST 7.3 GB).
    est = {m: estimate_memory("llama-2-7b", m, batch=4, seq=384) for m in ("full", "lora", "qlora", "lst", "qst")}
    totals = {m: e["total_bytes"] for m, e in est.items()}
    assert totals["qst"] < totals["qlora"] < totals["lora"] < totals["full"]
    assert totals["qst"] < totals["lst"] < totals["lora"]
    assert est["qst"]["trainable_params"] == pytest.approx(28.6e6, rel=0.01)  # paper: ~28.6 M, 0.42 %
    assert est["qlora"]["trainable_params"] == est["lora"]["trainable_params"]
    # QST keeps only the side network's activations (and h_0..h_N): far fewer than QLoRA's.
    assert est["qst"]["breakdown_bytes"]["activations"] < est["qlora"]["breakdown_bytes"]["activations"] / 3


def test_cpu_has_no_cuda_context():
    est = estimate_memory("tiny-llama", "full", batch=2, seq=16, device="cpu")
    assert est["breakdown_gb"]["cuda_context"] == 0


@pytest.mark.parametrize("method", ["lora", "qlora", "qst", "lst", "bitfit", "adapter", "prompt", "prefix"])
def test_counts_match_the_models_bench_builds(tiny_llama_dir, method):
    """The estimator's trainable count equals the real one (PEFT LoRA, QST side net) where it counts itself."""
    from eval.measure import count_parameters
    from qst.baselines import build_tuning_model

    model, _ = build_tuning_model(method, model=str(tiny_llama_dir))
    real = count_parameters(model, trainable_only=True)
    if method in ("lora", "qlora", "qst", "lst"):
        assert estimate_memory(str(tiny_llama_dir), method, batch=1, seq=8)["trainable_params"] == real
    else:  # the estimator is told the count
        est = estimate_memory(str(tiny_llama_dir), method, batch=1, seq=8, trainable_params=real)
        assert est["trainable_params"] == real


def test_bad_input_is_one_clear_error():
    with pytest.raises(UserInputError, match="unknown method 'dora'"):
        estimate_memory("llama-2-7b", "dora")
    with pytest.raises(UserInputError, match="unknown architecture or model 'llama-9b'"):
        estimate_memory("llama-9b", "full")
    with pytest.raises(UserInputError, match="trainable_fraction"):
        estimate_memory("llama-2-7b", "full", trainable_fraction=1.5)
    with pytest.raises(UserInputError, match="batch"):
        estimate_memory("llama-2-7b", "full", batch=0)


def test_cli_json_prints_breakdown_and_total(capsys):
    from scripts.cli import main

    rc = main(["estimate-memory", "--arch", "llama-2-7b", "--method", "full", "--batch", "1", "--seq", "4096",
               "--dtype", "float16", "--assumptions", "course", "--param-count", "6.515e9", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"breakdown_gb", "total_gb"}
    assert out["total_gb"] == 67.22


def test_cli_unknown_architecture_is_one_line(capsys):
    from scripts.cli import main

    assert main(["estimate-memory", "--arch", "gpt-5", "--method", "qst"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune estimate-memory: error: unknown architecture") and "\n" not in err


def test_logits_are_counted_only_at_labelled_positions():
    # batch 4 x 384, 40 labelled tokens: the LM head's logits shrink from 1536 to 40 rows
    vocab = 32000
    for method in ("qst", "lst", "qlora"):
        every = estimate_memory("llama-2-7b", method, batch=4, seq=384)
        labelled = estimate_memory("llama-2-7b", method, batch=4, seq=384, labelled_tokens=40)
        assert estimate_memory("llama-2-7b", method, batch=4, seq=384, labelled_tokens=4 * 384) == every
        saved = every["breakdown_bytes"]["activations"] - labelled["breakdown_bytes"]["activations"]
        logits_saved = (4 * 384 - 40) * vocab * (2 + 4 + 4)
        if method == "qlora":
            assert saved == logits_saved
        else:  # and the output mix and LM-head input (fp32 side on CPU / bf16 on CUDA: 2 + 2 + 2 bytes)
            assert saved == logits_saved + (4 * 384 - 40) * 4096 * 6
    with pytest.raises(UserInputError, match="labelled_tokens"):
        estimate_memory("llama-2-7b", "qst", batch=2, seq=8, labelled_tokens=17)


def test_side_network_activations_are_fp32_on_cpu():
    # the side network keeps fp32 on CPU (no autocast), bf16 under CUDA's autocast; the backbone's
    # states are bf16 on both, plus their fp32 copies (the downsamplers' inputs) on CPU
    kwargs = dict(batch=2, seq=64, dtype="bfloat16", labelled_tokens=0)
    cpu = estimate_memory("llama-2-7b", "qst", device="cpu", **kwargs)["breakdown_bytes"]["activations"]
    cuda = estimate_memory("llama-2-7b", "qst", device="cuda", **kwargs)["breakdown_bytes"]["activations"]
    states = 2 * 64 * 33 * 4096
    assert cpu - cuda > states * 4  # at least the fp32 copies of h_0..h_32
    lora_cpu = estimate_memory("llama-2-7b", "lora", device="cpu", **kwargs)["breakdown_bytes"]["activations"]
    lora_cuda = estimate_memory("llama-2-7b", "lora", device="cuda", **kwargs)["breakdown_bytes"]["activations"]
    assert lora_cpu == lora_cuda
