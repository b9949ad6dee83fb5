"""The table of the shipped tasks in docs/results/tasks.md: per task and split, the examples,
source documents, and the majority and chance rates (what "learned something" is measured against).

    python docs/recipes/task_table.py
"""

from __future__ import annotations

from collections import Counter

from eval.tasks import SPLITS, TASKS, load_task


def main() -> int:
    print("| task | kind | split | examples | source files | majority | chance |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name in TASKS:
        task = load_task(name)
        for split in SPLITS:
            examples = task.split(split)
            targets = Counter(task.target(ex) for ex in examples)
            chance = sum(1 / len(task.candidates(ex)) for ex in examples) / len(examples)
            kind = f"{task.kind.replace('_', ' ')} ({len(task.candidates(examples[0]))})"
            print(f"| {name} | {kind} | {split} | {len(examples)} | {len(task.files[split])} | "
                  f"{100 * max(targets.values()) / len(examples):.1f} % | {100 * chance:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
