"""Per-family table of an easy-tier `slimtune codegen-eval` run: pass@k per sampler and the paired difference.

    python docs/recipes/codegen_by_family.py runs/codegen-easy/codegen.json [--k 10]

Reads the run's codegen.json (its per-problem counts) and prints a Markdown table with one row
per family of the easy tier (the task_id is slimtune-easy/FAMILY/ATTRIBUTE) and one for all; then,
per sampler, how the property family's completions begin (the counts in docs/results/codegen.md).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict

from eval.codegen.paired import paired_difference
from eval.codegen.passk import pass_at_k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="codegen.json of an easy-tier run with samplers temperature and adapt")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    report = json.loads(open(args.report, encoding="utf-8").read())
    scores: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in report["problems"]:
        family = row["task_id"].split("/")[1]
        scores[row["sampler"]][family][row["task_id"]] = pass_at_k(row["n"], row["c"], min(args.k, row["n"]))
    families = sorted(scores["temperature"])
    print(f"| family | problems | temperature pass@{args.k} | AdapT pass@{args.k} | AdapT − temperature "
          "[95 % bootstrap] |")
    print("|---|---:|---:|---:|---|")
    for family in families + ["all"]:
        chosen = families if family == "all" else [family]
        ids = sorted(i for f in chosen for i in scores["temperature"][f])
        t = [scores["temperature"][i.split("/")[1]][i] for i in ids]
        a = [scores["adapt"][i.split("/")[1]][i] for i in ids]
        d = paired_difference(a, t, seed=report["config"]["seed"])
        print(f"| {family} | {len(ids)} | {100 * sum(t) / len(t):.1f} | {100 * sum(a) / len(a):.1f} | "
              f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] |")

    print()
    print_property_forms(report)


def print_property_forms(report: dict) -> None:
    """Per sampler: property completions that begin `return self._ATTR` (right / other attribute),
    another `return self._...` expression or another form; completions raising NotImplementedError."""
    for sampler in report["samplers"]:
        forms, raises = Counter(), 0
        for sample in (s for s in report["samples"] if s["sampler"] == sampler):
            raises += "raise NotImplementedError" in sample["completion"]
            family, attribute = sample["task_id"].split("/")[1:]
            if family != "property":
                continue
            first = sample["completion"].strip().split("\n")[0]
            match = re.fullmatch(r"return self\._(\w+)", first)
            forms["right attribute" if match and match.group(1) == attribute else "other attribute" if match
                  else "other return self._ expression" if first.startswith("return self._") else "other form"] += 1
        print(f"{sampler}: property completions {dict(forms)}; completions with raise NotImplementedError: {raises}")


if __name__ == "__main__":
    main()
