"""DISP training through the shared loop, LoRA recovery, lm-eval, and the `slimtune prune` command."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pruning import (
    DispConfig,
    block_params,
    load_pruned,
    prune_model,
    recover_with_lora,
    train_disp,
)
from scripts.cli import main


@pytest.fixture(scope="module")
def llama(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def _blocks(model, n=4, t=16):
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("estimator", ["reinmax", "gumbel"])
def test_train_disp_trains_only_the_hypernetwork_and_exports_on_budget(llama, estimator):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    result = train_disp(llama, _blocks(llama), DispConfig(kept=0.5, steps=6, estimator=estimator, lr=1e-2), batch_size=2)
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())  # the LM stays frozen
    assert all(p.requires_grad for p in llama.parameters())  # and is handed back as it came
    assert len(result.losses) == len(result.ce) == len(result.kept_ratio) == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))
    pruned = prune_model(llama, result.plan)
    assert abs(block_params(pruned) / block_params(llama) - 0.5) <= 0.01 * 0.5
    assert result.export_kept_ratio == pytest.approx(block_params(pruned) / block_params(llama))


def test_train_disp_kept_one_gives_back_the_dense_model(llama):
    result = train_disp(llama, _blocks(llama), DispConfig(kept=1.0, steps=2), batch_size=2)
    pruned = prune_model(llama, result.plan)
    ids = _blocks(llama, 2, 10)
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, llama(input_ids=ids).logits)


def test_lora_recovery_and_lm_eval_bridge(llama, tiny_llama_dir):
    from lm_eval.api.instance import Instance

    from eval.lm_eval_bridge import make_lm

    result = train_disp(llama, _blocks(llama), DispConfig(kept=0.6, steps=2), batch_size=2)
    pruned = prune_model(llama, result.plan)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    recovered = recover_with_lora(pruned, _blocks(llama), steps=2, batch_size=2)
    assert {k: v.shape for k, v in recovered.state_dict().items()} == shapes  # merged: same pruned shapes
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    lm = make_lm(recovered, tokenizer, batch_size=2)
    request = Instance(request_type="loglikelihood", doc={}, arguments=("def f(x):", " return x"), idx=0)
    (loglik, _), = lm.loglikelihood([request])
    assert loglik < 0 and torch.isfinite(torch.tensor(loglik))


@pytest.fixture(scope="module")
def calib_dir(tmp_path_factory, tiny_texts):
    d = tmp_path_factory.mktemp("calib")
    for i, text in enumerate(tiny_texts):
        (d / f"doc{i}.txt").write_text(text)
    return d


def _args(model_dir, calib, out, *extra):
    return ["prune", "--model", str(model_dir), "--calib", str(calib), "--block-size", "32", "--calib-blocks", "6",
            "--eval-blocks", "3", "--batch-size", "2", "--out", str(out), *extra]


REPORT_KEYS = {"params_before", "params_after", "block_params_before", "block_params_after", "ppl_before", "ppl_after",
               "tokens_per_s_before", "tokens_per_s_after", "prune_time_s"}


def test_cli_disp_with_recovery_writes_model_report_and_plot(tiny_llama_dir, calib_dir, tmp_path):
    out = tmp_path / "disp"
    assert main(_args(tiny_llama_dir, calib_dir, out, "--method", "disp", "--kept", "0.6", "--steps", "3",
                      "--recover-steps", "2")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["block_params_after"] < report["block_params_before"]
    assert report["params_after"] < report["params_before"]
    assert abs(report["kept_ratio"] - 0.6) <= 0.006
    assert report["ppl_after_recovery"] > 1 and report["hypernet_train_time_s"] > 0
    assert (out / "prune_report.md").is_file() and (out / "kept_width.png").stat().st_size > 0
    assert (out / "hypernetwork.safetensors").is_file()
    assert report["estimator"] == report["config"]["estimator"] == "gumbel"  # the command's default
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no checkpoint or temp left behind
    model = load_pruned(out / "model")
    assert block_params(model) == report["block_params_after"]
    card = (out / "model" / "README.md").read_text()  # the model card carries what was measured
    assert f"perplexity after: {report['ppl_after']:.6g}" in card
    assert f"perplexity after 2 LoRA recovery steps: {report['ppl_after_recovery']:.6g}" in card


@pytest.mark.parametrize("method", ["wanda-sp", "slicegpt"])
def test_cli_baselines(method, tiny_llama_dir, calib_dir, tmp_path):
    out = tmp_path / method
    assert main(_args(tiny_llama_dir, calib_dir, out, "--method", method, "--kept", "0.5")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["method"] == method
    assert load_pruned(out / "model").config.slimtune_pruning["method"] == method


def test_cli_bad_input_is_one_clear_error_and_writes_nothing(tiny_llama_dir, calib_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_llama_dir, calib_dir, out, "--kept", "1.5")) == 2
    assert "kept must be a fraction in (0, 1]" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("x = 1")
    assert main(_args(tiny_llama_dir, short, out, "--eval", str(short))) == 2
    assert "shorter than one block" in capsys.readouterr().err
    assert not out.exists()


def test_settings_name_their_fields_and_the_cli_names_its_flags(tiny_llama_dir, calib_dir, tmp_path, capsys):
    from eval.errors import UserInputError
    from pruning.pipeline import PruneSettings, run_prune

    with pytest.raises(UserInputError, match=r"^block_size must be a positive integer, got 0$"):
        PruneSettings(model="ref-lm", block_size=0)
    with pytest.raises(UserInputError, match=r"^calib \(a text file or folder\) is required"):
        run_prune(PruneSettings(model=str(tiny_llama_dir)), tmp_path / "out")
    assert main(_args(tiny_llama_dir, calib_dir, tmp_path / "out", "--block-size", "0")) == 2
    assert "--block-size must be a positive integer, got 0" in capsys.readouterr().err
    argv = [a for a in _args(tiny_llama_dir, calib_dir, tmp_path / "out") if a not in ("--calib", str(calib_dir))]
    assert main(argv) == 2
    assert "--calib (a text file or folder) is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_unsupported_architecture(tmp_path, tiny_tokenizer, calib_dir, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    assert main(_args(model_dir, calib_dir, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "does not support model type 'gpt2'" in err and "llama, mistral, opt, phi3, qwen2, qwen3" in err
    assert not (tmp_path / "out").exists()
