"""The tuning baselines (only their parameters train) and `slimtune bench` (schema, failures, bad input)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from eval.errors import UserInputError
from eval.measure import count_parameters
from qst.baselines import METHODS, build_tuning_model, check_methods

# tiny_llama_dir: hidden 64, FFN 128, 2 layers, 4 heads, 2 key/value heads (k/v width 32).
# LoRA r=16 on q, k, v, o, gate, up, down: 16 * ((64+64) + 2 * (64+32) + (64+64) + 3 * (64+128)) per layer.
EXPECTED_TRAINABLE = {
    "lora": 2 * 16 * (128 + 2 * 96 + 128 + 3 * 192),
    "qlora": 2 * 16 * (128 + 2 * 96 + 128 + 3 * 192),
    "qlora-gc": 2 * 16 * (128 + 2 * 96 + 128 + 3 * 192),
    "adapter": 2 * 2 * (64 * 16 + 16 + 16 * 64 + 64),  # 2 adapters per layer, bottleneck 16
    "prefix": 16 * 2 * 2 * 32,  # 16 virtual tokens x layers x (key, value) x k/v width
    "prompt": 16 * 64,  # 16 virtual token embeddings
    "bitfit": 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64),  # one bias per output of every decoder Linear
    "qst": 3953,  # the side network (counted by hand in test_memory_estimate's formula)
    "lst": 3953,
}
TRAINABLE_NAME = {
    "lora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "qlora": lambda n: ".lora_A." in n or ".lora_B." in n,
    "qlora-gc": lambda n: ".lora_A." in n or ".lora_B." in n,
    "adapter": lambda n: ".houlsby_adapter." in n,
    "prefix": lambda n: "prompt_encoder" in n,
    "prompt": lambda n: "prompt_encoder" in n,
    "bitfit": lambda n: n.endswith(".bias"),
    "qst": lambda n: n.startswith("side."),
    "lst": lambda n: n.startswith("side."),
}


@pytest.mark.parametrize("method", [m for m in METHODS if m != "full"])
def test_only_the_methods_own_parameters_train(tiny_llama_dir, method):
    model, tokenizer = build_tuning_model(method, model=str(tiny_llama_dir))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(TRAINABLE_NAME[method](n) for n in trainable), trainable
    assert count_parameters(model, trainable_only=True) == EXPECTED_TRAINABLE[method]
    # A training step moves only those parameters.
    ids = torch.tensor(tokenizer(["def f(x):\n    return x"])["input_ids"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad and p.dtype.is_floating_point}
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_full_trains_everything(tiny_llama_dir):
    model, _ = build_tuning_model("full", model=str(tiny_llama_dir))
    assert count_parameters(model, trainable_only=True) == count_parameters(model) > 0


@pytest.mark.parametrize("method", ["lora", "adapter", "bitfit", "prompt"])
def test_zero_initialised_methods_start_at_the_backbone(tiny_llama_dir, tiny_tokenizer, method):
    """LoRA (B = 0), adapters (up = 0) and BitFit's added biases (0) leave the output unchanged at
    step 0; prompt tuning's logits are trimmed back to the input's length."""
    from eval.models import load_causal_lm

    base, _ = load_causal_lm(str(tiny_llama_dir))
    ids = torch.tensor(tiny_tokenizer(["import os\nprint(os.sep)"])["input_ids"])
    with torch.no_grad():
        expected = base(input_ids=ids).logits
        model, _ = build_tuning_model(method, model=str(tiny_llama_dir))
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert got.shape == expected.shape
    if method != "prompt":
        torch.testing.assert_close(got, expected)


def test_unknown_method_is_a_clear_error(capsys):
    with pytest.raises(UserInputError, match="unknown tuning method 'dora'.*full, lora"):
        check_methods("lora,dora")
    assert check_methods("all") == list(METHODS)
    assert check_methods("qst, lora,qst") == ["qst", "lora"]

    from scripts.cli import main

    assert main(["bench", "--arch", "tiny-llama", "--methods", "qst,dora", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown tuning method 'dora'" in err and "\n" not in err


def test_a_batch_that_cannot_fit_is_refused_with_the_estimate(tmp_path):
    from qst.benchmark import BenchSettings, run_bench

    settings = BenchSettings(arch="llama-2-70b", methods="full", batch=64, seq=4096)
    with pytest.raises(UserInputError, match=r"will not fit.*full ~\d+\.\d+ GB"):
        run_bench(settings, tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()  # refused before anything ran


FAILING_WORKER = """
import eval.train
from qst.benchmark import measure_method


