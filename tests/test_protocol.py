"""`bench --protocol` (learning rates chosen on validation, seeds, paired CI, resume), early stopping,
qlora-gc, one compute dtype per run, and QST's wider side heads."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import eval.tasks
from eval.data import ClassificationExample
from eval.errors import UserInputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tiny_task(tiny_texts, validation: bool = True):
    lines = [(i % 2, line) for i, text in enumerate(tiny_texts[:2]) for line in text.splitlines() if len(line) > 20]
    examples = [ClassificationExample(text=line[:60], label=label) for label, line in lines]
    return eval.tasks.Task(name="tiny", kind="classification", labels=("textwrap", "string"),
                           train=examples[:12] + examples[-12:],
                           validation=examples[12:16] + examples[-16:-12] if validation else [],
                           test=examples[20:24] + examples[-24:-20], template="{text}\nfile:")


@pytest.fixture
def tiny_task(monkeypatch, tiny_texts):
    task = _tiny_task(tiny_texts)
    monkeypatch.setattr(eval.tasks, "load_task", lambda spec: task)
    return task


# --------------------------------------------------------------------------- early stopping


def _linear_run(scores, patience, max_steps=10):
    from eval.train import EarlyStopping, TrainConfig, train

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    batches = [{"x": torch.randn(4, 2), "y": torch.randn(4, 1)}]
    snapshots = {}
    calls = iter(scores)

    def eval_fn(m):
        snapshots[len(snapshots) + 1] = m.weight.detach().clone()
        return {"acc": next(calls)}

    result = train(model, batches, TrainConfig(max_steps=max_steps, lr=0.1, eval_every=1),
                   loss_fn=lambda m, b: torch.nn.functional.mse_loss(m(b["x"]), b["y"]), eval_fn=eval_fn,
                   early_stopping=EarlyStopping("acc", patience=patience))
    return model, result, snapshots


def test_early_stopping_stops_after_patience_and_keeps_the_best_parameters():
    model, result, snapshots = _linear_run([0.5, 0.7, 0.6, 0.7, 0.6, 0.9], patience=3)
    assert result.steps == 5 and result.stopped_early and result.best_step == 2  # 0.7 again is no improvement
    torch.testing.assert_close(model.weight.detach(), snapshots[2])
    assert not torch.equal(snapshots[2], snapshots[5])


def test_early_stopping_that_never_triggers_runs_every_step():
    model, result, snapshots = _linear_run([0.1 * i for i in range(1, 11)], patience=2)
    assert result.steps == 10 and not result.stopped_early and result.best_step == 10
    torch.testing.assert_close(model.weight.detach(), snapshots[10])


def test_early_stopping_needs_evaluations():
    from eval.train import EarlyStopping, TrainConfig, train

    model = torch.nn.Linear(2, 1)
    with pytest.raises(UserInputError, match="needs an eval_fn and TrainConfig.eval_every"):
        train(model, [{"x": torch.ones(1, 2)}], TrainConfig(max_steps=2), loss_fn=lambda m, b: m(b["x"]).sum(),
              eval_fn=lambda m: {"acc": 1.0}, early_stopping=EarlyStopping("acc"))
    with pytest.raises(UserInputError, match="patience must be a positive integer"):
        EarlyStopping("acc", patience=0)


# --------------------------------------------------------------------------- qlora-gc, dtype, heads


def test_qlora_gc_checkpoints_and_computes_the_same_gradients_as_qlora(tiny_llama_dir):
    from qst.baselines import build_tuning_model, labelled_positions_loss

    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    grads = {}
    for method in ("qlora", "qlora-gc"):
        torch.manual_seed(0)
        model, _ = build_tuning_model(method, model=str(tiny_llama_dir))
        model.train()
        labelled_positions_loss(model, batch).backward()
        grads[method] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert model.base_model.model.is_gradient_checkpointing == (method == "qlora-gc")
    assert grads["qlora"].keys() == grads["qlora-gc"].keys()
    for name in grads["qlora"]:
        torch.testing.assert_close(grads["qlora"][name], grads["qlora-gc"][name])


def test_every_method_of_a_run_computes_in_the_runs_dtype():
    from eval.bnb import compute_dtype_name
    from qst.benchmark import BenchSettings, measure_method

    settings = BenchSettings(arch="tiny-llama", methods="full,qlora,qst")
    assert settings.compute_dtype == compute_dtype_name("cpu")  # "auto": the 4-bit compute dtype, for all
    assert BenchSettings(arch="tiny-llama", dtype="float32").compute_dtype == "float32"
    for method in ("full", "qlora", "qst"):
        result = measure_method(method, arch="tiny-llama", batch=2, seq=8, steps=1, warmup=0, dtype="bfloat16")
        assert result["compute_dtype"] == "bfloat16", (method, result["linear_dtypes"])


def test_scaling_and_arch_runs_never_cache():
    from qst.benchmark import BenchSettings

    assert BenchSettings(arch="tiny-llama", feature_cache=True).feature_cache is False


def test_qst_side_attention_with_fewer_wider_heads(tiny_llama_dir, tmp_path):
    from qst import QSTConfig, QSTForCausalLM

    # tiny_llama: hidden 64, 4 heads. r = 2: side width 32; the backbone's count gives 8-wide heads.
    narrow = QSTForCausalLM.from_base(str(tiny_llama_dir), QSTConfig(r=2))
    assert (narrow.side.spec.num_heads, narrow.side.spec.head_dim) == (4, 8)
    wide = QSTForCausalLM.from_base(str(tiny_llama_dir), QSTConfig(r=2, side_head_dim=16))
    assert (wide.side.spec.num_heads, wide.side.spec.head_dim) == (2, 16)
    assert wide.side.blocks[0].attn.num_heads == 2
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(wide(input_ids=ids, labels=ids).loss)
    wide.save_pretrained(tmp_path / "side")
    again = QSTForCausalLM.from_pretrained(tmp_path / "side", base=str(tiny_llama_dir))
    assert again.side.spec.num_heads == 2
    with pytest.raises(UserInputError, match="side_head_dim 24 does not divide the side width 32"):
        QSTForCausalLM.from_base(str(tiny_llama_dir), QSTConfig(r=2, side_head_dim=24))
    with pytest.raises(UserInputError, match="side_init='pruned' copies the backbone's attention heads"):
        QSTConfig(side_init="pruned", side_head_dim=16)


# --------------------------------------------------------------------------- the protocol


def test_protocol_point_trains_with_early_stopping_and_scores_validation_and_test(tiny_task, tiny_llama_dir):
    from qst.protocol import measure_protocol_point

    result = measure_protocol_point("qst", lr=1e-2, seed=0, model=str(tiny_llama_dir), task="tiny", batch=4, seq=32,
                                    train_steps=4, eval_every=2, patience=1, eval_batch_size=4,
                                    baseline_options={"qst_options": {"r": 4}})
    assert [step for step, _ in result["validation_curve"]] == [2, 4][:len(result["validation_curve"])]
    assert result["best_step"] in (2, 4) and result["steps"] in (2, 4) and result["seed"] == 0
    assert result["validation_accuracy"] == max(acc for _, acc in result["validation_curve"])
    assert 0 <= result["test_accuracy"] <= 1


FAKE_POINT = """
import json, os

