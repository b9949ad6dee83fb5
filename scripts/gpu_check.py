"""The paper-scale CUDA measurements in one run; driven by `scripts/gpu_check.sh` (see README, "GPUs").

    python -m scripts.gpu_check prepare-wheels [--dest build/gpu-wheels]   # here, with network
    python -m scripts.gpu_check setup --venv V --wheels W [--device cuda]  # there: environment
    python -m scripts.gpu_check run --device cuda --out runs/gpu-check     # there: the measurements

`run` is the `slimtune bench` of two settings (LLaMA-2-7B shape at 4 x 384: qlora, qst, lora;
OPT-1.3B shape at 16 x 512: qlora, qst; random weights, each method in a fresh process) and
`pruning.speed.measure_pruned_speed` (in this process; LLaMA-2-7B shape, 50 % of the block parameters removed,
against dense, bf16), with the paper's numbers, the estimator's and the issue's targets side by
side in `gpu_check.json` / `gpu_check.md` under --out (rewritten after every stage, so a run cut
short keeps what it measured). `gpu_check.json` is the one machine-readable summary: `status`
(`running`, `complete`), `environment` (versions, and whether this transformers is one the script
was tested with), `setup` (the venv, its pip, what was installed from the carried wheels), the
benches, the pruning speed, `targets` (each with `met`: true / false / null when not measured)
and wall times. No method logic lives here. This module imports only the standard library at the
top, so `setup` runs on a bare interpreter.

Carried wheels are Python-independent (`py3-none-*`: bitsandbytes loads its CUDA library with
ctypes, einops is pure Python), so one folder serves whatever Python the GPU machine has; pip picks
them there with `--no-index`. matplotlib (for the PNGs) is carried only when asked for a named
Python (`--matplotlib-python 3.12`), since its wheels are built per Python version.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import venv
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = "gpu_check"
GB = 1e9

# Paper-measured peak memory, GB (QST paper; docs/METHODS.md §1): LLaMA-2-7B MMLU at 4 x 384, OPT-1.3B
# GLUE (classification) at 16 x 512.
PAPER_GB = {"llama-2-7b": {"qlora": 15.6, "qst": 7.3}, "opt-1.3b": {"qlora": 31.3, "qst": 17.7}}
# (name, arch, methods, batch, seq); --tiny swaps in the test architectures at small shapes.
BENCHES = [("llama-2-7b", "llama-2-7b", "qlora,qst,lora", 4, 384), ("opt-1.3b", "opt-1.3b", "qlora,qst", 16, 512)]
TINY_BENCHES = [("llama-2-7b", "tiny-llama", "qlora,qst,lora", 2, 32), ("opt-1.3b", "tiny-opt", "qlora,qst", 2, 32)]
PRUNE = {"arch": "llama-2-7b", "kept": 0.5, "batch": 8, "seq": 512, "rounds": 5}
TINY_PRUNE = {"arch": "tiny-llama", "kept": 0.5, "batch": 2, "seq": 32, "rounds": 2}
STEPS = {"full": {"steps": 5, "warmup": 2}, "tiny": {"steps": 1, "warmup": 1}}
TARGETS = {"mem_ratio": 2.1, "step_ratio": 3.0, "estimate_tolerance": 0.15, "prune_speedup": 1.4}

# What the measurements import beyond torch, transformers, peft and accelerate (module: wheel name).
# The first two are Python-independent wheels; matplotlib's are per Python version (see prepare_wheels).
CARRIED = {"bitsandbytes": "bitsandbytes", "einops": "einops", "matplotlib": "matplotlib"}
PYTHON_INDEPENDENT = ("bitsandbytes", "einops")
# transformers versions the dry run (tests/test_gpu_check.py) has passed with: the GPU machine's
# image and the development machine's. Another version runs too; the summary says it is untested.
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")
MIN_TRANSFORMERS = (5, 17)
SETUP_RECORD = "slimtune-gpu-setup.json"  # written into the venv by `setup`, read by `run`
BNB_KEEP = ("libbitsandbytes_cpu.so", "libbitsandbytes_cuda13")  # CUDA 13.x libraries and the CPU one
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                   "manylinux2014_x86_64")
PRESENT_THERE = ("numpy", "packaging")  # transformers needs both: not carried


class CheckError(Exception):
    """Bad input or a missing piece: one line saying what and how to provide it."""


# --------------------------------------------------------------------------- prepare-wheels (here)


def prepare_wheels(dest: Path, pip: list[str], matplotlib_pythons: tuple[str, ...] = ()) -> dict:
    """Download the carried wheels for Linux x86_64 into `dest`; bitsandbytes repacked.

    bitsandbytes and einops are Python-independent wheels (refused otherwise), so they fit any
    Python on the GPU machine. matplotlib and its dependencies are per Python version: fetched only
    for each version in `matplotlib_pythons` (the GPU machine's, if it lacks matplotlib).
    """
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        binary = ["--only-binary=:all:", "--implementation", "cp", *platforms, "-d", tmp]
        _pip(pip, ["download", "--no-deps", *binary, *PYTHON_INDEPENDENT])
        for wheel in sorted(Path(tmp).glob("*.whl")):
            if not _python_independent(wheel.name):
                raise CheckError(f"{wheel.name} is built for one Python version; expected a py3-none wheel "
                                 "(one that any Python on the GPU machine can install)")
        for version in matplotlib_pythons:
            _pip(pip, ["download", *binary, "--python-version", version, "matplotlib"])
        for wheel in sorted(Path(tmp).glob("*.whl")):
            name = wheel.name.split("-")[0].lower()
            if name in PRESENT_THERE:
                continue
            if name == "bitsandbytes":
                repack_bitsandbytes(wheel, dest / wheel.name)
            else:
                shutil.copy2(wheel, dest / wheel.name)
    files = sorted(dest.glob("*.whl"))
    return {"dest": str(dest), "wheels": {f.name: f.stat().st_size for f in files},
            "total_bytes": sum(f.stat().st_size for f in files)}


def _python_independent(wheel_name: str) -> bool:
    """`name-version(-build)-python-abi-platform.whl` with abi `none` and a python tag of any py3."""
    python_tag, abi = wheel_name[:-len(".whl")].split("-")[-3:-1]
    return abi == "none" and all(t.startswith("py") for t in python_tag.split("."))


def _pip(pip: list[str], args: list[str]) -> None:
    proc = subprocess.run([*pip, *args], capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise CheckError(f"`pip {' '.join(args[:2])} ...` failed: {' / '.join(tail)}")


def repack_bitsandbytes(src: Path, dst: Path) -> list[str]:
    """Copy the wheel without the native libraries other than BNB_KEEP; RECORD loses their lines.

    The kept files are byte-identical, so their RECORD hashes stay valid. Returns dropped names.
    """
    dropped = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith("libbitsandbytes_") and not base.startswith(BNB_KEEP):
                dropped.append(base)
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = ("\n".join(x for x in lines if x.split(",")[0].rsplit("/", 1)[-1] not in dropped)
                        + "\n").encode()
            zout.writestr(info, data)
    with zipfile.ZipFile(dst) as z:
        kept = [n.rsplit("/", 1)[-1] for n in z.namelist()]
    if not any(n.startswith("libbitsandbytes_cuda13") for n in kept):
        raise CheckError(f"{src.name} has no CUDA 13 library (libbitsandbytes_cuda13*.so); expected bitsandbytes >= 0.48")
    return dropped


# --------------------------------------------------------------------------- setup (there)


def setup(venv_dir: Path, wheels: Path, device: str) -> Path:
    """An environment in `venv_dir` that sees this interpreter's packages (torch untouched), with
    the carried wheels this machine lacks and the checkout installed. Returns its python.

    What was done is recorded in `venv_dir/SETUP_RECORD` for the summary of `run`."""
    if importlib.util.find_spec("torch") is None:  # the machine's own torch must be visible here
        raise CheckError(f"{sys.executable} has no torch; set PYTHON to the interpreter that has the machine's torch")
    _preflight_device(device)
    py = venv_dir / "bin" / "python"
    if not py.exists():
        _create_venv(venv_dir)
    _link_parent_site(venv_dir, py)
    pip = _pip_command(py)
    record = {"python": platform.python_version(), "venv": str(venv_dir), "pip": " ".join(pip[1:]),
              "wheels": str(wheels), "installed": [], "shadowed": []}
    missing = [m for m in CARRIED if not _importable(py, m)]
    if missing:
        record["installed"] = _install_carried(pip, wheels, missing)
    if device.startswith("cuda") and "bitsandbytes" not in missing and not _bnb_has_cuda_library(py):
        record["shadowed"] = _install_carried(pip, wheels, ["bitsandbytes"], shadow=True)  # one with the library
    editable = subprocess.run([*pip, "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
                               "-e", str(REPO)], capture_output=True, text=True)
    record["checkout"] = "pip install -e" if editable.returncode == 0 else ".pth file"
    if editable.returncode:  # no setuptools here: the checkout on the path does the same
        (_site_dir(py) / "slimtune-checkout.pth").write_text(f"{REPO}\n")
        print(f"gpu_check: pip install -e failed ({_last_line(editable)}); checkout put on the path instead",
              file=sys.stderr)
    (venv_dir / SETUP_RECORD).write_text(json.dumps(record, indent=1))
    return py


def _create_venv(venv_dir: Path) -> None:
    """A venv with its own pip (ensurepip installs the one bundled with Python: no network). An
    interpreter without ensurepip (Debian's python3 without python3-venv) gets a venv without pip;
    `_pip_command` then drives it with this interpreter's pip."""
    try:
        venv.EnvBuilder(with_pip=True, symlinks=True).create(venv_dir)
    except subprocess.CalledProcessError:
        shutil.rmtree(venv_dir, ignore_errors=True)
        venv.EnvBuilder(with_pip=False, symlinks=True).create(venv_dir)


def _pip_command(py: Path) -> list[str]:
    """The command that installs into the venv of `py`: its own pip, else this interpreter's pip
    pointed at it (`pip --python`, pip >= 22.3)."""
    for command in ([str(py), "-m", "pip"], [sys.executable, "-m", "pip", "--python", str(py)]):
        if subprocess.run([*command, "--version"], capture_output=True).returncode == 0:
            return command
    raise CheckError(f"no pip can install into {py.parent.parent}: neither it nor {sys.executable} has pip "
                     "(or ensurepip); install python3-venv or pip for this Python")


def _preflight_device(device: str) -> None:
    """--device cuda where there is no CUDA: say so before anything is installed."""
    if not device.startswith("cuda"):
        return
    sys.path.insert(0, str(REPO))
    from eval.errors import UserInputError
    from eval.models import resolve_device

    try:
        resolve_device(device)  # bitsandbytes is checked by `run`, once the carried wheels are in
    except UserInputError as e:
        raise CheckError(str(e)) from e


def _site_dir(py: Path) -> Path:
    out = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _link_parent_site(venv_dir: Path, py: Path) -> None:
    """The new environment reads this interpreter's site-packages (also when it is itself a venv)."""
    import site

    dirs = [*site.getsitepackages()]
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    lines = "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)
    (_site_dir(py) / "zz-slimtune-parent-site.pth").write_text(lines)


def _importable(py: Path, module: str) -> bool:
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([str(py), "-c", code], capture_output=True).returncode == 0


def _bnb_has_cuda_library(py: Path) -> bool:
    """Whether the bitsandbytes `py` imports has a library for this torch's CUDA major version."""
    code = ("import importlib.util, pathlib; from eval.models import check_bitsandbytes_cuda; "
            "check_bitsandbytes_cuda(package_dir=pathlib.Path(importlib.util.find_spec('bitsandbytes').origin).parent)")
    return subprocess.run([str(py), "-c", code], capture_output=True, cwd=REPO).returncode == 0


def _install_carried(pip: list[str], wheels: Path, missing: list[str], shadow: bool = False) -> list[str]:
    """Install the carried wheels of `missing` modules into the venv, from `wheels` only (no
    index: pip picks the wheel that fits this machine's Python); `shadow`: over one the machine
    has (a copy in the venv, found first; the machine's own stays as it is). Returns the names."""
    names = [CARRIED[m] for m in missing]
    have = {w.name.split("-")[0].lower() for w in wheels.glob("*.whl")} if wheels.is_dir() else set()
    absent = [n for n in names if n.lower() not in have]
    if absent:
        lacking = "a bitsandbytes with a CUDA library for this torch" if shadow else ", ".join(absent)
        how = ("`bash scripts/gpu_check.sh --prepare-wheels"
               + (f" --matplotlib-python {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}"
                  if "matplotlib" in absent else "") + "`")
        raise CheckError(
            f"this machine lacks {lacking} and {wheels} holds no wheel for it; on a machine with network run "
            f"{how} and carry build/gpu-wheels/ here"
            + (" (the 4-bit methods need bitsandbytes' CUDA library)" if "bitsandbytes" in absent else "")
        )
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pin:
        pin.write(f"torch=={importlib.metadata.version('torch')}\n")  # pinned: nothing carried replaces it
    # The Python-independent ones go in as they are (their needs, torch, numpy and packaging, are
    # the machine's), also over a copy pip would call installed: the module did not import.
    independent = [n for n in names if n in PYTHON_INDEPENDENT]
    resolved = [n for n in names if n not in PYTHON_INDEPENDENT]  # matplotlib: with its carried needs
    base = [*pip, "install", "-q", "--no-index", "--find-links", str(wheels), "-c", pin.name]
    commands = ([[*base, "--ignore-installed", "--no-deps", *independent]] if independent else []) + \
        ([[*base, *resolved]] if resolved else [])
    failed = None
    try:
        for command in commands:
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode:
                failed = proc
                break
    finally:
        os.unlink(pin.name)
    if failed is not None:
        raise CheckError(
            f"installing {', '.join(names)} from {wheels} failed: {_last_line(failed)}; were the wheels prepared for "
            f"this Python ({platform.python_version()})? `bash scripts/gpu_check.sh --prepare-wheels "
            "--matplotlib-python X.Y` adds matplotlib for Python X.Y"
        )
    print(f"gpu_check: installed {', '.join(names)} from {wheels}", file=sys.stderr)
    return names


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {proc.returncode}"


# --------------------------------------------------------------------------- run (there)


def run(device: str, tiny: bool, out: Path, log=print) -> dict:
    from eval.errors import UserInputError
    from eval.models import resolve_device

    if out.exists() and not out.is_dir():
        raise CheckError(f"--out {out} is a file; expected a directory")
    try:
        resolve_device(device, four_bit=True)  # CUDA, and bitsandbytes' CUDA library
    except UserInputError as e:
        raise CheckError(str(e)) from e
    environment = _environment(device)
    if environment["transformers_version_ok"] is False:
        raise CheckError(f"transformers {environment['transformers']} is older than "
                         f"{'.'.join(map(str, MIN_TRANSFORMERS))}, the oldest this suite runs on")
    data = {"status": "running", "device": device, "tiny": tiny, "environment": environment,
            "setup": _setup_record(), "benches": {}, "pruning_speed": None, "targets": [], "wall_s": {}}
    start = time.perf_counter()
    for name, arch, methods, batch, seq in (TINY_BENCHES if tiny else BENCHES):
        t0 = time.perf_counter()
        data["benches"][name] = _bench(arch, methods, batch, seq, device, tiny, out / name, log)
        data["wall_s"][name] = time.perf_counter() - t0
        _write(out, data)
    t0 = time.perf_counter()
    data["pruning_speed"] = _prune_speed(device, tiny, log)
    data["wall_s"]["pruning_speed"] = time.perf_counter() - t0
    data["wall_s"]["total"] = time.perf_counter() - start
    data["status"] = "complete"
    _write(out, data)
    return data


def _setup_record() -> dict | None:
    """What `setup` did, when this interpreter is the venv it made."""
    path = Path(sys.prefix) / SETUP_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _bench(arch, methods, batch, seq, device, tiny, out: Path, log) -> dict:
    from qst.benchmark import BenchSettings, run_bench

    steps = STEPS["tiny" if tiny else "full"]
    settings = BenchSettings(model=None, arch=arch, methods=methods, batch=batch, seq=seq, train_steps=0,
                             device=device, **steps)
    data = run_bench(settings, out, log=log)["data"]
    return {"arch": arch, "batch": batch, "seq": seq, "methods": data["methods"], "floor": data["floor"],
            "estimates": data["estimates"], "report": str(out / "bench_tuning.md")}


def _prune_speed(device: str, tiny: bool, log) -> dict:
    """In this process (both models must share one anyway): a fresh one would only add start-up time."""
    import traceback

    from pruning.speed import measure_pruned_speed

    spec = TINY_PRUNE if tiny else PRUNE
    log(f"gpu_check: [pruning] {spec['arch']}, {100 * (1 - spec['kept']):.0f} % of the block parameters removed "
        f"(random DISP-style masks) vs dense, bf16, batch {spec['batch']} x {spec['seq']}")
    try:
        return measure_pruned_speed(**spec, device=device, dtype="bfloat16", seed=0)
    except Exception as e:  # noqa: BLE001 - reported with the rest; the benches' numbers stand
        log(f"gpu_check: [pruning] failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def _environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda")
           else platform.processor() or platform.machine()}
    for package in ("transformers", "peft", "accelerate", "bitsandbytes", "einops", "matplotlib"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = None
    env["transformers_tested"] = env["transformers"] in TESTED_TRANSFORMERS
    env["transformers_version_ok"] = (None if env["transformers"] is None else
                                      tuple(int(x) for x in env["transformers"].split(".")[:2]) >= MIN_TRANSFORMERS)
    return env


def _write(out: Path, data: dict) -> None:
    from eval.report import write_report

    data["targets"] = targets(data)
    write_report(out, REPORT, data, format_markdown(data))


# --------------------------------------------------------------------------- targets and report


def _ok(method: dict | None) -> bool:
    return bool(method) and not method.get("error")


def _allocator_estimate(bench: dict, method: str) -> float:
    """The estimate without its CUDA-context term: max_memory_allocated never sees the context."""
    estimate = bench["estimates"][method]
    return estimate["total_bytes"] - estimate["breakdown_bytes"].get("cuda_context", 0.0)


def targets(data: dict) -> list[dict]:
    """The issue's targets against this run; `met` is None where something failed to measure."""
    rows = []
    llama = data["benches"].get("llama-2-7b")
    if llama:
        qlora, qst = llama["methods"].get("qlora"), llama["methods"].get("qst")
        both = _ok(qlora) and _ok(qst)
        mem = qlora["peak_memory_bytes"] / qst["peak_memory_bytes"] if both else None
        step = qlora["step_time_s"] / qst["step_time_s"] if both else None
        rows.append(_target(f"LLaMA-2-7B 4x384: QLoRA / QST peak memory >= {TARGETS['mem_ratio']} (paper 15.6 / 7.3)",
                            mem, None if mem is None else mem >= TARGETS["mem_ratio"]))
        rows.append(_target(f"LLaMA-2-7B 4x384: QLoRA / QST step time >= {TARGETS['step_ratio']}",
                            step, None if step is None else step >= TARGETS["step_ratio"]))
    for name, bench in data["benches"].items():
        for method, m in bench["methods"].items():
            if not _ok(m):
                rows.append(_target(f"{name} {method}: estimate within 15 % of the peak", None, None))
                continue
            err = _allocator_estimate(bench, method) / m["peak_memory_bytes"] - 1
            rows.append(_target(f"{name} {method}: estimate within 15 % of the peak (estimate / peak - 1)",
                                err, abs(err) <= TARGETS["estimate_tolerance"]))
    prune = data.get("pruning_speed")
    if prune is not None:
        speedup = None if prune.get("error") else prune["speedup"]
        rows.append(_target(f"pruned (50 % of block params removed) / dense tokens/s >= {TARGETS['prune_speedup']}",
                            speedup, None if speedup is None else speedup >= TARGETS["prune_speedup"]))
    return rows


def _target(what: str, value, met) -> dict:
    return {"target": what, "value": value, "met": met}


def _gb(n):
    return None if n is None else n / GB


def format_markdown(data: dict) -> str:
    from eval.report import markdown_table

    env = data["environment"]
    dry = data["tiny"] or not data["device"].startswith("cuda")
    lines = [
        "# GPU check: paper-scale tuning memory and speed, pruned-model speed",
        "",
        f"Device `{data['device']}` ({env['device_name']}), torch {env['torch']} (CUDA {env['cuda']}), "
        f"transformers {env['transformers']}, peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, "
        f"Python {env['python']}. Random weights; memory and speed only.",
        "",
    ]
    if not env.get("transformers_tested", True):
        lines += [f"transformers {env['transformers']} is not one the dry run was tested with "
                  f"({', '.join(TESTED_TRANSFORMERS)}).", ""]
    if dry:
        lines += ["**Dry run** (" + ("tiny shapes" if data["tiny"] else "CPU") + "): these numbers test the script, "
                  "they measure none of the targets.", ""]
    rows = []
    for name, bench in data["benches"].items():
        floor = bench["floor"].get("forward_time_s")
        for method, m in bench["methods"].items():
            row = {"model": name, "arch": bench["arch"], "batch x seq": f"{bench['batch']} x {bench['seq']}",
                   "method": method}
            if not _ok(m):
                rows.append({**row, "error": (m or {}).get("error", "not run")})
                continue
            estimate = _allocator_estimate(bench, method)
            rows.append({**row, "peak GB": _gb(m["peak_memory_bytes"]), "estimate GB": _gb(estimate),
                         "estimate / peak": estimate / m["peak_memory_bytes"],
                         "paper GB": PAPER_GB.get(name, {}).get(method), "step s": m["step_time_s"],
                         "tokens/s": round(m["tokens_per_s"]), "floor s": floor,
                         "step / floor": m["step_time_s"] / floor if floor else None})
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        lines += [markdown_table(rows, columns, floatfmt=".4g")]
    lines += [
        "Peak = `torch.cuda.max_memory_allocated` during training (CPU: peak RSS increment + parameters). "
        "Estimate = `slimtune estimate-memory` with the measured trainable count, without its 1 GB CUDA-context "
        "term (the allocator never sees the context). Floor = no-grad forward of the 4-bit backbone. Paper: "
        "QST paper's measured memory (OPT-1.3B: GLUE classification, not LM logits). Each bench's own report "
        "is under its model's folder.",
        "",
    ]
    prune = data.get("pruning_speed")
    if prune:
        lines += ["## Pruned vs dense tokens/s", ""]
        if prune.get("error"):
            lines += [f"Failed: {prune['error']}", ""]
        else:
            lines += [markdown_table([
                {"model": f"{prune['arch']} dense", "params": prune["params_dense"], "block params kept": 1.0,
                 "tokens/s": round(prune["tokens_per_s_dense"]), "vs dense": 1.0},
                {"model": f"{prune['arch']} random DISP-style masks", "params": prune["params_pruned"],
                 "block params kept": prune["block_params_kept"], "tokens/s": round(prune["tokens_per_s_pruned"]),
                 "vs dense": prune["speedup"]},
            ], floatfmt=".4g"),
                f"Forward of a [{prune['batch']}, {prune['seq']}] batch in {prune['dtype']}, both models in one "
                f"process, {prune['rounds']} alternating rounds (median of 3 after 1 warm-up each).", ""]
    lines += ["## Targets", "", markdown_table(
        [{"target": t["target"], "value": t["value"], "met": t["met"]} for t in data["targets"]], floatfmt=".3f")]
    if data["wall_s"]:
        lines += ["Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in data["wall_s"].items()), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-wheels", help="download and repack the carried wheels (needs network)")
    prep.add_argument("--dest", default=str(REPO / "build" / "gpu-wheels"))
    prep.add_argument("--matplotlib-python", action="append", default=[], metavar="X.Y",
                      help="also carry matplotlib for this Python version (only if the GPU machine lacks it; "
                      "repeatable)")
    prep.add_argument("--pip", default=f"{sys.executable} -m pip", help="the pip command to download with")
    for name, helps in (("setup", "an environment with the carried wheels and the checkout"),
                        ("run", "the measurements")):
        p = sub.add_parser(name, help=helps)
        p.add_argument("--device", default="cuda", help="cpu or cuda[:N]")
        p.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
        p.add_argument("--out", default="runs/gpu-check", help="output directory")
        if name == "setup":
            p.add_argument("--venv", default=str(REPO / "build" / "gpu-venv"))
            p.add_argument("--wheels", default=str(REPO / "build" / "gpu-wheels"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare-wheels":
            result = prepare_wheels(Path(args.dest), args.pip.split(), tuple(args.matplotlib_python))
            print(json.dumps(result, indent=1))
        elif args.command == "setup":
            print(setup(Path(args.venv), Path(args.wheels), args.device))
        else:
            from eval.console import quiet_library_logs

            quiet_library_logs()
            run(args.device, args.tiny, Path(args.out), log=lambda line: print(line, file=sys.stderr, flush=True))
            print((Path(args.out) / f"{REPORT}.md").read_text(encoding="utf-8"))
    except CheckError as e:
        print(f"gpu_check: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
