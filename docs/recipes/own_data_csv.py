"""A user's classification CSV with unusual column names, made from the built-in def-kind task
(docs/results/own-data.md).

    python docs/recipes/own_data_csv.py --out runs/def-kind-csv

Writes OUT/train.csv and OUT/test.csv (and OUT/validation.csv when the task has a validation
split) with the columns `code_snippet` (the prompt the built-in task asks, template applied) and
`what_it_is` (the label's name), keeping the built-in task's file-disjoint splits. Then

    slimtune bench --quick --methods qst,qlora --task OUT --text-column code_snippet --label-column what_it_is --out runs/own-data-bench

tunes on it with the same command as on the built-in task.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, run from a clone

from eval.tasks import SPLITS, load_task  # noqa: E402
from eval.user_tasks import task_rows  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="def-kind", help="a built-in classification task")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    task = load_task(args.task)
    args.out.mkdir(parents=True, exist_ok=False)
    for split in SPLITS:
        examples = getattr(task, split)
        if not examples:
            continue
        with (args.out / f"{split}.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["code_snippet", "what_it_is"])
            for ex in examples:
                row = task_rows(task, ex)
                writer.writerow([row["text"], row["label"]])
        print(f"{split}: {len(examples)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