class StepClock:
    \"\"\"eval.train's clock, faked: optimizer step i (from 0) takes i + 1 seconds, so the
    step and train times below are exact, whatever the machine's speed.\"\"\"

    def __init__(self):
        self.calls, self.now = 0, 0.0

    def __call__(self, device):
        if self.calls % 2:  # odd calls end a step
            self.now += self.calls // 2 + 1
        self.calls += 1
        return self.now


def measure(method, **kwargs):
    if method == "lora":
        raise RuntimeError("lora exploded on purpose")
    eval.train._now = StepClock()
    return measure_method(method, **kwargs)
"""


def test_bench_writes_the_schema_and_reports_a_failing_method(tmp_path):
    """Two methods on a tiny random model, each in its own process; one raises in its subprocess."""
    from qst.benchmark import BenchSettings, run_bench

    worker = tmp_path / "failing_worker.py"
    worker.write_text(textwrap.dedent(FAILING_WORKER))
    settings = BenchSettings(arch="tiny-llama-gqa", methods="full,lora", batch=2, seq=16, steps=1, warmup=1)
    lines = []
    report = run_bench(settings, tmp_path / "out", log=lines.append, method_target=f"{worker}:measure")

    data = json.loads((tmp_path / "out" / "bench_tuning.json").read_text())
    assert {"model", "device", "batch", "seq", "methods", "floor"} <= set(data)
    assert (data["model"], data["device"], data["batch"], data["seq"]) == ("tiny-llama-gqa", "cpu", 2, 16)
    assert list(data["methods"]) == ["full", "lora"]
    full = data["methods"]["full"]
    assert set(full) == {"trainable_params", "trainable_share", "peak_memory_bytes", "step_time_s",
                         "tokens_per_s", "compute_dtype", "train_time_s", "feature_cache", "final_loss", "accuracy",
                         "accuracy_se", "examples_scored"}
    # Steps of 1 s (warm-up) and 2 s (timed): the step time is the timed step's only, the train
    # time every step's, tokens/s the batch's tokens over the step time.
    assert full["step_time_s"] == 2.0 and full["train_time_s"] == 3.0 and full["tokens_per_s"] == 2 * 16 / 2.0
    assert full["feature_cache"] is None
    assert full["trainable_share"] == 1.0 and full["trainable_params"] > 0
    assert full["peak_memory_bytes"] > 0
    assert full["accuracy"] is None  # random weights: nothing to score
    assert set(data["floor"]) >= {"forward_time_s", "forward_peak_memory_bytes"}
    assert data["floor"]["forward_time_s"] > 0

    lora = data["methods"]["lora"]
    assert "lora exploded on purpose" in lora["error"] and lora["peak_memory_bytes"] is None
    markdown = (tmp_path / "out" / "bench_tuning.md").read_text()
    assert "| full |" in markdown and "lora exploded on purpose" in markdown
    assert (tmp_path / "out" / "bench_tuning.png").stat().st_size > 0
    assert report["data"]["methods"] == data["methods"]
    assert any("[2/2] lora failed" in line for line in lines)


def test_4bit_methods_score_in_eval_mode_on_widths_bnb_cannot_repack(tmp_path, tiny_tokenizer):
    """ref-lm's MLP is 688 wide: bitsandbytes' CPU inference kernel cannot repack such layers, so
    scoring a trained QLoRA model (or timing the floor) must take the generic 4-bit path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    model, _ = build_tuning_model("qlora", model=str(tmp_path))
    model.eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


@pytest.mark.parametrize("method", ["full", "lora", "prefix", "prompt"])
def test_every_method_runs_its_lm_head_only_at_labelled_positions(tiny_llama_dir, method):
    """The bench's loss for the baselines: the models' own loss, with [n, vocab] logits (n = labelled tokens)."""
    from qst.baselines import labelled_positions_loss

    model, _ = build_tuning_model(method, model=str(tiny_llama_dir))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :6] = -100  # a prompt, then the answer
    labels[1, -2:] = -100  # a shorter answer
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    head = (model.peft_model if method == "prompt" else model).get_output_embeddings()
    rows = []
    handle = head.register_forward_hook(lambda m, a, out: rows.append(out.shape))
    with torch.no_grad():
        ours = labelled_positions_loss(model, batch)
        handle.remove()
        theirs = model(**batch).loss
    n = int((labels[:, 1:] != -100).sum())
    assert rows == [(n, model.config.vocab_size)]
    torch.testing.assert_close(ours, theirs)


