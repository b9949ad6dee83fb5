"""Regenerate the suite's task files from this machine's reference corpus (an explicit rebuild).

    python docs/recipes/build_tasks.py --out runs/tasks-rebuilt   # generate, compare with the shipped files
    python docs/recipes/build_tasks.py --ship                      # (developers) replace the shipped files

The shipped files (`eval/reference/shipped/tasks/`) were generated from the CPython standard
library named in their `tasks_card.json`; another Python version generates other examples, which
is why the files ship. The comparison says, per task and split, whether the examples are the same.
"""

from __future__ import annotations

import argparse

from eval.tasks import SHIPPED_TASKS, build_tasks, rebuild_tasks, write_task_files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="a new directory for the regenerated files (compared with the shipped ones)")
    where.add_argument("--ship", action="store_true", help="write the regenerated files into the package")
    args = parser.parse_args()
    if args.ship:
        print(f"wrote {write_task_files(build_tasks(), SHIPPED_TASKS)}")
        return 0
    for task, splits in rebuild_tasks(args.out).items():
        print(f"{task}: " + ", ".join(f"{split} {'same as shipped' if same else 'DIFFERS'}" for split, same in splits.items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
