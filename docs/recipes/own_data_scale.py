"""How fast a 100k-row user file gets to training, and how much memory its data takes (docs/results/own-data.md).

    python docs/recipes/own_data_scale.py --rows 100000 --out runs/own-data-scale

Writes OUT/reviews-ROWS.csv (a generated classification CSV: columns `review_text`, `stars`; the
texts are random words, so the numbers are about loading, not accuracy), then measures, each
in a fresh process:

- `load`: `eval.tasks.load_task` + `lm_batches` of the train split with ref-lm's tokenizer, on the
  whole train split and on a `--train-examples 2000` sample: wall and CPU time, and the process's
  peak RSS over its RSS after importing the libraries and loading the tokenizer (what the data costs);
- `tune`: the whole `slimtune tune --task FILE ... --steps 1 --skip-before --eval-examples 64`
  command (so an upper bound on its time to the first training step), first run (the CSV converted
  to Arrow) and second run (the Arrow cache reused): wall and CPU time, process peak RSS.

Results: OUT/own_data_scale.json and .md. On a machine shared by parallel jobs the wall times are
not claims; the CPU times are closer to what an idle single core would take.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

WORDS = ("good bad film plot actor scene slow fast warm cold story music light dark long short funny sad "
         "bright dull clever silly score camera cast script ending opening twist role voice drama").split()

LOAD = r"""
import json, resource, sys, time
from eval.models import load_causal_lm
from eval.tasks import TaskSpec, load_task, lm_batches
_, tokenizer = load_causal_lm("ref-lm")
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start, cpu = time.perf_counter(), time.process_time()
spec = json.loads(sys.argv[1])
task = load_task(TaskSpec(**spec))
loaded = time.perf_counter() - start
batches = lm_batches(task, "train", tokenizer, 8, 128, shuffle=True)
total, total_cpu = time.perf_counter() - start, time.process_time() - cpu
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"train": len(task.train), "test": len(task.test), "load_s": loaded, "load_and_batch_s": total, "load_and_batch_cpu_s": total_cpu,
                  "data_rss_bytes": peak - base}))
"""


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        f.write("review_text,stars\n")
        for _ in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))
            f.write(f"{text},{rng.randint(1, 5)}\n")


def run_load(path: Path, train_examples: int | None) -> dict:
    spec = {"source": str(path), "columns": {"text": "review_text", "label": "stars"},
            "train_examples": train_examples}
    out = subprocess.run([sys.executable, "-c", LOAD, json.dumps(spec)], check=True, capture_output=True, text=True,
                         env=_env())
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_tune(path: Path, out: Path) -> dict:
    command = [sys.executable, "-m", "scripts.cli", "tune", "--task", str(path), "--text-column", "review_text",
               "--label-column", "stars", "--steps", "1", "--batch", "8", "--seq", "128", "--skip-before",
               "--eval-examples", "64", "--out", str(out)]
    start, cpu = time.perf_counter(), _children_cpu()
    subprocess.run(command, check=True, capture_output=True, text=True, env=_env())
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    report = json.loads((out / "tune_report.json").read_text())
    return {"command_s": wall, "command_cpu_s": cpu, "process_peak_rss_bytes": report["process_peak_rss_bytes"],
            "train_examples": report["train_examples"]}


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"reviews-{args.rows}.csv"
    if not path.exists():
        write_csv(path, args.rows)
    results = {"rows": args.rows, "file_bytes": path.stat().st_size}
    import shutil

    for run in ("tune-first", "tune-cached"):
        shutil.rmtree(args.out / run, ignore_errors=True)
    shutil.rmtree(Path(os.environ.get("SLIMTUNE_CACHE", Path.home() / ".cache" / "slimtune")) / "datasets" / "csv",
                  ignore_errors=True)  # the first run converts the CSV to Arrow again
    results["tune_first"] = run_tune(path, args.out / "tune-first")
    results["tune_cached"] = run_tune(path, args.out / "tune-cached")
    results["load_all"] = run_load(path, None)
    results["load_sample_2000"] = run_load(path, 2000)
    (args.out / "own_data_scale.json").write_text(json.dumps(results, indent=2))
    mib = 2 ** 20
    lines = [f"# A {args.rows:,}-row CSV ({results['file_bytes'] / mib:.1f} MiB)", "",
             "| measurement | train examples | wall s | CPU s | memory MiB |", "|---|---|---|---|---|"]
    for name in ("load_all", "load_sample_2000"):
        r = results[name]
        lines.append(f"| load_task + lm_batches ({name}) | {r['train']:,} | {r['load_and_batch_s']:.1f} "
                     f"(load {r['load_s']:.1f}) | {r['load_and_batch_cpu_s']:.1f} | {r['data_rss_bytes'] / mib:.0f} "
                     "(peak RSS over tokenizer loaded) |")
    for name in ("tune_first", "tune_cached"):
        r = results[name]
        lines.append(f"| slimtune tune, 1 step + 64 test examples ({name}) | {r['train_examples']:,} | "
                     f"{r['command_s']:.1f} | {r['command_cpu_s']:.1f} | {r['process_peak_rss_bytes'] / mib:.0f} "
                     "(process peak RSS) |")
    (args.out / "own_data_scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
