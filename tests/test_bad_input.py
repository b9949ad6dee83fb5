"""Bad input and faults, table-driven: every row must give one clear error and leave nothing behind.

To add a case, append a `Case` to `CASES`:
- `run(env)` returns the argv of one `slimtune` command (run in-process through
  `scripts.cli.main`; it must exit 2 with one `slimtune CMD: error:` line) or a callable
  that must raise `UserInputError`;
- `expect`: a piece of the message that says what was wrong;
- `setup(env)` (optional) prepares the case inside `env.tmp` before the snapshot is taken.
After the row, `env.tmp` must be exactly as `setup` left it (nothing half-written, nothing lost).
Tiny models only: the whole table runs in seconds.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import eval.tasks
from eval.data import ClassificationExample
from eval.errors import UserInputError
from scripts.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable  # env -> argv list, or env -> callable raising UserInputError
    expect: str
    setup: Callable | None = None


class Env:
    """The shared tiny assets (`a`) and this row's scratch folder (`tmp`)."""

    def __init__(self, assets: dict, tmp: Path):
        self.a, self.tmp = assets, tmp

    def __getattr__(self, name):
        return self.a[name]


# ------------------------------------------------------------------------------------ assets


def _tiny_tasks(texts):
    lines = [(i % 2, line) for i, text in enumerate(texts[:2]) for line in text.splitlines() if len(line) > 20]
    examples = [ClassificationExample(text=line[:60], label=label) for label, line in lines]
    make = lambda name, ex: eval.tasks.Task(  # noqa: E731
        name=name, kind="classification", labels=("textwrap", "string"), train=ex[:4] + ex[-4:],
        test=ex[20:22] + ex[-22:-20], template="{text}\nfile:")
    return {"tiny-a": make("tiny-a", examples), "tiny-b": make("tiny-b", examples[1:])}


def _copy_model(src: Path, dst: Path, config_edit=None, truncate: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_edit)
        (dst / "config.json").write_text(json.dumps(cfg))
    if truncate:
        f = dst / truncate
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return dst


def _vit(root: Path, labels: int, classes: int) -> tuple[Path, Path]:
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=labels))
    model.save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / "images" / f"class{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(root / "images" / f"class{c}" / f"{i}.png")
    return root / "vit", root / "images"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_llama_dir, tiny_texts):
    root = tmp_path_factory.mktemp("bad-input-assets")
    (root / "calib").mkdir()
    for i, text in enumerate(tiny_texts):
        (root / "calib" / f"doc{i}.txt").write_text(text)
    vit, images = _vit(root, labels=3, classes=5)
    # a pruned model and a low-rank ViT to break
    assert main(["prune", "--method", "magnitude", "--model", str(tiny_llama_dir), "--calib", str(root / "calib"),
                 "--kept", "0.6", "--block-size", "32", "--calib-blocks", "4", "--eval-blocks", "2",
                 "--batch-size", "2", "--out", str(root / "pruned")]) == 0
    (root / "images3").mkdir()
    for c in range(3):
        shutil.copytree(images / f"class{c}", root / "images3" / f"class{c}")
    assert main(["compress-vit", "--model", str(vit), "--data", str(root / "images3"), "--calib", "4", "--keep",
                 "0.6", "--compensate-steps", "0", "--batch-size", "4", "--out", str(root / "lowrank")]) == 0
    pruned_missing = shutil.copytree(root / "pruned" / "model", root / "pruned-missing")
    from safetensors.torch import load_file, save_file

    state = load_file(pruned_missing / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, pruned_missing / "model.safetensors")
    return {
        "llama": tiny_llama_dir, "calib": root / "calib", "vit": vit, "images": images,
        "llama3": _copy_model(tiny_llama_dir, root / "llama-3-layers", {"num_hidden_layers": 3}),
        "llama_cut": _copy_model(tiny_llama_dir, root / "llama-truncated", truncate="model.safetensors"),
        "pruned": root / "pruned" / "model",
        "pruned_cut": _copy_model(root / "pruned" / "model", root / "pruned-truncated", truncate="model.safetensors"),
        "pruned_missing": pruned_missing,
        "lowrank_vit": root / "lowrank" / "model",
        "tasks": _tiny_tasks(tiny_texts),
    }


@pytest.fixture(autouse=True)
def _tiny_tasks_only(monkeypatch, request):
    if "assets" in request.fixturenames:
        tasks = request.getfixturevalue("assets")["tasks"]
        # load_task takes a built-in name or a TaskSpec dict (what tune and bench pass)
        monkeypatch.setattr(eval.tasks, "load_task",
                            lambda spec: tasks[spec if isinstance(spec, str) else spec["source"]])


