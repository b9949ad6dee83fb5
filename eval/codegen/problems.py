"""HumanEval-format problems: the loader, the suite's own problems, and the one-process program.

A problem is one JSON object per line with `task_id`, `prompt` (a function signature and
docstring), `test` (defining `check(candidate)`), `entry_point` (the function's name) and
optionally `canonical_solution`, as in HumanEval.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from eval.errors import UserInputError

REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")
_DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str | None = None


# The problem sets that ship with the suite, by name (`--problems NAME`). "easy-*": the easy tier
# (eval.codegen.easy), whose validation problems choose sampler settings for its test problems.
PROBLEM_SETS = {"slimtune": "slimtune_problems.jsonl",
                "easy-validation": "slimtune_easy_validation.jsonl",
                "easy-test": "slimtune_easy_test.jsonl"}


def shipped_problems_path(name: str = "slimtune") -> Path:
    """A shipped problem set's file; "slimtune": short stdlib-style functions, written for this project."""
    if name not in PROBLEM_SETS:
        raise UserInputError(f"unknown problem set {name!r}; expected one of {', '.join(PROBLEM_SETS)} "
                             "or a HumanEval-format JSONL file")
    return _DATA_DIR / PROBLEM_SETS[name]


def load_humaneval(path: str | os.PathLike | None = None) -> list[Problem]:
    """Read HumanEval-format JSONL (optionally .gz), or a shipped set by name (`PROBLEM_SETS`);
    default: the shipped "slimtune" problems.

    A missing file, a line that is not a JSON object, a missing or non-string field, or a
    repeated task_id raises `UserInputError` naming the file, the line and the field.
    """
    if path is None or (isinstance(path, str) and path in PROBLEM_SETS):
        path = shipped_problems_path(path or "slimtune")
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"problem file not found: {path}; expected HumanEval-format JSONL "
                             f"(one object per line with {', '.join(REQUIRED_FIELDS)})")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserInputError(f"cannot read problem file {path}: {e}") from e
    problems, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise UserInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field in REQUIRED_FIELDS:
            if field not in record:
                raise UserInputError(f"{where}: missing field {field!r} (each problem needs {', '.join(REQUIRED_FIELDS)})")
            if not isinstance(record[field], str) or not record[field]:
                raise UserInputError(f"{where}: field {field!r} must be a non-empty string")
        if not record["entry_point"].isidentifier():
            raise UserInputError(f"{where}: entry_point {record['entry_point']!r} is not a Python name")
        if record["task_id"] in seen:
            raise UserInputError(f"{where}: task_id {record['task_id']!r} appears twice")
        seen.add(record["task_id"])
        solution = record.get("canonical_solution")
        problems.append(Problem(record["task_id"], record["prompt"], record["test"], record["entry_point"],
                                solution if isinstance(solution, str) else None))
    if not problems:
        raise UserInputError(f"problem file {path} holds no problems")
    return problems


def build_program(problem: Problem, completion: str) -> str:
    """The whole program as HumanEval's execution module runs it (one process): function, tests, call.

    Handy for running known-good code in one go; `evaluate_codegen` judges completions with
    `run_tests_sandboxed` instead, where the tests do not share a process with the completion.
    """
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
