"""The one place that gives a command `--task` and its data flags, and turns them into a `TaskSpec`.

    add_task_arguments(parser)            # --task, --task-config, --task-kind, --labels, --*-column, ...
    spec = task_spec(args)                # eval.tasks.TaskSpec, or None when --task was not given

The flags follow `eval.tasks.TaskSpec` field by field; the column flags come from
`eval.tasks.COLUMN_ROLES` (one flag per role, its default names in the help).
"""

from __future__ import annotations

import argparse


def add_task_arguments(parser: argparse.ArgumentParser, required: bool = True, default_help: str = "",
                       flag: str = "--task", purpose: str = "") -> None:
    """--task (or `flag`, e.g. prune's --recover-task; its value lands in `args.task` either way)
    and the flags that say how to read the user's data, in their own argument group."""
    from eval.tasks import BUILTIN_TASKS, COLUMN_ROLES, TASK_KINDS, TaskSpec

    group = parser.add_argument_group(f"task data{purpose} (docs/DATA.md)")
    group.add_argument(
        flag, dest="task", required=required, default=None,
        help=f"a built-in task ({', '.join(BUILTIN_TASKS)}); a local CSV, TSV, JSON, JSONL or Parquet file, a folder "
        "of them (files named train / validation|val|dev / test are those splits) or a datasets.save_to_disk "
        "folder; or hf:NAME, a hub dataset in the local datasets cache (e.g. hf:nyu-mll/glue with --task-config "
        "sst2)" + default_help)
    group.add_argument("--task-config", default=None, help="the hf: dataset's configuration (GLUE: sst2, MMLU: all)")
    group.add_argument("--task-kind", choices=TASK_KINDS, default=None,
                       help="default: inferred from the columns (messages or instruction + output: instruction; "
                       "question + choices + answer: multiple_choice; text + label: classification)")
    group.add_argument("--labels", default=None,
                       help="comma-separated class names in label order: integer label i is the i-th; string "
                       "labels must be among them (default: the dataset's ClassLabel names, or the string labels "
                       "sorted)")
    for role, names in COLUMN_ROLES.items():
        extra = " (several columns: comma-separated, e.g. A,B,C,D)" if role == "choices" else ""
        group.add_argument(f"--{role.replace('_', '-')}-column", dest=f"{role}_column", default=None,
                           help=f"the {role.replace('_', ' ')} column (default: the first of {', '.join(names)}){extra}")
    group.add_argument("--validation-fraction", type=float, default=TaskSpec.validation_fraction,
                       help="share of train carved off (seeded shuffle) as validation when the data has none")
    group.add_argument("--test-fraction", type=float, default=TaskSpec.test_fraction,
                       help="share of train carved off (seeded shuffle) as test when the data has none (or its "
                       "test split has no labels)")
    group.add_argument("--data-seed", type=int, default=TaskSpec.seed,
                       help="seed of the split carving and of the --train-examples sample (kept apart from the "
                       "training --seed, so that every training seed is scored on the same test rows)")


def task_spec(args: argparse.Namespace, train_examples: int | None = None, source: str | None = None):
    """The `eval.tasks.TaskSpec` of the parsed flags (None when no task was given).

    `train_examples`: the seeded sample of train the command asks for (its own --train-examples);
    `source`: the task to use when --task was not given (a command's default).
    """
    from eval.tasks import COLUMN_ROLES, TaskSpec

    source = args.task if args.task is not None else source
    if source is None:
        return None
    columns = {role: getattr(args, f"{role}_column") for role in COLUMN_ROLES
               if getattr(args, f"{role}_column", None) is not None}
    labels = tuple(x.strip() for x in args.labels.split(",") if x.strip()) if args.labels else None
    return TaskSpec(source=source, config=args.task_config, kind=args.task_kind, columns=columns, labels=labels,
                    validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
                    train_examples=train_examples, seed=args.data_seed)