# ------------------------------------------------------------------------------------ helpers


def prune(e: Env, *extra, out=None, model=None):
    return ["prune", "--method", "magnitude", "--model", str(model or e.llama), "--calib", str(e.calib),
            "--block-size", "32", "--calib-blocks", "4", "--eval-blocks", "2", "--batch-size", "2",
            "--out", str(out or e.tmp / "out"), *extra]


def tune(e: Env, *extra, out=None, task="tiny-a"):
    return ["tune", "--model", str(e.llama), "--task", task, "--out", str(out or e.tmp / "out"), "--steps", "1",
            "--method", "lst", "--batch", "4", "--seq", "32", "--r", "4", "--skip-before", "--eval-examples", "2", *extra]


def zero_shot(e: Env, *extra):
    return ["zero-shot", "--tasks", "never_reached", "--out", str(e.tmp / "out"), *extra]


def compress(e: Env, *extra, data=None):
    return ["compress-vit", "--model", str(e.vit), "--data", str(data or e.images), "--calib", "4",
            "--compensate-steps", "0", "--batch-size", "4", "--out", str(e.tmp / "out"), *extra]


def user_files(e: Env):
    (e.tmp / "out" / "photos").mkdir(parents=True)
    (e.tmp / "out" / "thesis.txt").write_text("three years of work")
    (e.tmp / "out" / "photos" / "a.jpg").write_bytes(b"\xff\xd8")


def a_file(e: Env):
    e.tmp.joinpath("out").write_text("not a folder")


def other_command_output(command: str):
    def setup(e: Env):
        (e.tmp / "out").mkdir()
        (e.tmp / "out" / ".slimtune-output.json").write_text(json.dumps({"command": command}))
        (e.tmp / "out" / "report.json").write_text("{}")
    return setup


def unwritable(e: Env):
    (e.tmp / "blocker").write_text("a file where a folder would go")


def earlier_tune(e: Env):
    assert main(tune(e)) == 0


