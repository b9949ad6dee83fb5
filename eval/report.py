"""Reports: every command writes JSON (machines), Markdown (people) and PNG plots (pictures).

    write_report(
        args.out, "bench",
        data={"rows": rows, "config": vars(args)},
        markdown="# Tuning benchmark\\n\\n" + markdown_table(rows, ["method", "memory_gib", "accuracy"]),
        plots={"memory": bar_chart([r["method"] for r in rows], [r["memory_gib"] for r in rows],
                                   ylabel="peak memory (GiB)")},
    )

writes `out/bench.json`, `out/bench.md` and `out/memory.png`. A plot is any callable that
takes a matplotlib `Axes` and draws on it (reach the figure through `ax.figure`);
`bar_chart` and `line_chart` build such callables. Figures are drawn with matplotlib's
object-oriented API on the Agg canvas (no pyplot, no display, no global backend change).

All files are first written to a temporary directory inside `out_dir` and moved into place
only when every one of them succeeded, so a plot that raises leaves no partial report.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from eval.errors import UserInputError
from eval.io import atomic_write_text, write_json

PlotFn = Callable[[Any], Any]  # receives a matplotlib Axes
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def write_report(
    out_dir: str | os.PathLike,
    name: str,
    data: dict[str, Any],
    markdown: str,
    plots: dict[str, PlotFn] | None = None,
    figsize: tuple[float, float] = (6.4, 4.0),
) -> dict[str, Any]:
    """Write `name.json`, `name.md` and one `<plot>.png` per entry of `plots` into `out_dir`.

    Returns the written paths: {"json": Path, "markdown": Path, "plots": {plot: Path}}.
    """
    _check_name(name, "report name")
    plots = dict(plots or {})
    for plot_name, fn in plots.items():
        _check_name(plot_name, "plot name")
        if not callable(fn):
            raise UserInputError(f"plot {plot_name!r} must be a callable taking a matplotlib Axes")
    if not isinstance(data, dict):
        raise UserInputError(f"report data must be a dict, got {type(data).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.report-", dir=out_dir))
    try:
        for plot_name, fn in plots.items():
            _draw(fn, tmp / f"{plot_name}.png", figsize)
        atomic_write_text(tmp / f"{name}.md", markdown if markdown.endswith("\n") else markdown + "\n")
        write_json(tmp / f"{name}.json", data)
        # Everything exists: move into place, the JSON (what machines look for) last.
        written = {"plots": {}}
        for plot_name in plots:
            written["plots"][plot_name] = _move(tmp / f"{plot_name}.png", out_dir)
        written["markdown"] = _move(tmp / f"{name}.md", out_dir)
        written["json"] = _move(tmp / f"{name}.json", out_dir)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".png", ".json", ".md")):
        raise UserInputError(
            f"{what} must be a plain file stem (letters, digits, '_', '-', '.'; no extension), got {name!r}"
        )


def _draw(fn: PlotFn, path: Path, figsize) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    ax = fig.subplots()
    fn(ax)
    fig.savefig(path, dpi=120, format="png")


def _move(src: Path, out_dir: Path) -> Path:
    dst = out_dir / src.name
    os.replace(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Markdown


def _format_cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, floatfmt)
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
                   floatfmt: str = ".4g", headers: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table of `rows` (dicts); `columns` picks and orders the keys (default:
    every key, in first-seen order). Numeric columns are right-aligned, floats formatted with
    `floatfmt`, missing values shown as "—". `headers` renames columns for display."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    headers = headers or {}
    head = "| " + " | ".join(headers.get(c, c) for c in columns) + " |"

    def numeric(c):
        values = [r.get(c) for r in rows if r.get(c) is not None]
        return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    rule = "|" + "|".join("---:" if numeric(c) else "---" for c in columns) + "|"
    body = ["| " + " | ".join(_format_cell(r.get(c), floatfmt) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


# ---------------------------------------------------------------------------------------------
# Plots (callables for `write_report(plots=...)`)


def bar_chart(labels: Sequence[str], values: Sequence[float], ylabel: str = "", title: str = "",
              errors: Sequence[float] | None = None, annotate: bool = True, fmt: str = ".3g") -> PlotFn:
    """A bar chart: one bar per label, the value written above each bar when `annotate`."""
    labels, values = [str(x) for x in labels], [float(v) for v in values]
    if len(labels) != len(values):
        raise UserInputError(f"bar_chart got {len(labels)} labels but {len(values)} values")

    def draw(ax):
        bars = ax.bar(range(len(values)), values, yerr=errors, color="#4C72B0", capsize=3)
        ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0, ha="right"
                      if len(labels) > 4 else "center")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if annotate:
            ax.bar_label(bars, labels=[format(v, fmt) for v in values], padding=2, fontsize=8)

    return draw


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str = "",
               ylabel: str = "", title: str = "", logy: bool = False) -> PlotFn:
    """Lines, one per name: `series = {"QST": (steps, losses), "LoRA": (steps, losses)}`."""

    def draw(ax):
        for label, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()

    return draw
