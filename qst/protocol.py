"""`slimtune bench --protocol`: accuracy comparisons that hold up.

For each method: a learning-rate grid (`ProtocolSettings.lrs`, or `eval.tuning_methods.PROTOCOL_LRS`),
each point trained once (seed 0) with a cosine schedule after a linear warm-up, evaluated on the
task's *validation* split every `eval_every` steps with early stopping (the model ends with its
best evaluation's parameters). The learning rate with the best validation accuracy is selected
(ties: the smaller one); then `seeds` runs at it (seed 0 is the grid run) are scored on the whole
*test* split. Test accuracy never chooses anything: it is read only at the selected point.

Every run is its own fresh process (`measure_protocol_point`) and its result its own JSON file
under `<out>/points/`, written atomically when the run ends: a killed protocol resumes where it
stopped and loses no finished point; a failed run is reported and not saved, so a rerun retries it. `<out>/protocol_settings.json` records the settings; a rerun
with other settings into the same folder is refused rather than mixing results.

`bench_protocol.json` holds, per method under `methods`: `lr_grid`, `validation_accuracy`
({lr: accuracy}), `selected_lr`, `test_accuracy` (one per seed), `test_mean`, `test_ci95`
(Student-t half-width over seeds); and under `paired`, for every method against QLoRA
(`"qst-qlora"`, ...): the mean and CI of the per-seed difference (same seed, same data order).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any

from eval.errors import UserInputError, require_positive, require_positive_number
from eval.tuning_methods import PROTOCOL_LRS

PROTOCOL_NAME = "bench_protocol"
# Every protocol run: a linear warm-up over this share of the steps, then a cosine decay. (`bench`
# itself still trains at a constant rate after warm-up: the measured --quick numbers were made so;
# a preset re-chosen by the protocol should switch it.)
SCHEDULE = "cosine"
WARMUP_RATIO = 0.06
SETTINGS_FILE = "protocol_settings.json"
POINTS_DIR = "points"
REFERENCE_METHOD = "qlora"  # paired differences are taken against it


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
    """What `bench --protocol` runs; validated on construction (UserInputError), before any training."""

    model: str = "ref-lm"
    task: str | dict = "def-kind"  # a built-in name or a TaskSpec dict, passed to eval.tasks.load_task as it is
    methods: str | tuple[str, ...] = ("qlora", "qst")
    lrs: str | tuple[float, ...] | None = None  # one grid for every method; None: PROTOCOL_LRS per method
    seeds: int = 3
    batch: int = 8
    seq: int = 256
    train_steps: int = 320  # at most; early stopping may end a run sooner
    eval_every: int = 40
    patience: int = 3  # evaluations without a better validation accuracy before stopping
    warmup_ratio: float = WARMUP_RATIO
    train_examples: int | None = None
    eval_batch_size: int = 16
    device: str = "cpu"
    dtype: str = "auto"  # one compute dtype for every method (see BenchSettings.compute_dtype)
    qst_r: int | None = None
    qst_head_dim: int | None = None  # QSTConfig.side_head_dim
    qst_side_init: str | None = None  # QSTConfig.side_init
    model_package: str | None = None

    def __post_init__(self):
        from qst.baselines import check_methods

        object.__setattr__(self, "methods", tuple(check_methods(self.methods)))
        object.__setattr__(self, "lrs", parse_lrs(self.lrs))
        for name in ("seeds", "batch", "seq", "train_steps", "eval_every", "patience", "eval_batch_size"):
            require_positive(name, getattr(self, name))
        for name in ("train_examples", "qst_r", "qst_head_dim"):
            if getattr(self, name) is not None:
                require_positive(name, getattr(self, name))
        if not 0 <= self.warmup_ratio < 1:
            raise UserInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.baseline_options():  # the side network's options, checked as QSTConfig checks them
            from qst.config import QSTConfig

            QSTConfig(**self.baseline_options()["qst_options"])
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserInputError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        from eval.model_specs import backbone_source

        model, package = backbone_source(self.model)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "model_package", package or self.model_package)
        if isinstance(self.task, dict):
            object.__setattr__(self, "task", dict(self.task))

    def lr_grid(self, method: str) -> tuple[float, ...]:
        return self.lrs if self.lrs is not None else PROTOCOL_LRS[method]

    @property
    def compute_dtype(self) -> str:
        from eval.bnb import compute_dtype_name

        return compute_dtype_name(self.device) if self.dtype == "auto" else self.dtype

    def baseline_options(self) -> dict:
        options = {"r": self.qst_r, "side_head_dim": self.qst_head_dim, "side_init": self.qst_side_init}
        options = {k: v for k, v in options.items() if v is not None}
        return {"qst_options": options} if options else {}

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = list(self.methods)
        d["lrs"] = list(self.lrs) if self.lrs is not None else None
        d["lr_grids"] = {m: list(self.lr_grid(m)) for m in self.methods}
        return d


def parse_lrs(lrs) -> tuple[float, ...] | None:
    """`"1e-3,3e-3"` or a sequence -> a strictly increasing tuple of positive rates; None stays None."""
    if lrs is None:
        return None
    if isinstance(lrs, str):
        parts = [p.strip() for p in lrs.split(",") if p.strip()]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise UserInputError(f"--lrs must be comma-separated numbers (e.g. 1e-3,3e-3,1e-2), got {lrs!r}") from None
    else:
        values = list(lrs)
    if not values:
        raise UserInputError("--lrs is empty; give learning rates in increasing order, e.g. 1e-3,3e-3,1e-2")
    values = [require_positive_number("lr", v) for v in values]
    if any(b <= a for a, b in zip(values, values[1:])):
        raise UserInputError(f"--lrs must increase strictly, smallest first, without repeats; got "
                             f"{','.join(f'{v:g}' for v in values)}")
    return tuple(values)


def check_task_has_validation(task) -> None:
    """Selection needs validation data: the task must have a validation split (one clear error)."""
    from eval.tasks import load_task

    loaded = load_task(task)
    loaded.split("validation")  # raises UserInputError naming the task when it has none
    loaded.split("test")


# --------------------------------------------------------------------------- one run


def measure_protocol_point(method: str, lr: float, seed: int, model: str = "ref-lm", task: str | dict = "def-kind",
                           batch: int = 8, seq: int = 256, train_steps: int = 320, eval_every: int = 40,
                           patience: int = 3, warmup_ratio: float = WARMUP_RATIO, train_examples: int | None = None,
                           eval_batch_size: int = 16, device: str = "cpu", dtype: str | None = None,
                           baseline_options: dict | None = None) -> dict[str, Any]:
    """Train `method` at `lr` with `seed` (cosine schedule, warm-up, early stopping on validation
    accuracy) and score the best evaluation's model on validation and the whole test split
    (a `run_in_fresh_process` target)."""
    import torch

    from eval.tasks import load_task, task_accuracy
    from eval.train import EarlyStopping, TrainConfig, train
    from qst.baselines import BaselineConfig, build_tuning_model, labelled_positions_loss
    from qst.benchmark import _batches

    torch.manual_seed(seed)
    tuned, tokenizer = build_tuning_model(method, model=model, device=device, dtype=dtype,
                                          config=BaselineConfig(**(baseline_options or {})))
    loaded = load_task(task)
    batches = _batches(task, tokenizer, tuned.config.vocab_size, batch, seq, train_steps, seed, train_examples)
    side_tuning = hasattr(tuned, "parameter_groups")

    def validation(m):
        return {"validation_accuracy": task_accuracy(m, tokenizer, loaded, split="validation",
                                                     batch_size=eval_batch_size)}

    config = TrainConfig(max_steps=train_steps, lr=lr, seed=seed, max_grad_norm=1.0, schedule=SCHEDULE,
                         warmup_ratio=warmup_ratio, eval_every=eval_every)
    result = train(tuned, batches, config, desc=f"protocol {method} lr {lr:g} seed {seed}",
                   param_groups=tuned.parameter_groups(lr) if side_tuning else None,
                   loss_fn=None if side_tuning else labelled_positions_loss, eval_fn=validation,
                   early_stopping=EarlyStopping("validation_accuracy", patience=patience))
    tuned.eval()
    best = max(result.eval_history, key=lambda e: e["validation_accuracy"])
    return {
        "method": method, "lr": lr, "seed": seed,
        "validation_accuracy": best["validation_accuracy"],
        "best_step": result.best_step,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "test_accuracy": task_accuracy(tuned, tokenizer, loaded, split="test", batch_size=eval_batch_size),
        "validation_curve": [[e["step"], e["validation_accuracy"]] for e in result.eval_history],
        "losses": result.losses,
        "train_time_s": sum(result.step_times),
    }


# --------------------------------------------------------------------------- the whole protocol


def point_path(out_dir, method: str, lr: float, seed: int) -> Path:
    return Path(out_dir) / POINTS_DIR / method / f"lr{lr:g}-seed{seed}.json"


def claim_settings(out_dir, settings: ProtocolSettings) -> None:
    """Record the settings, or refuse a folder whose finished points were made with others."""
    from eval.io import read_json, write_json

    path = Path(out_dir) / SETTINGS_FILE
    wanted = _comparable(settings.to_dict())
    if path.is_file():
        found = _comparable(read_json(path, "protocol settings"))
        differ = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
        if differ:
            detail = "; ".join(f"{k}: {found.get(k)!r} there, {wanted.get(k)!r} now" for k in differ)
            raise UserInputError(f"--out {out_dir} holds protocol results made with other settings ({detail}); "
                                 "rerun with the same settings to resume, or choose another --out")
        return
    write_json(path, settings.to_dict())


def _comparable(d: dict) -> dict:
    # Methods may be added to a finished protocol: each keeps its own points. Everything else must match.
    return {k: v for k, v in d.items() if k not in ("methods", "lr_grids")} | {
        "lr_grids": {m: g for m, g in (d.get("lr_grids") or {}).items()}}


def run_protocol(settings: ProtocolSettings, out_dir, log=print,
                 point_target: str = f"{__name__}:measure_protocol_point", jobs: int = 1) -> dict[str, Any]:
    """Run (or resume) the grid and the seeds of every method; write the JSON, Markdown and PNG report.

    `jobs`: training runs at a time, each in its own process (every grid point of every method
    first, then the seeds at the selected rates); the results do not depend on it.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from eval.io import read_json, write_json
    from eval.measure import machine_info, run_in_fresh_process
    from eval.report import write_report

    check_task_has_validation(settings.task)  # before any training
    claim_settings(out_dir, settings)
    methods = settings.methods
    total = sum(len(settings.lr_grid(m)) for m in methods) + len(methods) * (settings.seeds - 1)
    common = dict(model=settings.model, task=settings.task, batch=settings.batch, seq=settings.seq,
                  train_steps=settings.train_steps, eval_every=settings.eval_every, patience=settings.patience,
                  warmup_ratio=settings.warmup_ratio, train_examples=settings.train_examples,
                  eval_batch_size=settings.eval_batch_size, device=settings.device, dtype=settings.compute_dtype,
                  baseline_options=settings.baseline_options())
    imports = (settings.model_package,) if settings.model_package else ()
    bar = tqdm(total=total, desc="bench --protocol", unit="run", dynamic_ncols=True)

    def point(method: str, lr: float, seed: int) -> dict:
        path = point_path(out_dir, method, lr, seed)
        if path.is_file():
            bar.update(1)
            return read_json(path, "protocol point")
        log(f"protocol: {method} lr {lr:g} seed {seed}")
        raw = run_in_fresh_process(point_target, {**common, "method": method, "lr": lr, "seed": seed},
                                   imports=imports)
        bar.update(1)
        if raw.get("error"):
            # Not saved: a run that failed (diverged, or its process was killed) is retried on resume.
            log(f"protocol: {method} lr {lr:g} seed {seed} failed: {raw['error']}")
            return {"method": method, "lr": lr, "seed": seed, "error": raw["error"]}
        write_json(path, raw)  # atomically: a killed protocol leaves no half-written run
        return raw

    def run_all(keys: list[tuple[str, float, int]]) -> dict[tuple[str, float, int], dict]:
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # each thread waits on its own process
            return dict(zip(keys, pool.map(lambda key: point(*key), keys)))

    require_positive("jobs", jobs)
    results: dict[str, dict] = {}
    try:
        grids = run_all([(m, lr, 0) for m in methods for lr in settings.lr_grid(m)])
        selected = {m: select_lr({lr: grids[(m, lr, 0)] for lr in settings.lr_grid(m)}) for m in methods}
        bar.update(sum(settings.seeds - 1 for m in methods if selected[m] is None))
        seeds = run_all([(m, selected[m], s) for m in methods if selected[m] is not None
                         for s in range(1, settings.seeds)])
        for m in methods:
            grid = {lr: grids[(m, lr, 0)] for lr in settings.lr_grid(m)}
            runs = [] if selected[m] is None else [grid[selected[m]]] + [
                seeds[(m, selected[m], s)] for s in range(1, settings.seeds)]
            results[m] = {"grid": grid, "selected_lr": selected[m], "runs": runs}
    finally:
        bar.close()

    data = summarize(settings, results)
    data["machine"] = machine_info()
    markdown = format_protocol_markdown(data)
    paths = write_report(out_dir, PROTOCOL_NAME, data, markdown, plots={PROTOCOL_NAME: _plot(data)},
                         figsize=(10, 4))
    return {"data": data, "markdown": markdown, "paths": paths}