def locked(e: Env):
    """Another process is writing into the folder (it holds the lock)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from eval.io import prepare_output_dir as p\n"
         f"with p({str(e.tmp / 'out')!r}, 'tune'):\n    print('ready', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    e.a["_lock"] = holder
    assert holder.stdout.readline().strip() == "ready"


def raises(fn, *args, **kwargs):
    return lambda: fn(*args, **kwargs)


def _load_pruned(path):
    from pruning import load_pruned

    return load_pruned(path)


def _load_compressed_with_extra(e: Env):
    from safetensors.torch import load_file, save_file

    from lowrank_vit import load_compressed

    bad = shutil.copytree(e.lowrank_vit, e.tmp / "lowrank-extra")
    state = load_file(bad / "model.safetensors")
    state["classifier.extra"] = torch.zeros(2)
    save_file(state, bad / "model.safetensors")
    return raises(load_compressed, bad)


def _truncated_safetensors(e: Env):
    from safetensors.torch import save_file

    from eval.io import load_named_tensors_into

    path = e.tmp / "ckpt" / "trainable.safetensors"
    path.parent.mkdir()
    save_file({"w": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])
    return raises(load_named_tensors_into, {"w": torch.zeros(64, 64)}, path, "training checkpoint")


def _truncated_cache_entry(e: Env):
    from qst.cache import BackboneFeatureCache, BackboneFeatures

    cache = BackboneFeatureCache(e.tmp / "cache", "backbone")
    ids = torch.ones(1, 8, dtype=torch.long)
    states = tuple(torch.randn(1, 8, 4) for _ in range(3))
    cache.store(ids, None, BackboneFeatures(hidden_states=states, last=states[-1]))
    entry = cache.entry_dir(ids, None) / "states.bin"
    entry.write_bytes(entry.read_bytes()[:10])
    return raises(cache.load, ids, None)


def _resume_other_run(e: Env):
    from eval.train import TrainConfig, train

    model = torch.nn.Linear(4, 1)
    batches = [{"x": torch.ones(2, 4)}]
    loss = lambda m, b: m(b["x"]).pow(2).mean()  # noqa: E731
    train(model, batches, TrainConfig(max_steps=1), loss_fn=loss, out_dir=e.tmp / "run", run={"task": "def-kind"})
    return raises(train, model, batches, TrainConfig(max_steps=2), loss_fn=loss, out_dir=e.tmp / "run",
                  run={"task": "stdlib-module"})


def _resume_other_data(e: Env):
    from eval.train import TrainConfig, train

    model = torch.nn.Linear(4, 1)
    loss = lambda m, b: m(b["x"]).pow(2).mean()  # noqa: E731
    train(model, [{"x": torch.ones(2, 4)}], TrainConfig(max_steps=1), loss_fn=loss, out_dir=e.tmp / "run")
    return raises(train, model, [{"x": torch.zeros(2, 4)}], TrainConfig(max_steps=2), loss_fn=loss, out_dir=e.tmp / "run")


def _load_causal_lm(path):
    from eval.models import load_causal_lm

    return raises(load_causal_lm, path)


# ------------------------------------------------------------------------------------ the table

CASES = [
    # output folders
    Case("prune --out holding user files", lambda e: prune(e), "holds other files", user_files),
    Case("prune --out is a file", lambda e: prune(e), "is an existing file", a_file),
    Case("prune --out is a tune output", lambda e: prune(e), "earlier tune output", other_command_output("tune")),
    Case("prune --out under a file", lambda e: prune(e, out=e.tmp / "blocker" / "out"), "cannot write", unwritable),
    Case("tune --out is a file", lambda e: tune(e), "is an existing file", a_file),
    Case("tune --out holding user files", lambda e: tune(e), "holds other files", user_files),
    Case("tune --out under a file", lambda e: tune(e, out=e.tmp / "blocker" / "out"), "cannot write", unwritable),
    Case("tune into a folder another run holds", lambda e: tune(e), "another slimtune run is writing", locked),
    Case("zero-shot --out is a file", lambda e: zero_shot(e, "--model", str(e.llama)), "is an existing file", a_file),
    Case("zero-shot --out holding user files", lambda e: zero_shot(e, "--model", str(e.llama)), "holds other files",
         user_files),
    Case("compress-vit --out holding user files", lambda e: compress(e), "holds other files", user_files),
    Case("compress-vit --out is a file", lambda e: compress(e), "is an existing file", a_file),
    Case("bench --out is a file", lambda e: ["bench", "--arch", "tiny-llama", "--quick", "--out", str(e.tmp / "out")],
         "is an existing file", a_file),
    Case("bench --out is a prune output", lambda e: ["bench", "--arch", "tiny-llama", "--quick", "--out", str(e.tmp / "out")],
         "earlier prune output", other_command_output("prune")),
    # resumption
    Case("tune resumes another task's checkpoint", lambda e: tune(e, task="tiny-b"), "different run", earlier_tune),
    Case("tune resumes with another --batch", lambda e: tune(e, "--batch", "2"), "batch", earlier_tune),
    Case("tune resumes with another --seq", lambda e: tune(e, "--seq", "16"), "seq", earlier_tune),
    Case("tune resumes with another --seed", lambda e: tune(e, "--seed", "1"), "seed", earlier_tune),
    Case("train() resumes another run", _resume_other_run, "different run"),
    Case("train() resumes other data", _resume_other_data, "data"),
    # strict loading
    Case("prune: config 3 layers, weights 2", lambda e: prune(e, model=e.llama3), "model.layers.2"),
    Case("load_causal_lm: config 3 layers, weights 2", lambda e: _load_causal_lm(e.llama3), "missing"),
    Case("prune: truncated safetensors", lambda e: prune(e, model=e.llama_cut), "model.safetensors is truncated"),
    Case("load_pruned: truncated safetensors", lambda e: raises(_load_pruned, e.pruned_cut),
         "model.safetensors is truncated"),
    Case("load_pruned: missing tensors", lambda e: raises(_load_pruned, e.pruned_missing), "missing"),
    Case("zero-shot --pruned: truncated safetensors", lambda e: zero_shot(e, "--pruned", str(e.pruned_cut)),
         "model.safetensors is truncated"),
    Case("load_compressed: unexpected tensor", _load_compressed_with_extra, "classifier.extra"),
    Case("checkpoint: truncated safetensors", _truncated_safetensors, "trainable.safetensors is truncated"),
    Case("feature cache: truncated entry", _truncated_cache_entry, "states.bin is truncated"),
    # data and lengths
    Case("compress-vit: 5 class folders, 3 labels", lambda e: compress(e), "5 class folders but the model has 3"),
    Case("estimate-memory --seq beyond the context",
         lambda e: ["estimate-memory", "--arch", "llama-2-7b", "--seq", "1000000000"], "longer than"),
    Case("tune --seq beyond the context", lambda e: tune(e, "--seq", "1000000000"), "longer than"),
    Case("tune --batch too big to fit", lambda e: tune(e, "--batch", "100000000", "--seq", "128"), "will not fit"),
    Case("bench --seq beyond the context",
         lambda e: ["bench", "--arch", "tiny-llama", "--quick", "--seq", "100000", "--out", str(e.tmp / "out")], "longer than"),
    # unclear errors made clear
    Case("estimate-memory --model a missing path",
         lambda e: ["estimate-memory", "--model", str(e.tmp / "no" / "such" / "model")], "no such directory"),
    Case("prune --model a missing path", lambda e: prune(e, model=e.tmp / "no" / "such"), "not found"),
    Case("estimate-memory on a ViT", lambda e: ["estimate-memory", "--model", str(e.vit)], "causal language models"),
    Case("estimate-memory --param-count inf",
         lambda e: ["estimate-memory", "--param-count", "inf"], "--param-count must be a positive finite"),
    Case("estimate-memory --param-count nan",
         lambda e: ["estimate-memory", "--param-count", "nan"], "--param-count must be a positive finite"),
    Case("zero-shot --limit -3", lambda e: zero_shot(e, "--limit", "-3"), "--limit must be"),
    Case("zero-shot --limit nan", lambda e: zero_shot(e, "--limit", "nan"), "--limit must be"),
    Case("zero-shot --limit 0", lambda e: zero_shot(e, "--limit", "0"), "--limit must be"),
    Case("zero-shot --limit 2.5", lambda e: zero_shot(e, "--limit", "2.5"), "--limit must be"),
    Case("prune --lora-rank 0", lambda e: prune(e, "--recover-steps", "2", "--lora-rank", "0"), "--lora-rank"),
    Case("zero-shot --lowrank on a ViT", lambda e: zero_shot(e, "--lowrank", str(e.lowrank_vit)),
         "causal language models"),
    # cases that were already clear
    Case("prune --block-size 0", lambda e: prune(e, "--block-size", "0"), "--block-size must be a positive"),
    Case("prune --kept 1.5", lambda e: prune(e, "--kept", "1.5"), "kept"),
    Case("tune --steps 0", lambda e: tune(e, "--steps", "0"), "--steps must be a positive integer"),
    Case("tune unknown --side-layers", lambda e: tune(e, "--side-layers", "0,x"), "--side-layers"),
    Case("estimate-memory --batch 0", lambda e: ["estimate-memory", "--batch", "0"], "batch must be a positive"),
    Case("estimate-memory unknown --arch", lambda e: ["estimate-memory", "--arch", "gpt-9"], "unknown architecture"),
    Case("compress-vit --batch-size 0", lambda e: compress(e, "--batch-size", "0"), "--batch-size"),
    Case("bench unknown method", lambda e: ["bench", "--arch", "tiny-llama", "--methods", "dora", "--out",
                                            str(e.tmp / "out")], "unknown tuning method"),
    Case("zero-shot --compare with duplicate labels", lambda e: zero_shot(e, "--compare", "a=ref-lm,a=ref-lm"),
         "labels must be distinct"),
    Case("verify_safetensors: empty file",
         lambda e: (e.tmp.joinpath("w.safetensors").write_bytes(b""),
                    raises(__import__("eval.io").io.verify_safetensors, e.tmp / "w.safetensors"))[1],
         "w.safetensors is truncated"),
]


def _snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_clear_error_and_leaves_nothing(case, assets, tmp_path, capsys, monkeypatch):
    import eval.reference

    env = Env(dict(assets), tmp_path)
    if case.setup:
        case.setup(env)
    # nothing here needs the reference model: building it would mean a check came too late
    monkeypatch.setattr(eval.reference, "reference_path", lambda *a, **k: pytest.fail("reference model built"),
                        raising=False)
    try:
        what = case.run(env)  # a callable row builds its broken file here
        before = _snapshot(tmp_path)
        capsys.readouterr()
        if callable(what):
            with pytest.raises(UserInputError) as info:
                what()
            assert case.expect in str(info.value)
        else:
            assert main(what) == 2
            err = capsys.readouterr().err
            errors = [line for line in err.splitlines() if line.startswith("slimtune ")]
            assert len(errors) == 1 and "error:" in errors[0], err
            assert case.expect in errors[0], errors[0]
            assert "Traceback" not in err
    finally:
        if "_lock" in env.a:
            env.a["_lock"].kill()
            env.a["_lock"].wait()
    assert _snapshot(tmp_path) == before  # nothing half-written, nothing lost


# ------------------------------------------------------------------------------------ faults


def _fault(monkeypatch, target: str, exc_or_fn):
    """Make `target` (module.attribute) raise (or call) exc_or_fn when the command reaches it."""
    module, attr = target.rsplit(".", 1)

    def boom(*args, **kwargs):
        if callable(exc_or_fn) and not isinstance(exc_or_fn, BaseException):
            exc_or_fn()
            time.sleep(5)  # the signal handler interrupts this
        raise exc_or_fn

    monkeypatch.setattr(__import__(module, fromlist=[attr]), attr, boom)


FAULTS = [
    ("Ctrl-C while loading", "eval.models.load_causal_lm", KeyboardInterrupt(), 130, "interrupted; nothing kept"),
    ("SIGTERM while loading", "eval.models.load_causal_lm", lambda: os.kill(os.getpid(), signal.SIGTERM), 143,
     "terminated (SIGTERM); nothing kept"),
    ("disk full while writing the report", "eval.report.write_report",
     OSError(errno.ENOSPC, "No space left on device", "prune_report.json"), 2, "no space left on the device"),
    ("safetensors disk full", "eval.report.write_report",
     __import__("safetensors").SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"),
     2, "no space left on the device"),
]


@pytest.mark.parametrize("name, target, fault, status, message", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_is_one_line_and_leaves_nothing(name, target, fault, status, message, assets, tmp_path, capsys,
                                              monkeypatch):
    env = Env(dict(assets), tmp_path)
    _fault(monkeypatch, target, fault)
    assert main(prune(env)) == status
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("slimtune ")]
    assert "Traceback" not in err and len(lines) == 1 and message in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_interrupted_tune_keeps_its_checkpoint_and_says_so(assets, tmp_path, capsys, monkeypatch):
    import eval.report

    env = Env(dict(assets), tmp_path)
    write_report = eval.report.write_report
    _fault(monkeypatch, "eval.report.write_report", KeyboardInterrupt())
    assert main(tune(env)) == 130
    monkeypatch.setattr(eval.report, "write_report", write_report)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "kept" in err and "checkpoint" in err
    assert (tmp_path / "out" / "checkpoint" / "state.json").is_file()
    assert main(tune(env)) == 0  # the same command resumes and finishes


def test_rerun_into_its_own_output_and_user_files_survive(assets, tmp_path):
    env = Env(dict(assets), tmp_path)
    assert main(prune(env)) == 0 and main(prune(env)) == 0  # an earlier prune output is accepted
    user_files(Env(dict(assets), tmp_path / "other"))
    assert main(prune(env, out=tmp_path / "other" / "out")) == 2
    assert (tmp_path / "other" / "out" / "thesis.txt").read_text() == "three years of work"


@pytest.mark.parametrize("how", ["kill -9", "Ctrl-C"])
def test_measuring_worker_is_not_orphaned(tmp_path, how):
    """The parent of `run_in_fresh_process` dies (kill -9) or is interrupted: the worker goes too,
    and so does its temporary folder."""
    (tmp_path / "sleeper.py").write_text(
        "import os, time\n"
        f"def main():\n    open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n    time.sleep(60)\n")
    parent = subprocess.Popen(
        [sys.executable, "-c", "from eval.measure import run_in_fresh_process as r; "
         f"r({str(tmp_path / 'sleeper.py') + ':main'!r})"], cwd=Path(__file__).resolve().parent.parent)
    pid_file = tmp_path / "pid"
    for _ in range(300):
        if pid_file.is_file() and pid_file.read_text():
            break
        time.sleep(0.05)
    worker = int(pid_file.read_text())
    workdir = Path(Path(f"/proc/{worker}/cmdline").read_bytes().split(b"\0")[-2].decode()).parent
    assert workdir.name.startswith("slimtune-measure-") and workdir.is_dir()
    if how == "kill -9":
        parent.kill()
    else:
        parent.send_signal(signal.SIGINT)
    parent.wait(timeout=30)
    for _ in range(200):
        if not Path(f"/proc/{worker}").exists() or "Z" in Path(f"/proc/{worker}/stat").read_text().split()[2]:
            break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the measuring worker outlived its parent")
    for _ in range(100):
        if not workdir.exists():
            break
        time.sleep(0.05)
    assert not workdir.exists()
