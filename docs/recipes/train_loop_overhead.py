"""`eval.train.train` against a plain PyTorch loop: median step time, two alternating rounds.

Llama, 4 layers, hidden 256, vocabulary 2048 (about 4.2 M parameters), batch 4 x 128 tokens,
AdamW, gradient clipping at 1.0, one thread; median over steps 4-25. The table of
docs/RESULTS.md ("eval.train.train overhead against a plain PyTorch loop").

    python docs/recipes/train_loop_overhead.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from eval.train import TrainConfig, train

STEPS = 25
VOCAB = 2048


def new_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256))


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(8):
        ids = torch.randint(0, VOCAB, (4, 128), generator=g)  # [batch, seq]
        out.append({"input_ids": ids, "labels": ids})
    return out


def plain_loop(data: list[dict]) -> float:
    model = new_model().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    times = []
    for step in range(STEPS):
        start = time.perf_counter()
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def shared_loop(data: list[dict]) -> float:
    result = train(new_model(), data, TrainConfig(max_steps=STEPS, lr=2e-4), desc="eval.train")
    return statistics.median(result.step_times[3:])


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    torch.set_num_threads(1)
    data = batches()
    results = {"plain": [], "eval.train": []}
    for _ in range(2):  # alternating rounds
        results["plain"].append(plain_loop(data))
        results["eval.train"].append(shared_loop(data))
    for name, times in results.items():
        print(name, [f"{t * 1000:.1f} ms" for t in times])


if __name__ == "__main__":
    main()
