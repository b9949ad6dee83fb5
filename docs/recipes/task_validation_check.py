"""Score a tuning method or the untuned model on a task's VALIDATION split (used while designing tasks).

    python docs/recipes/task_validation_check.py --task signature-match --method lora --train-steps 320 \
        --batch 8 --seq 256 --lr 2e-3
    python docs/recipes/task_validation_check.py --task next-line --method none   # dense ref-lm, zero-shot

Trains exactly as `slimtune bench` does (`qst.benchmark.measure_method`: same batches, seed,
loss and optimizer) but scores the validation split, so that a task's design is never chosen on
its test split. Prints one JSON line: accuracy, its standard error, the majority and chance rates
of the validation examples.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import eval.tasks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--method", default="lora", help="a bench method (lora, qlora, qst, ...) or 'none' (untuned)")
    parser.add_argument("--model", default="ref-lm")
    parser.add_argument("--train-steps", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    task = eval.tasks.load_task(args.task)
    targets = Counter(task.target(ex) for ex in task.validation)
    rates = {"majority_rate": max(targets.values()) / len(task.validation),
             "chance_rate": sum(1 / len(task.candidates(ex)) for ex in task.validation) / len(task.validation)}
    if args.method == "none":
        from eval.models import load_causal_lm

        model, tokenizer = load_causal_lm(args.model)
        accuracy = eval.tasks.task_accuracy(model.eval(), tokenizer, task, split="validation")
    else:
        from qst.benchmark import measure_method

        scored = eval.tasks.task_accuracy

        def on_validation(model, tokenizer, task, split="test", **kwargs):
            return scored(model, tokenizer, task, split="validation", **kwargs)

        eval.tasks.task_accuracy = on_validation  # measure_method scores test; designing looks at validation
        accuracy = measure_method(args.method, model=args.model, task=args.task, batch=args.batch, seq=args.seq,
                                  steps=2, warmup=1, train_steps=args.train_steps, lr=args.lr)["accuracy"]
    n = len(task.validation)
    print(json.dumps({"task": args.task, "method": args.method, "split": "validation", "n": n, "accuracy": accuracy,
                      "accuracy_se": (accuracy * (1 - accuracy) / n) ** 0.5, **rates, "train_steps": args.train_steps,
                      "batch": args.batch, "seq": args.seq, "lr": args.lr}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
