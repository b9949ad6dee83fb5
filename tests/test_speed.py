"""eval.speed: every model warmed up before any timing, then timed in alternating rounds (no timing asserted)."""

import pytest
import torch
from torch import nn

from eval.errors import UserInputError
from eval.speed import side_by_side_throughput


class Recorder(nn.Module):
    def __init__(self, name: str, log: list):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, input_ids):
        self.log.append((self.name, torch.is_inference_mode_enabled(), tuple(input_ids.shape)))
        return input_ids.float().sum()


def test_warm_up_first_then_alternating_rounds_on_the_same_inputs():
    log = []
    models = {"dense": Recorder("dense", log), "pruned": Recorder("pruned", log)}
    ids = torch.zeros(2, 8, dtype=torch.long)
    speed = side_by_side_throughput(models, {"input_ids": ids}, items=ids.numel(), rounds=3, repeats=2, warmup=2)
    names = [name for name, _, _ in log]
    round_ = ["dense"] * 3 + ["pruned"] * 3  # one untimed call, then `repeats` timed ones
    assert names == ["dense", "dense", "pruned", "pruned"] + round_ * 3
    assert all(inference and shape == (2, 8) for _, inference, shape in log)
    assert set(speed) == {"dense", "pruned"} and all(v > 0 for v in speed.values())


def test_bad_counts_are_refused():
    model = {"m": Recorder("m", [])}
    with pytest.raises(UserInputError, match="rounds must be a positive integer"):
        side_by_side_throughput(model, {"input_ids": torch.zeros(1, 1, dtype=torch.long)}, items=1, rounds=0)
