"""`slimtune export-task`: write a task (a built-in one, or the user's data as read) as JSONL files.

    slimtune export-task --task def-kind --out data/def-kind

Writes OUT/train.jsonl, validation.jsonl (when the task has one), test.jsonl, and
export_task.{json,md,png} (split sizes, and the flags that load the files back as the very same
task: `slimtune tune --task OUT <flags>` trains on the same examples as `--task def-kind`).
"""

from __future__ import annotations

import argparse
import shlex


def add_parser(subparsers) -> None:
    from scripts.task_options import add_task_arguments

    p = subparsers.add_parser(
        "export-task", help="write a task (built-in or your data as read) as train/validation/test JSONL files",
        description="Write a task as JSONL files that --task reads back into the same task: classification "
        "rows {text (prompt template applied), label (name)}, multiple choice {question, choices, answer}, "
        "instruction {instruction, input, output} or {messages}. Also writes export_task.json/.md/.png: the "
        "split sizes and the flags that load the files as the same task. Example: slimtune export-task "
        "--task def-kind --out data/def-kind",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_task_arguments(p)
    p.add_argument("--out", required=True, help="a new folder for the JSONL files and the export report")
    p.set_defaults(func=run)


def run(args) -> int:
    from eval.report import bar_chart, write_report
    from eval.tasks import SPLITS, load_task
    from eval.user_tasks import export_task
    from scripts.task_options import task_spec

    task = load_task(task_spec(args))
    flags = export_task(task, args.out)
    command = shlex.join(["slimtune", "tune", "--task", str(args.out), *flags])
    sizes = {split: len(getattr(task, split)) for split in SPLITS}
    data = {"task": task.name, "kind": task.kind, "labels": list(task.labels), "examples": sizes,
            "load_flags": flags, "tune_command": command}
    markdown = (f"# Task {task.name} as JSONL\n\n{task.kind}; examples: "
                + ", ".join(f"{split} {n}" for split, n in sizes.items())
                + f".\n\nLoad it back as the same task:\n\n    {command} --out RUN\n")
    write_report(args.out, "export_task", data, markdown,
                 plots={"export_task": bar_chart(list(sizes), list(sizes.values()), ylabel="examples",
                                                 title=f"{task.name}: examples per split")})
    print(markdown)
    return 0