def select_lr(grid: dict[float, dict]) -> float | None:
    """The learning rate with the best validation accuracy (ties: the smallest); None if all failed."""
    scored = [(lr, p["validation_accuracy"]) for lr, p in sorted(grid.items()) if p.get("validation_accuracy") is not None]
    if not scored:
        return None
    best = max(acc for _, acc in scored)
    return next(lr for lr, acc in scored if acc == best)


def mean_ci95(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and the half-width of its 95 % Student-t interval (None with fewer than two values)."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    from scipy.stats import t

    return mean, float(t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values)))


def summarize(settings: ProtocolSettings, results: dict[str, dict]) -> dict[str, Any]:
    methods = {}
    for method, r in results.items():
        tests = [p["test_accuracy"] for p in r["runs"] if p.get("test_accuracy") is not None]
        mean, ci = mean_ci95(tests)
        methods[method] = {
            "lr_grid": list(settings.lr_grid(method)),
            "validation_accuracy": {f"{lr:g}": p.get("validation_accuracy") for lr, p in r["grid"].items()},
            "selected_lr": r["selected_lr"],
            "test_accuracy": tests,
            "test_mean": mean,
            "test_ci95": ci,
            "seeds": [p["seed"] for p in r["runs"] if p.get("test_accuracy") is not None],
            "best_step": [p.get("best_step") for p in r["runs"]],
            "errors": {f"{lr:g}": p["error"] for lr, p in r["grid"].items() if p.get("error")},
            "validation_curves": {f"{lr:g}": p.get("validation_curve") for lr, p in r["grid"].items()},
        }
    paired = {}
    reference = methods.get(REFERENCE_METHOD)
    for method, m in methods.items():
        if method == REFERENCE_METHOD or reference is None:
            continue
        ours = dict(zip(m["seeds"], m["test_accuracy"]))
        theirs = dict(zip(reference["seeds"], reference["test_accuracy"]))
        common_seeds = sorted(set(ours) & set(theirs))
        differences = [ours[s] - theirs[s] for s in common_seeds]
        mean, ci = mean_ci95(differences)
        paired[f"{method}-{REFERENCE_METHOD}"] = {"mean": mean, "ci95": ci, "seeds": common_seeds,
                                                  "differences": differences}
    return {"model": settings.model, "task": settings.task, "settings": settings.to_dict(),
            "compute_dtype": settings.compute_dtype, "methods": methods, "paired": paired,
            **_base_rates(settings.task)}