def test_forward_floor_builds_no_kv_cache(monkeypatch):
    """The floor times what QST's backbone pass does: hidden states, no KV cache."""
    import qst.baselines
    from qst.benchmark import measure_forward_floor

    seen = []
    real = qst.baselines.load_backbone

    def load(*args, **kwargs):
        model, tokenizer = real(*args, **kwargs)
        model.base_model.register_forward_hook(
            lambda m, a, kw, out: seen.append((kw.get("use_cache"), out.past_key_values)), with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(qst.baselines, "load_backbone", load)
    result = measure_forward_floor(arch="tiny-llama", batch=2, seq=8, steps=1, warmup=0)
    assert result["forward_time_s"] > 0
    assert seen and all(use_cache is False and cache is None for use_cache, cache in seen)


def test_bench_report_names_the_machine():
    from qst.benchmark import format_markdown

    qst = {"trainable_params": 10, "trainable_share": 0.1, "peak_memory_bytes": 2e6, "step_time_s": 0.5,
           "tokens_per_s": 16.0, "final_loss": 1.0, "accuracy": None}
    # A machine unlike any real one, so the line can only come from this record.
    machine = {"cpu_model": "Test CPU 9000", "cpu_vector_flags": ["avx2", "fma"], "torch_cpu_capability": "AVX2",
               "cpu_cores": 3, "torch_threads": 7, "bnb_4bit_path": "4-bit path X", "four_bit_compute_dtype": "float32",
               "gpu": "Test GPU", "torch": "9.9", "python": "3.99"}
    data = {"model": "m", "device": "cpu", "task": None, "batch": 1, "seq": 8, "methods": {"qst": qst},
            "floor": {"forward_time_s": 0.1}, "estimates": {"qst": {"total_bytes": 3e6}},
            "settings": {"lr": 1e-3, "warmup": 1, "steps": 1, "train_steps": 0}, "machine": machine}
    markdown = format_markdown(data)
    assert ("Machine: CPU Test CPU 9000 (avx2, fma; torch kernels AVX2); 3 cores, 7 torch threads; GPU Test GPU; "
            "4-bit path X; 4-bit layers compute in float32; torch 9.9, Python 3.99.") in markdown
    assert "| qst | 10 | 10 | 2 | 3 | — | 0.5 | — | 5 | 16 |" in markdown  # step / floor = 0.5 / 0.1
    assert "Machine: not recorded." in format_markdown({**data, "machine": None})


def test_qst_attaches_its_feature_cache_only_after_the_timed_steps(tiny_llama_dir):
    """Two training batches cycled for 8 steps, steps 0-1 timed: the timed steps neither read nor write
    the cache (even though step 2 repeats batch 0); steps 2-3 write it, steps 4-7 read it."""
    from qst.benchmark import measure_method

    result = measure_method("qst", model=tiny_llama_dir, task="def-kind", batch=2, seq=32, steps=1, warmup=1,
                            train_steps=8, train_examples=4, eval_examples=6, feature_cache=True)
    cache = result["feature_cache"]
    assert (cache["timed_hits"], cache["timed_writes"]) == (0, 0)
    assert (cache["writes"], cache["hits"]) == (2, 4)
    assert cache["cached_step_s"] > 0 and cache["uncached_step_s"] == result["step_time_s"]
    assert result["examples_scored"] == 6
    # k of 6 right: the binomial standard error sqrt(p (1 - p) / 6), worked out by hand
    se_of_k_right = {0: 0.0, 1: 0.15214515, 2: 0.19245009, 3: 0.20412415, 4: 0.19245009, 5: 0.15214515, 6: 0.0}
    k = round(result["accuracy"] * 6)
    assert result["accuracy"] == pytest.approx(k / 6)
    assert result["accuracy_se"] == pytest.approx(se_of_k_right[k], abs=1e-8)


def test_standard_error_by_hand():
    from qst.benchmark import _standard_error

    assert _standard_error(0.5, 100) == pytest.approx(0.05)
    assert _standard_error(0.9, 400) == pytest.approx(0.015)
    assert _standard_error(None, 10) is None and _standard_error(0.5, 0) is None


def test_base_rates_are_the_most_frequent_answer_and_guessing():
    from collections import Counter

    from eval.tasks import load_task
    from qst.benchmark import _base_rates

    task = load_task("def-kind")
    rates = _base_rates("def-kind", 40)
    counts = Counter(task.target(e) for e in task.test[:40])
    assert rates["majority_rate"] == max(counts.values()) / 40
    assert rates["chance_rate"] == pytest.approx(1 / len(task.labels))
    assert _base_rates(None, 40) == {"majority_rate": None, "chance_rate": None}


def test_bench_report_shows_accuracy_with_its_error_and_the_majority_rate():
    from eval.measure import machine_info
    from qst.benchmark import format_markdown

    def entry(accuracy, cache=None):
        return {"trainable_params": 10, "trainable_share": 0.1, "peak_memory_bytes": 2e6, "step_time_s": 0.5,
                "tokens_per_s": 16.0, "train_time_s": 5.0, "feature_cache": cache, "final_loss": 1.0,
                "accuracy": accuracy, "accuracy_se": 0.03, "examples_scored": 200}

    data = {"model": "m", "device": "cpu", "task": "def-kind", "batch": 1, "seq": 8,
            "methods": {"qlora": entry(0.80), "qst": entry(0.75, {"timed_hits": 0, "timed_writes": 0, "hits": 30,
                                                                   "writes": 10, "cached_step_s": 0.1,
                                                                   "uncached_step_s": 0.5,
                                                                   "cached_over_uncached": 0.2})},
            "floor": {"forward_time_s": 0.1}, "estimates": {"qlora": {"total_bytes": 3e6}, "qst": {"total_bytes": 3e6}},
            "majority_rate": 0.433, "chance_rate": 1 / 3,
            "settings": {"lr": 1e-3, "warmup": 1, "steps": 1, "train_steps": 40}, "machine": machine_info()}
    markdown = format_markdown(data)
    assert "| 80.0 ± 3.0 |" in markdown and "| 75.0 ± 3.0 |" in markdown
    assert "| 0.1 | 0.2 |" in markdown and "qst 0 / 0" in markdown and "| -5 |" in markdown
    assert "majority class of those examples is 43.3 %" in markdown


def test_bench_tunes_a_pruned_model_named_by_its_spec(tmp_path, pruned_dir, capsys):
    """`--model pruned:DIR` (and the plain directory) is the backbone; each fresh process imports
    the package that registered its model type. A QST side network is refused before any process."""
    from qst.benchmark import BenchSettings
    from scripts.cli import main

    for spec in (f"pruned:{pruned_dir}", str(pruned_dir)):
        assert BenchSettings(model=spec, methods="lora").model_package == "pruning"
    out = tmp_path / "out"
    assert main(["bench", "--model", f"pruned:{pruned_dir}", "--methods", "lora,qst", "--task", "def-kind",
                 "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "1", "--train-steps", "2",
                 "--eval-examples", "4", "--no-fit-check", "--out", str(out)]) == 0
    data = json.loads((out / "bench_tuning.json").read_text())
    assert data["model"] == str(pruned_dir)
    for method in ("lora", "qst"):
        assert not data["methods"][method].get("error"), data["methods"][method]
        assert data["methods"][method]["examples_scored"] == 4
    assert not data["floor"].get("error")


def test_bench_passes_qst_r_to_the_side_network_and_the_estimate():
    from qst.benchmark import BenchSettings, _estimate

    settings = BenchSettings(arch="tiny-llama", methods="qst", qst_r=4)
    assert settings.baseline_options() == {"qst_options": {"r": 4}}
    assert BenchSettings(arch="tiny-llama", methods="qst").baseline_options() == {}
    wider = _estimate(settings, "qst")["breakdown_bytes"]
    narrower = _estimate(BenchSettings(arch="tiny-llama", methods="qst", qst_r=8), "qst")["breakdown_bytes"]
    assert sum(wider.values()) > sum(narrower.values())
    with pytest.raises(UserInputError, match="qst_r must be a positive integer"):
        BenchSettings(arch="tiny-llama", qst_r=0)
