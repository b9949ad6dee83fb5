"""How the speed of a DISP-pruned model grows with model size: `slimtune bench --scaling`.

For each architecture (random weights, smallest first) and each share of block parameters
removed, `pruning.speed.measure_pruned_speed` runs in a fresh process and measures the dense
model and its DISP-shaped pruned copy side by side; the report puts the speedups against
parameter count.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eval.errors import UserInputError

REPORT_NAME = "bench_scaling_pruned"


def run_pruned_scaling(archs: tuple[str, ...], out_dir, removed=(0.3, 0.5), batch: int = 4, seq: int = 256,
                       rounds: int = 5, device: str = "cpu", dtype: str = "float32", seed: int = 0,
                       log=print) -> dict[str, Any]:
    """Tokens/s of each architecture dense and with `removed` shares of its block parameters pruned."""
    from eval.measure import machine_info, run_in_fresh_process
    from eval.models import param_count_of_arch
    from eval.report import write_report

    removed = tuple(removed)
    if not removed or any(not 0 < r < 1 for r in removed):
        raise UserInputError(f"removed shares must be fractions in (0, 1), got {removed!r}")
    rows = []
    for i, arch in enumerate(archs, 1):
        for share in removed:
            log(f"bench --scaling: pruned speed [{i}/{len(archs)}] {arch}, {100 * share:.0f} % removed")
            raw = run_in_fresh_process("pruning.speed:measure_pruned_speed", dict(
                arch=arch, kept=1 - share, batch=batch, seq=seq, rounds=rounds, device=device, dtype=dtype,
                seed=seed))
            rows.append({"arch": arch, "params": param_count_of_arch(arch), "removed": share,
                         **{k: raw.get(k) for k in ("block_params_kept", "tokens_per_s_dense",
                                                    "tokens_per_s_pruned", "speedup", "error")}})
    data = {"batch": batch, "seq": seq, "rounds": rounds, "device": device, "dtype": dtype, "rows": rows,
            "machine": machine_info()}
    markdown = format_markdown(data)
    paths = write_report(Path(out_dir), REPORT_NAME, data, markdown, plots={REPORT_NAME: _plot(data)})
    return {"data": data, "markdown": markdown, "paths": paths}


def format_markdown(data: dict) -> str:
    from eval.measure import machine_line
    from eval.report import markdown_table

    rows = [{"arch": r["arch"], "params M": r["params"] / 1e6, "removed %": 100 * r["removed"],
             "block params kept": r["block_params_kept"], "dense tokens/s": r["tokens_per_s_dense"],
             "pruned tokens/s": r["tokens_per_s_pruned"], "speedup": r["speedup"],
             **({"error": r["error"]} if r.get("error") else {})} for r in data["rows"]]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    return "\n".join([
        "# Pruned against dense: forward tokens/s by model size",
        "",
        f"Random weights in {data['dtype']} on `{data['device']}`, batch {data['batch']} x seq {data['seq']}; "
        "a random DISP-shaped plan (every layer and selection its own channels, as a trained one), exported "
        f"physically smaller; dense and pruned timed side by side in {data['rounds']} alternating rounds "
        "in one fresh process per size and share.",
        "",
        markdown_table(rows, columns, floatfmt=".4g"),
        machine_line(data["machine"]),
    ]) + "\n"


def _plot(data: dict):
    def draw(ax):
        for share in sorted({r["removed"] for r in data["rows"]}):
            points = [(r["params"] / 1e6, r["speedup"]) for r in data["rows"]
                      if r["removed"] == share and r.get("speedup") is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{100 * share:.0f} % removed")
        ax.axhline(1.0, color="#888888", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel("pruned / dense tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    return draw


__all__ = ["run_pruned_scaling", "format_markdown"]
