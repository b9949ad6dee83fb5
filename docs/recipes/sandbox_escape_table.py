"""Try every sandbox escape of tests/sandbox_escapes.py in every isolation mode; print the outcome table.

    python docs/recipes/sandbox_escape_table.py --out sandbox-escapes      # the table in docs/results/sandbox.md

Run from the repository root (as root with bubblewrap installed for all three modes; a mode that
is not available here is skipped and says so). For each escape and mode it runs
`eval.codegen.sandbox.run_tests_sandboxed` on the escape's wrong `add` against tests that carry
a fresh random marker, `--repeats` times (process mode races with the tests' process, so its
outcome can vary), and records the verdict and what the escape found. The filesystem search gets
`--search-budget` seconds, enough here to read every visible file under 1 MiB. One more row,
"shipped_problems", runs the same search for a line of a shipped problem's tests (problem 0), to
show which modes let a solution read the problem files that lie on the host.

Writes OUT/sandbox_escapes.json and OUT/sandbox_escapes.md and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from sandbox_escapes import ESCAPES, escape_report, escape_solution, marked_tests, new_marker  # noqa: E402

from eval.codegen.problems import load_humaneval  # noqa: E402
from eval.codegen.sandbox import (  # noqa: E402
    ISOLATED,
    SandboxError,
    bubblewrap_available,
    failed_run,
    namespace_isolation_available,
    run_tests_sandboxed,
)

MODES = ("bubblewrap", "namespaces", "process")


def available(mode: str) -> bool:
    return {"bubblewrap": bubblewrap_available, "namespaces": namespace_isolation_available,
            "process": lambda: True}[mode]()


def shipped_case() -> tuple[str, str]:
    """(marker, tests) for the real problem 0: the marker is its whole tests as a problem file holds
    them (JSON-escaped), so that only a copy of a problem file matches, not a test that uses `add`."""
    problem = load_humaneval()[0]
    return json.dumps(problem.test)[1:-1], problem.test


def anonymous(where: str | None) -> str | None:
    """A found path without this machine's folders: /proc/PID/..., CHECKOUT/eval/codegen/data/..., .../a/b."""
    if not where or where.startswith("/proc/self/"):
        return where
    if re.match(r"^/proc/\d+/", where):
        return re.sub(r"^/proc/\d+/", "/proc/PID/", where)
    if "/eval/codegen/data/" in where:
        return "CHECKOUT/eval/codegen/data/" + where.split("/eval/codegen/data/", 1)[1]
    return ".../" + "/".join(where.split("/")[-2:])


def run_one(escape: str, mode: str, search_budget_s: float) -> dict:
    if escape == "shipped_problems":
        marker, tests = shipped_case()
        attack = "filesystem"
    else:
        marker = new_marker()
        tests, attack = marked_tests(marker), escape
    solution = escape_solution(attack, marker, mode, evaluator_pid=os.getpid(), search_budget_s=search_budget_s)
    start = time.monotonic()
    try:
        result = run_tests_sandboxed(solution, tests, "add", timeout_s=search_budget_s + 120, isolation=mode)
    except SandboxError as e:  # e.g. process mode: the escape ate the tests' "ready" line (as codegen-eval counts it)
        result = failed_run(e, mode)
    report = escape_report(result.stdout, attack)
    return {"escape": escape, "mode": mode, "status": result.status, "error_type": result.error_type,
            "isolated": result.isolated, "tests_found_in": anonymous(report.get("found_in") or report.get("marker_seen_in")),
            "attempt": {k: v for k, v in report.items() if k not in ("done", "printed", "found_in", "marker_seen_in")},
            "seconds": round(time.monotonic() - start, 1)}


def outcome(runs: list[dict]) -> str:
    """One cell: the verdicts over the repeats, and where the tests were found if they were."""
    verdicts = {}
    for r in runs:
        key = r["status"] if r["status"] == "passed" else f"{r['status']} ({r['error_type']})"
        verdicts[key] = verdicts.get(key, 0) + 1
    cell = ", ".join(f"{v}/{len(runs)} {k}" for k, v in verdicts.items())
    found = sorted({r["tests_found_in"] for r in runs if r["tests_found_in"]})
    if found:
        cell += "; **tests found** in " + ", ".join(f"`{f}`" for f in found[:2]) + (" ..." if len(found) > 2 else "")
    else:
        cell += "; tests not found"
    return cell


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="runs per escape and mode (filesystem searches: 1)")
    parser.add_argument("--search-budget", type=float, default=900.0, help="seconds the filesystem search may take")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    from tqdm.auto import tqdm

    from eval.io import atomic_directory, write_json

    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes) or args.repeats < 1 or args.search_budget <= 0:
        parser.error(f"--modes must be a comma list of {MODES}, --repeats >= 1, --search-budget > 0")
    escapes = [*ESCAPES, "shipped_problems"]
    skipped = {m: "not available here" for m in modes if not available(m)}
    jobs = [(e, m) for e in escapes for m in modes if m not in skipped and not (e == "signal" and m == "process")]
    runs = []
    for escape, mode in tqdm(jobs, desc="escapes"):
        searches = escape in ("filesystem", "shipped_problems")
        runs += [run_one(escape, mode, args.search_budget) for _ in range(1 if searches else args.repeats)]

    rows = ["| escape | " + " | ".join(modes) + " |", "|---" * (len(modes) + 1) + "|"]
    for escape in escapes:
        cells = []
        for mode in modes:
            mine = [r for r in runs if r["escape"] == escape and r["mode"] == mode]
            if mode in skipped:
                cells.append(f"skipped: {skipped[mode]}")
            elif escape == "signal" and mode == "process":
                cells.append("not tried: unisolated, it would signal every process of our user")
            else:
                cells.append(outcome(mine))
        rows.append(f"| {escape} | " + " | ".join(cells) + " |")
    markdown = ("Verdict on a wrong `add` per escape and mode (a pass means the escape worked); "
                f"isolated modes: {', '.join(m for m in modes if m in ISOLATED)}.\n\n" + "\n".join(rows) + "\n")
    with atomic_directory(args.out) as out:
        write_json(Path(out) / "sandbox_escapes.json", {"runs": runs, "skipped": skipped,
                                                         "search_budget_s": args.search_budget,
                                                         "repeats": args.repeats})
        (Path(out) / "sandbox_escapes.md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
