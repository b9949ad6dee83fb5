"""scripts/gpu_check.sh: the CPU dry run of the GPU script (same path, tiny shapes: a fresh venv
with its own pip, a carried wheel installed with `pip --no-index` and no network, the JSON
summary), the suite without lm-eval and datasets, the carried bitsandbytes wheel, random
DISP-style pruning, and bad input (no CUDA; no bitsandbytes CUDA library)."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from eval.errors import UserInputError
from eval.models import check_bitsandbytes_cuda, resolve_device
from scripts import gpu_check

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu_check.sh"
HIDDEN = ("lm_eval", "datasets")  # absent on the GPU machine; only zero-shot needs them
# Present here but treated as absent on the GPU machine: the dry run must install it from a carried
# wheel into its fresh venv (a pure-Python one, repacked from this environment's copy).
CARRIED_IN_DRY_RUN = "einops"

# Imported first by every Python process started with this directory on PYTHONPATH (the script,
# its venv, every bench worker): importing a hidden package fails as it would where it is absent.
# SLIMTUNE_TEST_CARRY modules are importable only from under SLIMTUNE_TEST_CARRY_ROOT (the dry run's
# venv): until the script installs them there, they are missing, as on the GPU machine.
SITECUSTOMIZE = textwrap.dedent("""
    import os, sys
    from importlib.machinery import PathFinder

    class _Hide:
        hidden = set(filter(None, os.environ.get("SLIMTUNE_TEST_HIDE", "").split(",")))
        carried = set(filter(None, os.environ.get("SLIMTUNE_TEST_CARRY", "").split(",")))
        root = os.path.realpath(os.environ.get("SLIMTUNE_TEST_CARRY_ROOT") or os.devnull) + os.sep

        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in self.hidden:
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
            if top in self.carried and path is None:
                inside = [p for p in sys.path if os.path.realpath(p or ".").startswith(self.root)]
                spec = PathFinder.find_spec(name, inside)
                if spec is None:
                    raise ModuleNotFoundError(f"No module named {name!r} (carried: not installed yet)", name=name)
                return spec
            return None

    sys.meta_path.insert(0, _Hide())
