"""Data parallel and resume across processes with `eval.train.train` (a functional check, no timing).

Run under two CPU processes (gloo); without ACCELERATE_USE_CPU=1 accelerate starts no CPU
process group and each process trains alone:

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 docs/recipes/data_parallel_check.py --out runs/dp-check

Six batches, `TrainConfig(max_steps=4, lr=0.05, warmup_ratio=0, checkpoint_every=2)`: each process
prints which batches it took, the losses and a checksum of the final weights; then a run stopped
at max_steps=2 is resumed to 4 from its checkpoint and must reproduce the uninterrupted losses
and weights. Rank 0 prints one line saying whether everything matched.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from eval.train import TrainConfig, train


class TinyRegression(nn.Module):
    """y = w.x, trained on fixed random batches; records which batches it saw."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(8, 1)
        self.seen: list[int] = []

    def forward(self, x, y, index):  # x: [batch, 8], y: [batch, 1], index: [batch]
        self.seen.extend(int(i) for i in index[:1])
        return type("Out", (), {"loss": nn.functional.mse_loss(self.linear(x), y)})()


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(4, 8, generator=g), "y": torch.randn(4, 1, generator=g), "index": torch.full((4,), i)}
            for i in range(6)]


def run(max_steps: int, out: Path) -> tuple[list[float], torch.Tensor, list[int]]:
    model = TinyRegression()
    config = TrainConfig(max_steps=max_steps, lr=0.05, warmup_ratio=0.0, checkpoint_every=2)
    result = train(model, batches(), config, out_dir=out, desc=f"dp {max_steps}")
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return result.losses, weights, model.seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/dp-check", help="folder for the runs' checkpoints (emptied first)")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    root = Path(args.out)
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    losses, weights, seen = run(4, root / "whole")
    run(2, root / "resumed")
    resumed_losses, resumed_weights, _ = run(4, root / "resumed")
    print(f"rank {rank}: batches {seen}, losses {[round(v, 6) for v in losses]}, weights sum {float(weights.sum()):.6f}")
    same = resumed_losses[-2:] == losses[-2:] and torch.equal(resumed_weights, weights)
    if rank == 0:
        print(f"resumed run reproduces the uninterrupted one: {same}")


if __name__ == "__main__":
    main()