def point(method, lr, seed, **kwargs):
    log = os.environ["PROTOCOL_CALLS"]
    with open(log, "a") as f:
        f.write(json.dumps([method, lr, seed]) + "\\n")
    if os.environ.get("PROTOCOL_FAIL") == f"{method}:{lr:g}":
        raise RuntimeError("diverged on purpose")
    # validation peaks at lr 3e-3 for qst and 1e-3 for qlora; test depends on the seed
    best = {"qst": 3e-3, "qlora": 1e-3}[method]
    validation = 0.9 - abs(lr - best) * 10
    test = {"qst": 0.80, "qlora": 0.82}[method] + 0.01 * seed * (1 if method == "qst" else 2)
    return {"method": method, "lr": lr, "seed": seed, "validation_accuracy": validation, "test_accuracy": test,
            "best_step": 4, "validation_curve": [[4, validation]]}
"""


def _protocol(tmp_path, monkeypatch, fail=None, jobs=1, **overrides):
    from qst.protocol import ProtocolSettings, run_protocol

    worker = tmp_path / "fake_point.py"
    worker.write_text(textwrap.dedent(FAKE_POINT))
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PROTOCOL_CALLS", str(calls))
    if fail:
        monkeypatch.setenv("PROTOCOL_FAIL", fail)
    else:
        monkeypatch.delenv("PROTOCOL_FAIL", raising=False)
    settings = ProtocolSettings(**{"task": "tiny", "methods": "qlora,qst", "lrs": "1e-3,3e-3,1e-2", "seeds": 3,
                                   **overrides})
    before = len(calls.read_text().splitlines()) if calls.exists() else 0
    report = run_protocol(settings, tmp_path / "out", log=lambda line: None, point_target=f"{worker}:point", jobs=jobs)
    made = [json.loads(line) for line in calls.read_text().splitlines()[before:]]
    return report, made


@pytest.mark.parametrize("jobs", [1, 4])
def test_protocol_selects_on_validation_runs_seeds_and_pairs_them(tmp_path, monkeypatch, tiny_task, jobs):
    report, calls = _protocol(tmp_path, monkeypatch, jobs=jobs)
    if jobs > 1:  # every grid point before any seed run
        assert all(seed == 0 for _, _, seed in calls[:6]) and all(seed > 0 for _, _, seed in calls[6:])
    data = json.loads((tmp_path / "out" / "bench_protocol.json").read_text())
    assert len(calls) == 3 + 3 + 2 + 2  # two grids of three, two more seeds each
    qst, qlora = data["methods"]["qst"], data["methods"]["qlora"]
    assert qst["lr_grid"] == [1e-3, 3e-3, 1e-2] and qst["selected_lr"] == 3e-3 and qlora["selected_lr"] == 1e-3
    assert qst["validation_accuracy"]["0.003"] == pytest.approx(0.9)
    assert qst["test_accuracy"] == pytest.approx([0.80, 0.81, 0.82]) and qst["test_mean"] == pytest.approx(0.81)
    assert qst["test_ci95"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)  # t(0.975, 2) * sd / sqrt(n)
    paired = data["paired"]["qst-qlora"]
    assert paired["mean"] == pytest.approx(-0.03) and paired["seeds"] == [0, 1, 2]
    assert paired["ci95"] == pytest.approx(4.302653 * 0.01 / 3 ** 0.5, rel=1e-5)
    seed_runs = [c for c in calls if c[2] > 0]
    assert sorted(seed_runs) == sorted([["qlora", 1e-3, 1], ["qlora", 1e-3, 2], ["qst", 3e-3, 1], ["qst", 3e-3, 2]])
    markdown = (tmp_path / "out" / "bench_protocol.md").read_text()
    assert "chosen on the **validation** split" in markdown and "| qst-qlora |" in markdown
    assert (tmp_path / "out" / "bench_protocol.png").stat().st_size > 0


def test_protocol_resumes_without_losing_a_finished_point_and_refuses_other_settings(tmp_path, monkeypatch, tiny_task):
    _protocol(tmp_path, monkeypatch)
    points = tmp_path / "out" / "points"
    (points / "qst" / "lr0.01-seed0.json").unlink()  # as if killed before that point finished
    (points / "qst" / "lr0.003-seed2.json").unlink()
    _, calls = _protocol(tmp_path, monkeypatch)
    assert calls == [["qst", 1e-2, 0], ["qst", 3e-3, 2]]
    _, calls = _protocol(tmp_path, monkeypatch)
    assert calls == []
    with pytest.raises(UserInputError, match="other settings .*seeds: 3 there, 4 now"):
        _protocol(tmp_path, monkeypatch, seeds=4)


def test_a_failing_grid_point_is_reported_and_not_selected(tmp_path, monkeypatch, tiny_task):
    _, calls = _protocol(tmp_path, monkeypatch, fail="qst:0.003")
    data = json.loads((tmp_path / "out" / "bench_protocol.json").read_text())
    assert "diverged on purpose" in data["methods"]["qst"]["errors"]["0.003"]
    assert data["methods"]["qst"]["selected_lr"] in (1e-3, 1e-2)
    assert not (tmp_path / "out" / "points" / "qst" / "lr0.003-seed0.json").exists()  # retried on resume
    _, calls = _protocol(tmp_path, monkeypatch)
    assert calls[0] == ["qst", 3e-3, 0]


@pytest.mark.parametrize("extra, message", [
    (["--methods", "qst,nope"], "unknown tuning method 'nope'"),
    (["--lrs", ""], "--lrs is empty"),
    (["--lrs", "3e-3,1e-3"], "--lrs must increase strictly"),
    (["--lrs", "1e-3,x"], "--lrs must be comma-separated numbers"),
    (["--seeds", "0"], "seeds must be a positive integer"),
    (["--qst-side-init", "pruned", "--qst-head-dim", "16"], "side_init='pruned' copies the backbone's attention"),
])
def test_protocol_bad_input_is_one_line_before_any_training(tmp_path, capsys, tiny_task, extra, message):
    from scripts.cli import main

    out = tmp_path / "o"
    assert main(["bench", "--protocol", "--task", "tiny", "--out", str(out), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not (out / "points").exists()


def test_protocol_refuses_a_task_without_validation(tmp_path, capsys, monkeypatch, tiny_texts):
    from scripts.cli import main

    task = _tiny_task(tiny_texts, validation=False)
    monkeypatch.setattr(eval.tasks, "load_task", lambda spec: task)
    out = tmp_path / "o"
    assert main(["bench", "--protocol", "--task", "tiny", "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "task 'tiny' has no validation split" in errors[0]
    assert not (out / "points").exists()


def test_bench_takes_a_learning_rate_per_method_from_a_preset():
    from qst.benchmark import BenchSettings
    from scripts.bench import QUICK

    settings = BenchSettings(arch="tiny-llama", methods="qst,qlora", lr=1e-3, method_lrs={"qst": 1e-2})
    assert (settings.lr_of("qst"), settings.lr_of("qlora")) == (1e-2, 1e-3)
    with pytest.raises(UserInputError, match="lr of qst must be a positive finite number"):
        BenchSettings(arch="tiny-llama", method_lrs={"qst": 0})
    assert set(QUICK.get("method_lrs", {})) <= {"full", "lora", "qlora", "qlora-gc", "qst"}
    from qst.protocol import SCHEDULE, WARMUP_RATIO

    # --quick trains as the protocol that chose its rates did
    assert (QUICK["schedule"], QUICK["warmup_ratio"]) == (SCHEDULE, WARMUP_RATIO)
    with pytest.raises(UserInputError, match="schedule must be one of"):
        BenchSettings(arch="tiny-llama", schedule="bogus")
