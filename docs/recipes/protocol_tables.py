"""The tables of docs/results/protocol.md from `slimtune bench --protocol` outputs.

    python docs/recipes/protocol_tables.py runs/protocol-def-kind runs/protocol-stdlib-module ...

Reads each folder's bench_protocol.json (a finished protocol) and prints one Markdown table:
per task and method the validation accuracy of every grid learning rate, the rate selected on
validation, the test accuracy of every seed at it, their mean ± 95 % CI, and the paired
QST - QLoRA difference over seeds, against the majority rate of the test split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def rows(folder: Path) -> list[str]:
    data = json.loads((folder / "bench_protocol.json").read_text())
    task = data["task"] if isinstance(data["task"], str) else data["task"]["source"]
    paired = data["paired"].get("qst-qlora") or {}
    out = []
    for method, m in data["methods"].items():
        grid = ", ".join(f"{lr}: {_pct(acc)}" for lr, acc in m["validation_accuracy"].items())
        selected = "—" if m["selected_lr"] is None else f"{m['selected_lr']:g}"
        seeds = ", ".join(_pct(a) for a in m["test_accuracy"]) or "—"
        ci = f"{_pct(m['test_mean'])} ± {_pct(m['test_ci95'])}"
        pair = f"{_pct(paired.get('mean'))} ± {_pct(paired.get('ci95'))}" if method == "qst" and paired else ""
        out.append(f"| {task} | {method} | {grid} | {selected} | {seeds} | {ci} | {pair} | "
                   f"{_pct(data['test_majority_rate'])} |")
    return out


def main(folders: list[str]) -> None:
    print("| task | method | validation acc % by lr | selected lr (validation) | test acc % per seed | "
          "test mean ± 95 % CI | QST − QLoRA paired (pts) | test majority % |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in folders:
        for line in rows(Path(folder)):
            print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