def _base_rates(task) -> dict[str, float]:
    from collections import Counter

    from eval.tasks import load_task

    loaded = load_task(task)
    rates = {}
    for split in ("validation", "test"):
        examples = loaded.split(split)
        counts = Counter(loaded.target(e) for e in examples)
        rates[f"{split}_majority_rate"] = max(counts.values()) / len(examples)
        rates[f"{split}_examples"] = len(examples)
    return rates


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def format_protocol_markdown(data: dict) -> str:
    from eval.measure import machine_line
    from eval.report import markdown_table

    s = data["settings"]
    rows = []
    for method, m in data["methods"].items():
        grid = ", ".join(f"{lr}: {_pct(acc)}" for lr, acc in m["validation_accuracy"].items())
        rows.append({
            "method": method,
            "validation acc % by lr": grid,
            "selected lr": "—" if m["selected_lr"] is None else f"{m['selected_lr']:g}",
            "test acc % per seed": ", ".join(_pct(a) for a in m["test_accuracy"]) or "—",
            "test mean %": _pct(m["test_mean"]),
            "± 95 % CI": _pct(m["test_ci95"]),
        })
    paired = [{"pair": name, "seeds": len(p["seeds"]), "mean Δ (pts)": _pct(p["mean"]),
               "± 95 % CI": _pct(p["ci95"])} for name, p in data["paired"].items()]
    task = data["task"] if isinstance(data["task"], str) else data["task"].get("source")
    lines = [
        "# Tuning protocol",
        "",
        f"Model `{data['model']}`, task `{task}`, batch {s['batch']} x seq {s['seq']}, at most "
        f"{s['train_steps']} steps, AdamW with a cosine schedule after {100 * s['warmup_ratio']:g} % warm-up, "
        f"validation accuracy every {s['eval_every']} steps with early stopping (patience {s['patience']}), "
        f"{s['seeds']} seeds, every method computing in {data['compute_dtype']}"
        + (f", QST r {s['qst_r']}" if s.get("qst_r") else "")
        + (f", side head dim {s['qst_head_dim']}" if s.get("qst_head_dim") else "")
        + (f", side init {s['qst_side_init']}" if s.get("qst_side_init") else "") + ".",
        "",
        "The learning rate is chosen on the **validation** split (best accuracy; ties: the smaller rate); "
        "the test split is scored only at the chosen rate, once per seed (seed 0 is the grid run).",
        "",
        markdown_table(rows),
        "",
        f"Majority rate: validation {_pct(data['validation_majority_rate'])} % of {data['validation_examples']}, "
        f"test {_pct(data['test_majority_rate'])} % of {data['test_examples']} examples.",
        "",
    ]
    if paired:
        lines += ["Paired difference over seeds (same seed: same initialisation and data order):", "",
                  markdown_table(paired), ""]
    errors = [f"- {m} lr {lr}: {e}" for m, v in data["methods"].items() for lr, e in v["errors"].items()]
    if errors:
        lines += ["Failed grid points:", *errors, ""]
    lines.append(machine_line(data["machine"]) if data.get("machine") else "Machine: not recorded.")
    return "\n".join(lines) + "\n"


def _plot(data: dict):
    def draw(ax):
        fig = ax.figure
        ax.remove()
        left, right = fig.subplots(1, 2)
        for i, (method, m) in enumerate(data["methods"].items()):
            points = [(float(lr), acc) for lr, acc in m["validation_accuracy"].items() if acc is not None]
            if points:
                left.plot(*zip(*points), marker="o", label=method)
            right.scatter([i] * len(m["test_accuracy"]), m["test_accuracy"], label=method)
            if m["test_mean"] is not None:
                right.errorbar([i], [m["test_mean"]], yerr=[m["test_ci95"] or 0], fmt="_", color="black", capsize=6)
        left.set_xscale("log")
        left.set_xlabel("learning rate")
        left.set_ylabel("validation accuracy (best evaluation)")
        right.set_xticks(range(len(data["methods"])), list(data["methods"]))
        right.set_ylabel("test accuracy per seed, mean ± 95 % CI")
        right.axhline(data["test_majority_rate"], color="#C44E52", linestyle="--", linewidth=1, label="majority")
        for axis in (left, right):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)

    return draw
