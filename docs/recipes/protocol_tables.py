"""The tables of docs/results/protocol.md from `slimtune bench --protocol` output folders.

    python docs/recipes/protocol_tables.py runs/protocol-def-kind runs/protocol-stdlib-module ...
    python docs/recipes/protocol_tables.py runs/protocol-def-kind --paired runs/ablation-def-kind-r2 runs/protocol-def-kind

For each folder: one row per task and method with the validation accuracy of every grid learning
rate, the rate selected on validation, the test accuracy of every seed at it, their mean ± 95 % CI,
and the paired QST − QLoRA difference over seeds, against the test split's majority rate. A
finished protocol is read from its bench_protocol.json; an unfinished one (killed, or still
running) from its finished runs under points/, through the protocol's own selection and summary
(`qst.protocol.select_lr`, `summarize`): a method whose grid is incomplete has no selected rate
and shows no test accuracy, so test numbers are only ever read at a rate chosen on validation.

`--paired A B` (repeatable) adds QST of folder A against QLoRA of folder B, paired by seed: a
protocol run's seed fixes the initialisation and the data order whatever the method, so seed s of
a QST variant (another r, head dim or side init, run into its own folder) pairs with seed s of
QLoRA as within one folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def protocol_data(folder: Path) -> tuple[dict, bool]:
    """(bench_protocol.json's data, True), or the same summary from the finished runs (False)."""
    report = folder / "bench_protocol.json"
    if report.is_file():
        return json.loads(report.read_text()), True
    from qst.protocol import ProtocolSettings, point_path, select_lr, summarize

    saved = json.loads((folder / "protocol_settings.json").read_text())
    fields = {k: v for k, v in saved.items() if k in ProtocolSettings.__dataclass_fields__}
    settings = ProtocolSettings(**{**fields, "lrs": fields.get("lrs")})
    results = {}
    for method in settings.methods:
        grid = {lr: json.loads(point_path(folder, method, lr, 0).read_text())
                for lr in settings.lr_grid(method) if point_path(folder, method, lr, 0).is_file()}
        complete = len(grid) == len(settings.lr_grid(method))
        selected = select_lr(grid) if complete else None
        runs = [] if selected is None else [
            json.loads(point_path(folder, method, selected, s).read_text())
            for s in range(settings.seeds) if point_path(folder, method, selected, s).is_file()]
        results[method] = {"grid": grid, "selected_lr": selected, "runs": runs}
    return summarize(settings, results), False


def _variant(data: dict, method: str) -> str:
    """The method's name with the QST options its folder ran with (r, side head dim, side init)."""
    s = data["settings"]
    if method not in ("qst", "lst"):
        return method
    options = [f"{name} {s[key]}" for name, key in (("r", "qst_r"), ("head dim", "qst_head_dim"),
                                                     ("init", "qst_side_init")) if s.get(key)]
    return f"{method} ({', '.join(options)})" if options else method


def _task_name(data: dict) -> str:
    return data["task"] if isinstance(data["task"], str) else data["task"]["source"]


def rows(folder: Path) -> list[str]:
    data, finished = protocol_data(folder)
    task = _task_name(data)
    paired = data["paired"].get("qst-qlora") or {}
    out = []
    for method, m in data["methods"].items():
        grid = ", ".join(f"{lr}: {_pct(acc)}" for lr, acc in m["validation_accuracy"].items())
        selected = "—" if m["selected_lr"] is None else f"{m['selected_lr']:g}"
        seeds = ", ".join(_pct(a) for a in m["test_accuracy"]) or "—"
        ci = f"{_pct(m['test_mean'])} ± {_pct(m['test_ci95'])}"
        pair = (f"{_pct(paired.get('mean'))} ± {_pct(paired.get('ci95'))} ({len(paired['seeds'])} seeds)"
                if method == "qst" and paired.get("seeds") else "")
        out.append(f"| {task}{'' if finished else ' (unfinished)'} | {_variant(data, method)} | {grid} | {selected} | {seeds} | "
                   f"{ci} | {pair} | {_pct(data['test_majority_rate'])} |")
    return out


def curve_rows(folder: Path) -> list[str]:
    """Validation accuracy at every evaluation of every grid run (the learning curves)."""
    data, _ = protocol_data(folder)
    task = _task_name(data)
    out = []
    for method, m in data["methods"].items():
        for lr, curve in m["validation_curves"].items():
            if curve:
                points = ", ".join(f"{step}: {_pct(acc)}" for step, acc in curve)
                out.append(f"| {task} | {_variant(data, method)} | {lr} | {points} |")
    return out


def paired_row(qst_folder: Path, qlora_folder: Path) -> str:
    """QST of one folder against QLoRA of another, paired by seed (each at its validation-chosen rate)."""
    from qst.protocol import mean_ci95

    ours_data, _ = protocol_data(qst_folder)
    theirs_data, _ = protocol_data(qlora_folder)
    if _task_name(ours_data) != _task_name(theirs_data):
        raise SystemExit(f"--paired: {qst_folder} and {qlora_folder} ran different tasks")
    ours, theirs = ours_data["methods"]["qst"], theirs_data["methods"]["qlora"]
    by_seed = dict(zip(theirs["seeds"], theirs["test_accuracy"]))
    pairs = [(s, a - by_seed[s]) for s, a in zip(ours["seeds"], ours["test_accuracy"]) if s in by_seed]
    mean, ci = mean_ci95([d for _, d in pairs])
    differences = ", ".join(f"{100 * d:+.1f}" for _, d in pairs)
    return (f"| {_task_name(ours_data)} | {_variant(ours_data, 'qst')} − qlora | {differences} | "
            f"{_pct(mean)} ± {_pct(ci)} ({len(pairs)} seeds) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="*", help="bench --protocol output folders")
    p.add_argument("--paired", nargs=2, action="append", default=[], metavar=("QST_FOLDER", "QLORA_FOLDER"),
                   help="QST of the first folder against QLoRA of the second, paired by seed")
    args = p.parse_args()
    print_tables(args.folders)
    if args.paired:
        print()
        print("| task | difference | test points per seed | mean ± 95 % CI |")
        print("|---|---|---|---|")
        for qst_folder, qlora_folder in args.paired:
            print(paired_row(Path(qst_folder), Path(qlora_folder)))


def print_tables(folders: list[str]) -> None:
    print("| task | method | validation acc % by lr | selected lr (on validation) | test acc % per seed | "
          "test mean ± 95 % CI | QST − QLoRA paired (pts) | test majority % |")
    print("|---|---|---|---|---|---|---|---|")
    for folder in folders:
        for line in rows(Path(folder)):
            print(line)
    print()
    print("| task | method | lr | validation acc % at step |")
    print("|---|---|---|---|")
    for folder in folders:
        for line in curve_rows(Path(folder)):
            print(line)


if __name__ == "__main__":
    main()
