"""Reports: JSON + Markdown + PNG written together, or not at all."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.errors import UserInputError
from eval.report import bar_chart, line_chart, markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_writes_json_markdown_and_plots(tmp_path):
    rows = [{"method": "QST", "memory_gib": 1.25, "accuracy": 0.8125},
            {"method": "QLoRA", "memory_gib": 2.5, "accuracy": np.float32(0.75)}]
    written = write_report(
        tmp_path / "out", "bench", {"rows": rows}, "# Bench\n\n" + markdown_table(rows),
        plots={"memory": bar_chart([r["method"] for r in rows], [r["memory_gib"] for r in rows], ylabel="GiB"),
               "loss": line_chart({"QST": ([1, 2, 3], [3.0, 2.0, 1.5])}, xlabel="step")},
    )
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "loss.png", "memory.png"]
    assert json.loads((out / "bench.json").read_text())["rows"][1]["accuracy"] == 0.75
    assert (out / "bench.md").read_text().startswith("# Bench\n")
    assert (out / "memory.png").read_bytes()[:8] == PNG_MAGIC
    assert written["plots"]["loss"] == out / "loss.png" and written["json"] == out / "bench.json"


def test_a_failing_plot_leaves_nothing_behind(tmp_path):
    write_report(tmp_path, "old", {"a": 1}, "old")

    def broken(ax):
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(tmp_path, "new", {"a": 2}, "new", plots={"fine": bar_chart(["a"], [1.0]), "bad": broken})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json", "old.md"]


def test_unserialisable_data_leaves_nothing_behind(tmp_path):
    with pytest.raises(TypeError):
        write_report(tmp_path, "r", {"x": object()}, "md", plots={"p": bar_chart(["a"], [1.0])})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["", "../escape", "report.json", "a/b"])
def test_bad_names_are_user_errors(tmp_path, name):
    with pytest.raises(UserInputError):
        write_report(tmp_path, name, {}, "")
    with pytest.raises(UserInputError):
        write_report(tmp_path, "ok", {}, "", plots={name: bar_chart(["a"], [1.0])})


def test_markdown_table_formats_and_aligns():
    table = markdown_table(
        [{"name": "a|b", "x": 0.123456, "n": 3, "ok": True}, {"name": "c", "x": None, "n": 10, "ok": False}],
        columns=["name", "x", "n", "ok"], floatfmt=".2f", headers={"x": "x (s)"},
    )
    assert table.splitlines() == [
        "| name | x (s) | n | ok |",
        "|---|---:|---:|---|",
        "| a\\|b | 0.12 | 3 | yes |",
        "| c | — | 10 | no |",
    ]
    assert markdown_table([{"b": 1}, {"a": 2}]).splitlines()[0] == "| b | a |"


def test_bar_chart_checks_lengths():
    with pytest.raises(UserInputError):
        bar_chart(["a", "b"], [1.0])
