"""Choosing sampler settings on validation problems: the temperature T, and AdapT's hard a and easy b.

Each candidate setting is evaluated on the validation problems alone (`evaluate_codegen`, same
n, seed and sandbox as the reported run); the setting with the highest pass@k there wins (ties:
higher pass@1, then the earlier one in the grid). The reported problems are never looked at,
and `select_sampler_settings` refuses validation problems that share a task_id with them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from eval.codegen.problems import Problem
from eval.codegen.run import SamplingConfig, evaluate_codegen
from eval.errors import UserInputError, require_positive_number


def parse_temperature_grid(text: str) -> list[float]:
    """"0.2,0.6,1.0" -> [0.2, 0.6, 1.0] (each > 0)."""
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise UserInputError(f"a temperature grid is a comma list of numbers, got {text!r}") from e
    if not values:
        raise UserInputError(f"a temperature grid needs at least one temperature, got {text!r}")
    for t in values:
        require_positive_number("temperature", t)
    return values


def parse_adapt_grid(text: str) -> list[tuple[float, float]]:
    """"0.8:0.2,1.2:0.4" -> [(0.8, 0.2), (1.2, 0.4)]: AdapT's (hard a, easy b) pairs."""
    pairs = []
    for item in (s.strip() for s in text.split(",")):
        parts = item.split(":")
        if len(parts) != 2:
            raise UserInputError(f"an AdapT grid is a comma list of HARD:EASY temperature pairs such as "
                                 f"'0.8:0.2,1.2:0.4', got {item!r} in {text!r}")
        a, b = parse_temperature_grid(parts[0])[0], parse_temperature_grid(parts[1])[0]
        pairs.append((a, b))
    return pairs


def require_disjoint(validation: list[Problem], reported: list[Problem]) -> None:
    """Refuse validation problems that are also reported: settings must be chosen on other problems."""
    overlap = {p.task_id for p in validation} & {p.task_id for p in reported}
    if overlap:
        raise UserInputError(f"the validation problems (--select-on) share {len(overlap)} task_id(s) with the "
                             f"reported ones (e.g. {sorted(overlap)[0]!r}); settings must be chosen on other problems")


def select_sampler_settings(model, tokenizer, validation: list[Problem], reported: list[Problem],
                            temperatures: list[float], adapt_pairs: list[tuple[float, float]], n: int, k: int,
                            base: SamplingConfig | None = None, **evaluate_kwargs
                            ) -> tuple[SamplingConfig, dict[str, Any]]:
    """The config with the best validation pass@k for each sampler, and the table that chose it.

    `evaluate_kwargs` go to `evaluate_codegen` (timeout_s, seed, workers, isolation, progress).
    Returns (base with temperature, hard_temperature and easy_temperature replaced by the
    winners; {"k", "problems", "task_ids", "rows": [one per setting], "chosen": {...}}).
    """
    base = base if base is not None else SamplingConfig()
    require_disjoint(validation, reported)
    if not validation:
        raise UserInputError("no validation problems to choose sampler settings on")
    ks = sorted({1, k})
    candidates = ([("temperature", replace(base, temperature=t), f"T={t:g}") for t in temperatures]
                  + [("adapt", replace(base, hard_temperature=a, easy_temperature=b), f"a={a:g}, b={b:g}")
                     for a, b in adapt_pairs])
    rows = []
    for sampler, config, label in candidates:
        report = evaluate_codegen(model, tokenizer, validation, [sampler], n=n, ks=ks, config=config,
                                  **evaluate_kwargs)
        summary = report["samplers"][sampler]
        rows.append({"sampler": sampler, "setting": label, "temperature": config.temperature,
                     "hard_temperature": config.hard_temperature, "easy_temperature": config.easy_temperature,
                     "pass@1": summary["pass_at_k"]["1"], f"pass@{k}": summary["pass_at_k"][str(k)],
                     "solved": summary["problems_solved"]})
    chosen = {}
    for sampler in ("temperature", "adapt"):
        mine = [r for r in rows if r["sampler"] == sampler]
        if mine:  # max() keeps the first of equals: the earlier setting in the grid
            chosen[sampler] = max(mine, key=lambda r: (r[f"pass@{k}"], r["pass@1"]))
    config = base
    if "temperature" in chosen:
        config = replace(config, temperature=chosen["temperature"]["temperature"])
    if "adapt" in chosen:
        config = replace(config, hard_temperature=chosen["adapt"]["hard_temperature"],
                         easy_temperature=chosen["adapt"]["easy_temperature"])
    return config, {"k": k, "n": n, "problems": len(validation), "task_ids": [p.task_id for p in validation],
                    "rows": rows, "chosen": {s: r["setting"] for s, r in chosen.items()}}
