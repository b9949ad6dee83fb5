"""The shared training loop: schedule, accumulation, evaluation, and bit-exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from eval.errors import UserInputError
from eval.train import TrainConfig, lr_multiplier, train


class TinyRegressor(nn.Module):
    """Frozen input layer, dropout (so resume must restore the RNG), trainable head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(4, 8)
        self.frozen.requires_grad_(False)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(8, 1)

    def forward(self, x, y=None):
        pred = self.head(self.dropout(torch.tanh(self.frozen(x)))).squeeze(-1)
        loss = None if y is None else ((pred - y) ** 2).mean()
        return {"loss": loss, "logits": pred}


class PairDataset(Dataset):
    def __init__(self, n=12):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 4, generator=g)
        self.y = self.x.sum(-1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def make_batches(n=6):
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(n, 3, 4, generator=g)
    return [{"x": x, "y": x.sum(-1)} for x in xs]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "kwargs",
    [{"lr": 0}, {"max_steps": 0}, {"schedule": "step"}, {"grad_accum": 0}, {"warmup_ratio": 1.0},
     {"mixed_precision": "fp16"}, {"max_grad_norm": -1.0}, {"eval_every": 0}, {"betas": (0.9, 1.5)}],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(UserInputError):
        TrainConfig(**kwargs)


def test_schedules_warm_up_then_decay():
    cfg = TrainConfig(max_steps=10, warmup_ratio=0.2, schedule="linear")
    assert [lr_multiplier(s, cfg) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(9, cfg) == pytest.approx(1 - 7 / 8)
    cos = TrainConfig(max_steps=10, warmup_ratio=0.0, schedule="cosine")
    assert lr_multiplier(0, cos) == 1.0
    assert lr_multiplier(5, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(lr_multiplier(s, TrainConfig(max_steps=10, warmup_ratio=0.0)) == 1.0 for s in range(10))


def test_trains_only_trainable_parameters_and_evaluates():
    model = TinyRegressor().eval()
    before = weights(model)
    seen_modes = []

    def eval_fn(m):
        seen_modes.append(m.training)
        return {"mse": torch.tensor(1.5)}

    result = train(model, make_batches(), TrainConfig(max_steps=30, lr=0.05, warmup_ratio=0.1, eval_every=10),
                   eval_fn=eval_fn)
    after = weights(model)
    assert result.steps == 30 and len(result.losses) == 30 and len(result.step_times) == 30
    assert torch.equal(before["frozen.weight"], after["frozen.weight"])
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert [e["step"] for e in result.eval_history] == [10, 20, 30]
    assert result.eval_history[0]["mse"] == 1.5 and seen_modes == [False] * 3
    assert not model.training  # back in the mode it came in


def test_custom_loss_fn_and_param_groups():
    model = TinyRegressor()
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return (m(batch["x"])["logits"] - batch["y"]).abs().mean()

    groups = [{"params": [model.head.weight], "lr": 0.1}, {"params": [model.head.bias], "lr": 0.0 + 1e-9}]
    bias = model.head.bias.detach().clone()
    result = train(model, make_batches(), TrainConfig(max_steps=4, grad_accum=3, warmup_ratio=0),
                   loss_fn=loss_fn, param_groups=groups, eval_fn=lambda m: {"n": 1})
    assert len(calls) == 12 and result.steps == 4
    assert result.eval_history == [{"step": 4, "n": 1}]  # no eval_every: once, at the end
    assert json.loads(json.dumps(result.to_dict()))["steps"] == 4
    assert torch.allclose(model.head.bias, bias, atol=1e-6)


def test_bad_inputs_are_user_errors():
    model = TinyRegressor()
    with pytest.raises(UserInputError, match="no .loss"):
        train(model, [{"x": torch.randn(2, 4)}], TrainConfig(max_steps=1))
    with pytest.raises(UserInputError, match="empty"):
        train(model, [], TrainConfig(max_steps=1))
    model.requires_grad_(False)
    with pytest.raises(UserInputError, match="nothing to train"):
        train(model, make_batches(), TrainConfig(max_steps=1))


class Interrupt(Exception):
    pass


def _shuffled_loader():
    return DataLoader(PairDataset(), batch_size=4, shuffle=True)


@pytest.mark.parametrize("data", ["list", "shuffled_loader"])
def test_resume_after_interruption_is_bit_exact(tmp_path, data):
    batches = make_batches(5) if data == "list" else _shuffled_loader()
    cfg = TrainConfig(max_steps=9, lr=0.05, warmup_ratio=0.2, schedule="cosine", grad_accum=2,
                      eval_every=1, checkpoint_every=2)

    reference = TinyRegressor()
    full = train(reference, batches, cfg, eval_fn=lambda m: {"w": m.head.weight.sum()})

    def failing_eval(m):
        if failing_eval.calls == 7:  # at step 7; the last checkpoint is step 6
            raise Interrupt
        failing_eval.calls += 1
        return {"w": m.head.weight.sum()}

    failing_eval.calls = 0
    with pytest.raises(Interrupt):
        train(TinyRegressor(), batches, cfg, eval_fn=failing_eval, out_dir=tmp_path)
    resumed_model = TinyRegressor()
    resumed = train(resumed_model, batches, cfg, eval_fn=lambda m: {"w": m.head.weight.sum()}, out_dir=tmp_path)

    assert resumed.resumed_from == 6
    assert resumed.losses == full.losses  # exact float equality: same trajectory
    assert resumed.eval_history == full.eval_history
    for name, value in weights(reference).items():
        assert torch.equal(value, weights(resumed_model)[name]), name
    # a finished run resumes to its end without training
    again = train(TinyRegressor(), batches, cfg, out_dir=tmp_path)
    assert again.resumed_from == 9 and again.losses == full.losses


def test_extending_max_steps_continues_the_same_run(tmp_path):
    cfg = TrainConfig(max_steps=7, lr=0.05, warmup_ratio=0.0, checkpoint_every=3)
    reference = TinyRegressor()
    full = train(reference, make_batches(4), cfg)
    train(TinyRegressor(), make_batches(4), TrainConfig(max_steps=4, lr=0.05, warmup_ratio=0.0,
                                                      checkpoint_every=3), out_dir=tmp_path)
    model = TinyRegressor()
    longer = train(model, make_batches(4), cfg, out_dir=tmp_path)
    assert longer.resumed_from == 4 and longer.losses == full.losses
    assert torch.equal(model.head.weight, reference.head.weight)


def test_checkpoint_is_safetensors_and_json_and_guards_config(tmp_path):
    train(TinyRegressor(), make_batches(), TrainConfig(max_steps=2, checkpoint_every=1), out_dir=tmp_path)
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["optimizer.json", "optimizer.safetensors", "scheduler.json", "state.json",
                     "trainable.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    with pytest.raises(UserInputError, match="different training config"):
        train(TinyRegressor(), make_batches(), TrainConfig(max_steps=3, lr=1e-3), out_dir=tmp_path)


def test_hf_causal_lm_with_default_loss(tiny_llama_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.requires_grad_(False)
    model.lm_head.requires_grad_(True)  # untied in the tiny model: the only trainable part
    embed = model.model.embed_tokens.weight.detach().clone()
    ids = tiny_tokenizer("def f(x):\n    return x + 1\n" * 4, return_tensors="pt").input_ids[:, :32]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    result = train(model, [batch], TrainConfig(max_steps=5, lr=1e-2, warmup_ratio=0))
    assert result.losses[-1] < result.losses[0]
    assert torch.equal(model.model.embed_tokens.weight, embed)


def test_data_parallel_shards_are_disjoint_equal_and_resumable():
    """Process r of N takes batches r, r+N, ... of a pass cut to a multiple of N; the position
    saved by the main process resumes every process (the loop's own sharding, no processes)."""
    import itertools
    from types import SimpleNamespace

    from eval.train import _micro_batches

    batches = [{"i": i} for i in range(5)]  # 5 batches, 2 processes: the 5th is dropped

    def stream(rank, state):
        return _micro_batches(batches, state, 0, SimpleNamespace(process_index=rank, num_processes=2))

    fresh = [{"step": 0, "epoch": 0, "batch_index": 0} for _ in range(2)]
    taken = [[b["i"] for b in itertools.islice(stream(r, fresh[r]), 5)] for r in range(2)]
    assert taken == [[0, 2, 0, 2, 0], [1, 3, 1, 3, 1]]
    saved = {"step": 0, "epoch": 1, "batch_index": 1}  # after 3 micro-steps, as on every process
    resumed = [[b["i"] for b in itertools.islice(stream(r, dict(saved)), 2)] for r in range(2)]
    assert resumed == [t[3:5] for t in taken]
    with pytest.raises(UserInputError, match="too few"):
        next(_micro_batches(batches[:1], dict(saved), 0, SimpleNamespace(process_index=0, num_processes=2)))
