"""The code-generation report: Markdown tables and plots for `eval.report.write_report`."""

from __future__ import annotations

from typing import Any


def codegen_markdown(report: dict[str, Any], title: str = "Code generation: pass@k") -> str:
    """Tables of pass@k and failure types per sampler, as the AdapT paper reports them."""
    from eval.report import markdown_table

    summaries, config = report["samplers"], report["config"]
    ks = [str(k) for k in config["ks"]]
    rows = []
    for name, s in summaries.items():
        row = {"sampler": _sampler_label(name, config), "n": s["n"]}
        if not report.get("isolated", True):
            row["sandbox"] = f"UNISOLATED ({report.get('isolation')})"
        row.update({f"pass@{k}": 100 * s["pass_at_k"][k] for k in ks})
        row.update({"solved": f"{s['problems_solved']}/{config['problems']}",
                    "hard tokens %": 100 * s["hard_token_fraction"] if "hard_token_fraction" in s else None})
        rows.append(row)
    kinds = sorted({t for s in summaries.values() for t in s["failures"]},
                   key=lambda t: -sum(s["failures"].get(t, 0) for s in summaries.values()))
    failures = [{"sampler": name, "samples": s["samples"], "passed": s["passed"],
                 **{t: s["failures"].get(t, 0) for t in kinds}, "unfinished": s.get("unfinished")}
                for name, s in summaries.items()]
    isolation = report.get("isolation", "unknown")
    warning = "" if isolation == "bubblewrap" else (
        f"**Warning: weak sandbox.** Generated code ran with isolation `{isolation}`, not bubblewrap: it was not "
        "fully contained (see the README, 'Running generated code').\n\n")
    if not report.get("isolated", True):
        warning += ("**UNISOLATED results.** Every result below ran in process mode: a completion could read the "
                    "tests or forge its verdict, so a pass is not evidence of a correct completion.\n\n")
    return (f"# {title}\n\n{warning}{config['problems']} problems; pass@k in %, unbiased estimator over n samples "
            f"per problem (greedy: one completion, so pass@k = pass@1); tests run in the sandbox (isolation: "
            f"{isolation}) with a {config['timeout_s']:g} s limit.\n\n" + markdown_table(rows, floatfmt=".1f")
            + "\n## Failure types (counts over all samples)\n\nunfinished: the token limit came before the "
            "function's end (such completions usually fail to parse).\n\n" + markdown_table(failures)
            + _paired_markdown(report) + _selection_markdown(report))


def _paired_markdown(report: dict[str, Any]) -> str:
    """AdapT - temperature per k: the paired difference of per-problem pass@k (eval.codegen.paired)."""
    from eval.report import markdown_table

    paired = report.get("paired")
    if not paired:
        return ""
    rows = [{"k": k, "mean difference": 100 * d["mean"], "95 % bootstrap low": 100 * d["low"],
             "95 % bootstrap high": 100 * d["high"], "95 % t low": 100 * d["t_low"], "95 % t high": 100 * d["t_high"],
             "problems better / worse / tied": f"{d['better']} / {d['worse']} / {d['ties']}"}
            for k, d in paired["by_k"].items()]
    first = next(iter(paired["by_k"].values()))
    return (f"\n## {paired['a']} - {paired['b']}: paired difference of pass@k (points)\n\nPer problem, pass@k of "
            f"{paired['a']} minus pass@k of {paired['b']} on the same problem; mean over the {first['problems']} "
            f"problems with a 95 % percentile bootstrap interval over problems ({first['resamples']} resamples) and "
            "the paired t interval.\n\n" + markdown_table(rows, floatfmt=".1f"))


def _selection_markdown(report: dict[str, Any]) -> str:
    """The validation table that chose the sampler settings (eval.codegen.select)."""
    from eval.report import markdown_table

    selection = report.get("selection")
    if not selection:
        return ""
    k = selection["k"]
    rows = [{"sampler": r["sampler"], "setting": r["setting"], "pass@1": 100 * r["pass@1"],
             f"pass@{k}": 100 * r[f"pass@{k}"], "solved": f"{r['solved']}/{selection['problems']}"}
            for r in selection["rows"]]
    chosen = ", ".join(f"{s}: {v}" for s, v in selection["chosen"].items())
    return (f"\n## Settings chosen on validation problems\n\n{selection['problems']} validation problems "
            f"({selection['problems_file']}), none of them reported above; n = {selection['n']}; chosen by "
            f"pass@{k} (ties: pass@1). Chosen: {chosen}.\n\n" + markdown_table(rows, floatfmt=".1f"))


def _sampler_label(name: str, config: dict[str, Any]) -> str:
    if name == "temperature":
        return f"temperature (T={config['temperature']:g})"
    if name == "adapt":
        return f"AdapT (a={config['hard_temperature']:g}, b={config['easy_temperature']:g})"
    return name


def codegen_plots(report: dict[str, Any]) -> dict[str, Any]:
    """`pass_at_k.png` (grouped bars: k on the x axis, one bar per sampler), `failures.png`, and with a
    paired comparison in the report `paired.png`."""
    summaries, ks = report["samplers"], [str(k) for k in report["config"]["ks"]]
    names = list(summaries)

    def grouped(ax, groups, values_of, ylabel, title):
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
            ax.bar(xs, values_of(name), width, label=name)
        ax.set_xticks(range(len(groups)), groups, rotation=20 if len(groups) > 4 else 0)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend()

    def pass_plot(ax):
        grouped(ax, [f"pass@{k}" for k in ks], lambda s: [100 * summaries[s]["pass_at_k"][k] for k in ks],
                "% of problems", "pass@k per sampler")

    kinds = sorted({t for s in summaries.values() for t in s["failures"]})

    def failure_plot(ax):
        grouped(ax, kinds or ["none"], lambda s: [100 * summaries[s]["failures"].get(t, 0) / summaries[s]["samples"]
                                                  for t in kinds] or [0.0], "% of samples", "failure types")

    plots = {"pass_at_k": pass_plot, "failures": failure_plot}
    if report.get("paired"):
        plots["paired"] = lambda ax: _paired_plot(ax, report["paired"])
    return plots


def _paired_plot(ax, paired: dict[str, Any]) -> None:
    """`paired.png`: mean per-problem difference of pass@k per k, with its 95 % bootstrap interval."""
    ks = list(paired["by_k"])
    means = [100 * paired["by_k"][k]["mean"] for k in ks]
    errors = [[m - 100 * paired["by_k"][k]["low"] for k, m in zip(ks, means)],
              [100 * paired["by_k"][k]["high"] - m for k, m in zip(ks, means)]]
    ax.errorbar(range(len(ks)), means, yerr=errors, fmt="o", capsize=6)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(ks)), [f"pass@{k}" for k in ks])
    ax.set_ylabel("points (95 % bootstrap interval over problems)")
    ax.set_title(f"{paired['a']} - {paired['b']}, paired per problem")
    ax.grid(axis="y", alpha=0.3)