""")


def _wheel_of_installed(distribution: str, dest: Path) -> Path:
    """A py3-none-any wheel of an installed pure-Python distribution, with a valid RECORD."""
    dist = importlib.metadata.distribution(distribution)
    info = next(f.parent for f in dist.files if f.name == "METADATA")
    path = dest / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}-py3-none-any.whl"
    dest.mkdir(parents=True, exist_ok=True)
    records = []
    with zipfile.ZipFile(path, "w") as wheel:
        for f in dist.files:
            if "__pycache__" in f.parts or (f.parent == info and f.name not in ("METADATA", "WHEEL")):
                continue  # compiled files and what the installer wrote (RECORD, INSTALLER, direct_url)
            data = f.locate().read_bytes()
            wheel.writestr(str(f), data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{f},sha256={digest},{len(data)}")
        wheel.writestr(f"{info}/RECORD", "\n".join([*records, f"{info}/RECORD,,"]) + "\n")
    return path


@pytest.fixture(scope="module")
def hiding_env(tmp_path_factory) -> dict[str, str]:
    site = tmp_path_factory.mktemp("hide")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
            "SLIMTUNE_TEST_HIDE": ",".join(HIDDEN), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, hiding_env):
    """One dry run of the script exactly as on the GPU machine, with --device cpu --tiny."""
    tmp = tmp_path_factory.mktemp("gpu-check")
    _wheel_of_installed(CARRIED_IN_DRY_RUN, tmp / "wheels")
    offline = {"PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull, "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    env = {**hiding_env, **offline, "SLIMTUNE_GPU_VENV": str(tmp / "venv"), "SLIMTUNE_GPU_WHEELS": str(tmp / "wheels"),
           "SLIMTUNE_TEST_CARRY": CARRIED_IN_DRY_RUN, "SLIMTUNE_TEST_CARRY_ROOT": str(tmp / "venv")}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp / "out")],
                          env=env, capture_output=True, text=True, timeout=1800)  # a busy shared machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_dry_run_writes_every_measurement(dry_run):
    tmp, proc = dry_run
    data = json.loads((tmp / "out" / "gpu_check.json").read_text())
    assert data["status"] == "complete" and data["device"] == "cpu" and data["tiny"] is True
    env = data["environment"]
    assert env["transformers_version_ok"] is True
    assert env["transformers_tested"] == (env["transformers"] in gpu_check.TESTED_TRANSFORMERS)
    assert set(data["benches"]) == {"llama-2-7b", "opt-1.3b"}
    expected = {"llama-2-7b": ("tiny-llama", ["qlora", "qst", "lora"]), "opt-1.3b": ("tiny-opt", ["qlora", "qst"])}
    for name, (arch, methods) in expected.items():
        bench = data["benches"][name]
        assert bench["arch"] == arch and list(bench["methods"]) == methods
        assert bench["floor"]["forward_time_s"] > 0 and not bench["floor"].get("error")
        for method, m in bench["methods"].items():
            assert m.get("error") is None, (name, method, m.get("error"))
            assert m["peak_memory_bytes"] > 0 and m["step_time_s"] > 0 and m["tokens_per_s"] > 0
            assert bench["estimates"][method]["total_bytes"] > 0
        assert (tmp / "out" / name / "bench_tuning.json").is_file()
    prune = data["pruning_speed"]
    assert prune.get("error") is None, prune.get("error")
    assert prune["arch"] == "tiny-llama" and prune["dtype"] == "bfloat16"
    assert abs(prune["block_params_kept"] - 0.5) < 0.05 and prune["params_pruned"] < prune["params_dense"]
    assert prune["tokens_per_s_dense"] > 0 and prune["tokens_per_s_pruned"] > 0
    # two LLaMA ratios, one estimate check per method, the pruning speed-up
    assert len(data["targets"]) == 2 + 5 + 1 and all(t["value"] is not None for t in data["targets"])
    markdown = (tmp / "out" / "gpu_check.md").read_text()
    assert "**Dry run**" in markdown and "## Targets" in markdown and "random DISP-style masks" in markdown
    assert markdown in proc.stdout  # the run prints its report


def test_dry_run_installed_the_checkout_in_its_own_environment(dry_run):
    tmp, _ = dry_run
    py = tmp / "venv" / "bin" / "python"
    code = "import scripts.gpu_check as g, torch; print(g.__file__); print(torch.__file__)"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp, check=True).stdout.split()
    assert Path(out[0]).resolve() == (REPO / "scripts" / "gpu_check.py").resolve()  # found from outside the repo
    assert Path(out[1]).resolve() == Path(torch.__file__).resolve()  # this interpreter's torch, not a copy


def test_dry_run_installed_the_carried_wheel_offline_with_the_venvs_own_pip(dry_run):
    tmp, proc = dry_run
    venv_dir = (tmp / "venv").resolve()
    setup = json.loads((tmp / "out" / "gpu_check.json").read_text())["setup"]
    assert setup["installed"] == [CARRIED_IN_DRY_RUN] and setup["shadowed"] == []
    assert setup["pip"] == "-m pip"  # the venv's own pip (ensurepip), not the parent's
    assert f"installed {CARRIED_IN_DRY_RUN} from {tmp / 'wheels'}" in proc.stderr
    code = f"import pip, {CARRIED_IN_DRY_RUN} as m; print(pip.__file__); print(m.__file__)"
    out = subprocess.run([str(tmp / "venv" / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert all(Path(f).resolve().is_relative_to(venv_dir) for f in out), out


def test_suite_imports_without_lm_eval_and_datasets(hiding_env):
    code = ("import sys, eval, qst, pruning, lowrank_vit, scripts.cli\n"
            "scripts.cli.build_parser()\n"
            "import qst.benchmark, qst.baselines, pruning.speed, scripts.gpu_check, eval.train, eval.report\n"
            "try:\n    import lm_eval\nexcept ImportError:\n    pass\nelse:\n    sys.exit('lm_eval was not hidden')\n"
            "assert not {'lm_eval', 'datasets'} & set(sys.modules), sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=hiding_env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]


# --------------------------------------------------------------------------- bad input


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_clear_error(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "SLIMTUNE_GPU_VENV": str(tmp_path / "venv")}
    proc = subprocess.run(["bash", str(SCRIPT), "--device", "cuda", "--out", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: error: device='cuda' was asked for but CUDA is not"), lines
    assert "CPU-only build" in lines[0] and "NVIDIA GPU" in lines[0]
    assert not (tmp_path / "venv").exists()  # refused before anything was installed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_in_the_library_and_bench():
    from qst.benchmark import BenchSettings

    with pytest.raises(UserInputError, match="CUDA is not available here: this torch is a CPU-only build"):
        resolve_device("cuda", four_bit=True)
    with pytest.raises(UserInputError, match="CUDA is not available here"):
        BenchSettings(arch="tiny-llama", methods="qst", device="cuda")
    assert resolve_device("cpu", four_bit=True) == torch.device("cpu")


def _fake_bnb(directory: Path, libs: list[str]) -> Path:
    directory.mkdir()
    for name in libs:
        (directory / name).write_bytes(b"")
    return directory


def test_missing_bitsandbytes_cuda_library_says_how_to_provide_it(tmp_path):
    cpu_only = _fake_bnb(tmp_path / "cpu-only", ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so"])
    with pytest.raises(UserInputError) as e:
        check_bitsandbytes_cuda(cuda_version="13.0", package_dir=cpu_only)
    message = str(e.value)
    assert "no CUDA 13.x library" in message and "libbitsandbytes_cuda128.so" in message
    assert "--prepare-wheels" in message and "build/gpu-wheels" in message
    repacked = _fake_bnb(tmp_path / "repacked", ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda132.so"])
    # bitsandbytes falls back within the major version: CUDA 13.0 and 13.1 load the 13.2 library
    assert check_bitsandbytes_cuda(cuda_version="13.0", package_dir=repacked).name == "libbitsandbytes_cuda132.so"
    with pytest.raises(UserInputError, match="no CUDA 12.x library"):
        check_bitsandbytes_cuda(cuda_version="12.8", package_dir=repacked)


def test_bitsandbytes_not_installed_says_how_to_provide_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as where it is absent
    with pytest.raises(UserInputError, match=r"bitsandbytes is not installed.*--prepare-wheels"):
        check_bitsandbytes_cuda(cuda_version="13.0")


def test_setup_without_a_carried_wheel_says_how_to_provide_it(tmp_path):
    pip = [sys.executable, "-m", "pip"]
    with pytest.raises(gpu_check.CheckError, match=r"lacks bitsandbytes.*--prepare-wheels"):
        gpu_check._install_carried(pip, tmp_path / "empty", ["bitsandbytes"])
    with pytest.raises(gpu_check.CheckError, match=r"lacks a bitsandbytes with a CUDA library for this torch"):
        gpu_check._install_carried(pip, tmp_path / "empty", ["bitsandbytes"], shadow=True)
    version = ".".join(map(str, sys.version_info[:2]))
    with pytest.raises(gpu_check.CheckError, match=rf"lacks matplotlib.*--prepare-wheels --matplotlib-python {version}"):
        gpu_check._install_carried(pip, tmp_path / "empty", ["matplotlib"])


def test_only_python_independent_wheels_are_carried_for_any_python():
    assert gpu_check._python_independent("bitsandbytes-0.49.0-py3-none-manylinux_2_24_x86_64.whl")
    assert gpu_check._python_independent("einops-0.8.1-py3-none-any.whl")
    assert gpu_check._python_independent("six-1.17.0-py2.py3-none-any.whl")
    assert not gpu_check._python_independent("matplotlib-3.10.0-cp312-cp312-manylinux_2_17_x86_64.whl")
    assert not gpu_check._python_independent("kiwisolver-1.4.8-cp312-abi3-manylinux_2_17_x86_64.whl")
    assert set(gpu_check.PYTHON_INDEPENDENT) == {"bitsandbytes", "einops"}


# --------------------------------------------------------------------------- the carried wheel


def _wheel(path: Path, libs: list[str]) -> Path:
    files = {"bitsandbytes/__init__.py": b"", **{f"bitsandbytes/{lib}": b"\0" * 16 for lib in libs}}
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes-0.50.2.dist-info/RECORD,,\n")
    return path


def test_repack_keeps_only_the_cuda13_and_cpu_libraries(tmp_path):
    libs = ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda128.so", "libbitsandbytes_cuda130.so",
            "libbitsandbytes_cuda132.so", "libbitsandbytes_rocm70.so"]
    src = _wheel(tmp_path / "src.whl", libs)
    dropped = gpu_check.repack_bitsandbytes(src, tmp_path / "out.whl")
    assert sorted(dropped) == ["libbitsandbytes_cuda128.so", "libbitsandbytes_rocm70.so"]
    with zipfile.ZipFile(tmp_path / "out.whl") as z:
        names = sorted(n.rsplit("/", 1)[-1] for n in z.namelist())
        record = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert names == ["RECORD", "__init__.py", "libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so",
                     "libbitsandbytes_cuda132.so"]
    assert "cuda128" not in record and "rocm70" not in record and "cuda130" in record


def test_repack_refuses_a_wheel_without_cuda13(tmp_path):
    src = _wheel(tmp_path / "old.whl", ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda126.so"])
    with pytest.raises(gpu_check.CheckError, match="no CUDA 13 library"):
        gpu_check.repack_bitsandbytes(src, tmp_path / "out.whl")


# --------------------------------------------------------------------------- targets and pruning


def _bench(peaks: dict[str, float], steps: dict[str, float], estimates: dict[str, float]) -> dict:
    return {"arch": "llama-2-7b", "batch": 4, "seq": 384, "floor": {"forward_time_s": 0.1},
            "methods": {m: {"peak_memory_bytes": peaks[m], "step_time_s": steps[m], "tokens_per_s": 1.0}
                        for m in peaks},
            "estimates": {m: {"total_bytes": estimates[m] + 1e9, "breakdown_bytes": {"cuda_context": 1e9}}
                          for m in estimates}}


def test_targets_compare_like_with_like():
    """Ratios against QLoRA; the estimate without its CUDA-context term against max_memory_allocated."""
    bench = _bench({"qlora": 15.6e9, "qst": 7.3e9}, {"qlora": 0.9, "qst": 0.25}, {"qlora": 14.0e9, "qst": 8.5e9})
    rows = gpu_check.targets({"benches": {"llama-2-7b": bench}, "pruning_speed": {"speedup": 1.3}})
    values = [(round(r["value"], 3), r["met"]) for r in rows]
    assert values == [(2.137, True), (3.6, True), (round(14.0 / 15.6 - 1, 3), True),
                      (round(8.5 / 7.3 - 1, 3), False), (1.3, False)], rows


def test_a_failed_method_leaves_its_targets_unmeasured():
    bench = _bench({"qlora": 15.6e9}, {"qlora": 0.9}, {"qlora": 14.0e9, "qst": 7.0e9})
    bench["methods"]["qst"] = {"error": "RuntimeError: CUDA out of memory"}
    rows = gpu_check.targets({"benches": {"llama-2-7b": bench}, "pruning_speed": {"error": "boom"}})
    assert [r["met"] for r in rows] == [None, None, True, None, None]


def test_random_disp_plan_is_dimension_independent_and_on_budget(tiny_llama_dir):
    from eval.models import load_causal_lm
    from pruning import block_params
    from pruning.speed import pruned_speed, random_disp_plan

    model, _ = load_causal_lm(str(tiny_llama_dir))
    plan = random_disp_plan(model, kept=0.5, seed=1)
    first = plan.layers[0]
    assert len({tuple(first[m]) for m in ("attn_in", "attn_out", "mlp_in", "mlp_out")}) > 1  # own subsets
    assert plan.layers[0]["attn_in"] != plan.layers[1]["attn_in"]
    assert plan == random_disp_plan(model, kept=0.5, seed=1)  # reproducible from the seed
    result = pruned_speed(model, kept=0.5, batch=1, seq=8, rounds=1)
    assert result["block_params_dense"] == block_params(model)
    assert abs(result["block_params_kept"] - 0.5) < 0.05
    assert result["speedup"] == pytest.approx(result["tokens_per_s_pruned"] / result["tokens_per_s_dense"])
    with pytest.raises(UserInputError, match="kept must be a fraction"):
        random_disp_plan(model, kept=1.5)


# --------------------------------------------------------------------------- transformers 5.17


def test_qst_output_names_its_cache_as_this_transformers_does(monkeypatch):
    """transformers 5.17 (the GPU machine's) calls the output's cache `past_key_values`; later 5.x
    releases call it `cache`. QST's forward must build its output under either."""
    import dataclasses
    from typing import Any

    import transformers.modeling_outputs as outputs

    from qst.model import _causal_lm_output

    @dataclasses.dataclass
    class Older:  # the fields of 5.17's CausalLMOutputWithPast
        loss: Any = None
        logits: Any = None
        past_key_values: Any = None
        hidden_states: Any = None
        attentions: Any = None

    assert _causal_lm_output(loss=None, logits=None, cache="kv")["cache" if "cache" in
                             outputs.CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"] == "kv"
    monkeypatch.setattr(outputs, "CausalLMOutputWithPast", Older)
    assert _causal_lm_output(loss=None, logits=None, cache="kv").past_key_values == "kv"
