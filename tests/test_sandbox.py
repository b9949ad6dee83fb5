"""eval.sandbox.run_sandboxed: outcomes, limits, and that nothing it starts outlives it."""

from __future__ import annotations

import textwrap
import uuid
from pathlib import Path

import psutil
import pytest

from eval.errors import UserInputError
from eval.sandbox import namespace_isolation_available, run_sandboxed

MODES = ["process", pytest.param("namespace", marks=pytest.mark.skipif(
    not namespace_isolation_available(), reason="needs root with unshare and setpriv"))]


def test_a_program_that_runs_to_its_end_passes_and_its_output_comes_back():
    result = run_sandboxed("print(sum(range(10)))", timeout_s=10)
    assert result.passed and result.status == "passed" and result.error_type is None
    assert result.returncode == 0
    assert result.stdout.strip() == "45"


@pytest.mark.parametrize("program, error_type", [
    ("undefined_name + 1", "NameError"),
    ("def f(:\n    pass", "SyntaxError"),
    ("assert 1 + 1 == 3", "AssertionError"),
    ("len(5)", "TypeError"),
    ("1 / 0", "ZeroDivisionError"),
    ("import no_such_module_here", "ModuleNotFoundError"),
])
def test_the_exception_type_is_reported(program, error_type):
    result = run_sandboxed(program, timeout_s=10)
    assert not result.passed and result.status == "failed"
    assert result.error_type == error_type
    assert result.returncode == 1
    assert error_type in result.stderr  # the traceback tail comes back too


def test_exiting_early_never_counts_as_passing():
    exit3 = run_sandboxed("import sys\nsys.exit(3)", timeout_s=10)
    assert (exit3.status, exit3.error_type, exit3.returncode) == ("failed", "SystemExit", 3)
    exit0 = run_sandboxed("import sys\nsys.exit(0)\nassert False", timeout_s=10)
    assert (exit0.status, exit0.error_type) == ("failed", "SystemExit")
    hard_exit = run_sandboxed("import os\nos._exit(0)", timeout_s=10)
    assert (hard_exit.status, hard_exit.error_type, hard_exit.returncode) == ("failed", "EarlyExit", 0)


@pytest.mark.parametrize("isolation", MODES)
def test_an_endless_loop_is_stopped_at_the_time_limit(isolation):
    result = run_sandboxed("while True:\n    pass", timeout_s=1, isolation=isolation)
    assert result.status == "timeout" and result.error_type == "Timeout" and not result.passed


def _alive_with(marker: str) -> list[psutil.Process]:
    alive = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
                alive.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return alive


def _spawner(marker: str, then: str) -> str:
    # Five children that sleep forever; the marker in their command line lets us find them.
    return textwrap.dedent(f"""
        import subprocess, sys, time
        children = [subprocess.Popen([sys.executable, "-c", "import time\\nwhile True: time.sleep(1)", "{marker}"])
                    for _ in range(5)]
        time.sleep(0.5)
        print("spawned", len([c for c in children if c.poll() is None]), flush=True)
        {then}
    """)


@pytest.mark.parametrize("isolation", MODES)
@pytest.mark.parametrize("then, status", [("while True: time.sleep(1)", "timeout"), ("pass", "passed")])
def test_no_child_survives_a_program_that_spawns_children_that_never_end(isolation, then, status):
    marker = f"slimtune-test-{uuid.uuid4().hex}"
    result = run_sandboxed(_spawner(marker, then), timeout_s=2, isolation=isolation)
    assert result.status == status, result.stderr
    assert "spawned 5" in result.stdout  # the children really ran
    assert _alive_with(marker) == []


def test_endless_allocation_ends_in_memory_error():
    result = run_sandboxed("x = []\nwhile True:\n    x.append(' ' * 10**7)", timeout_s=20, memory_mb=128)
    assert (result.status, result.error_type) == ("failed", "MemoryError")


@pytest.mark.parametrize("isolation", MODES)
def test_writing_outside_the_working_directory_is_refused(tmp_path, isolation):
    target = tmp_path / "escaped.txt"
    result = run_sandboxed(f"open({str(target)!r}, 'w').write('x')", timeout_s=10, isolation=isolation)
    assert (result.status, result.error_type) == ("failed", "PermissionError")
    assert not target.exists()
    removal = run_sandboxed(f"import os\nos.remove({str(tmp_path)!r})", timeout_s=10, isolation=isolation)
    assert removal.error_type == "PermissionError" and tmp_path.exists()


def test_the_throwaway_working_directory_is_usable_and_removed_afterwards():
    program = "import os\nopen('notes.txt', 'w').write('kept')\nprint(os.getcwd())\nprint(open('notes.txt').read())"
    result = run_sandboxed(program, timeout_s=10)
    assert result.passed, result.stderr
    workdir, content = result.stdout.split()
    assert content == "kept"
    assert not Path(workdir).exists()


@pytest.mark.parametrize("isolation", MODES)
def test_there_is_no_network(isolation):
    program = "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)"
    result = run_sandboxed(program, timeout_s=10, isolation=isolation)
    assert result.status == "failed" and result.error_type in {"PermissionError", "OSError", "ConnectionRefusedError"}


def test_files_larger_than_the_limit_cannot_be_written():
    result = run_sandboxed("open('big', 'wb').write(b'x' * (4 << 20))", timeout_s=10, max_file_mb=1)
    assert result.status == "failed"
    assert result.error_type in {"SIGXFSZ", "OSError"}


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserInputError, match="timeout_s"):
        run_sandboxed("pass", timeout_s=0)
    with pytest.raises(UserInputError, match="source text"):
        run_sandboxed(b"pass", timeout_s=1)
    with pytest.raises(UserInputError, match="isolation"):
        run_sandboxed("pass", timeout_s=1, isolation="vm")
