"""eval.codegen.sandbox: outcomes, limits, nothing it starts outlives it, and the adversarial cases of issue 15.

The adversarial tests run in the modes that claim to contain them (README, "Running generated
code"): bubblewrap for all, namespaces for those it holds. They skip, saying why, where a mode
is not available; CI runs as root and setup.sh installs bubblewrap, so there they all run.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import uuid
from pathlib import Path

import psutil
import pytest
from sandbox_escapes import ESCAPES, escape_report, escape_solution, marked_tests, new_marker

from eval.codegen import sandbox
from eval.codegen.sandbox import (
    bubblewrap_available,
    namespace_isolation_available,
    resolve_isolation,
    run_sandboxed,
    run_tests_sandboxed,
)
from eval.errors import UserInputError

NEEDS_BWRAP = pytest.mark.skipif(not bubblewrap_available(),
                                 reason="bubblewrap (`bwrap`) missing or not working here: apt-get install bubblewrap")
NAMESPACES = pytest.param("namespaces", marks=pytest.mark.skipif(
    not namespace_isolation_available(), reason="needs root with unshare and setpriv"))
BUBBLEWRAP = pytest.param("bubblewrap", marks=NEEDS_BWRAP)
MODES = ["process", NAMESPACES, BUBBLEWRAP]
CONTAINING = [NAMESPACES, BUBBLEWRAP]  # modes that hold against programs that are not Python


def test_a_program_that_runs_to_its_end_passes_and_its_output_comes_back():
    result = run_sandboxed("print(sum(range(10)))", timeout_s=10)
    assert result.passed and result.status == "passed" and result.error_type is None
    assert result.returncode == 0
    assert result.stdout.strip() == "45"
    assert result.isolation == resolve_isolation("auto")


@pytest.mark.parametrize("program, error_type", [
    ("undefined_name + 1", "NameError"),
    ("def f(:\n    pass", "SyntaxError"),
    ("assert 1 + 1 == 3", "AssertionError"),
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


# The forgery of issue 15, item 6: read the run's token from wherever it is visible, print and
# write a "done" report everywhere, then leave with status 0 before the failing assert.
FORGER = textwrap.dedent("""
    import os
    seen = b""
    for name in ("cmdline", "environ"):
        try:
            seen += open("/proc/self/" + name, "rb").read().replace(b"\\0", b" ")
        except OSError:
            pass
    forged = [b"done " + word for word in seen.split()] + [b"done", b'{"status": "passed"}', b"ready"]
    for fd in range(0, 64):
        for line in forged:
            try:
                os.write(fd, line + b"\\n")
            except OSError:
                pass
    os._exit(0)
""")


@pytest.mark.parametrize("isolation", MODES)
def test_a_program_cannot_forge_its_own_pass(isolation):
    result = run_sandboxed(FORGER + "\nassert False\n", timeout_s=10, isolation=isolation)
    assert (result.status, result.error_type) == ("failed", "EarlyExit")


ADD_TESTS = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate((1,), (2,)) == (1, 2)\n"


@pytest.mark.parametrize("isolation", MODES)
def test_tests_run_apart_from_the_solution_and_judge_it(isolation):
    good = run_tests_sandboxed("def add(a, b):\n    return a + b\n", ADD_TESTS, "add", isolation=isolation)
    assert good.passed and good.isolation == isolation, good.stderr
    assert good.isolated == (isolation != "process")
    wrong = run_tests_sandboxed("def add(a, b):\n    return a - b\n", ADD_TESTS, "add", isolation=isolation)
    assert (wrong.status, wrong.error_type) == ("failed", "AssertionError")


@pytest.mark.parametrize("solution, error_type", [
    # forge (garbage and fake verdicts on every descriptor), then os._exit(0) in the middle of the tests
    ("def add(a, b):\n" + textwrap.indent(FORGER, "    "), "BadAnswer"),
    ("def add(a, b):\n    import os\n    os._exit(0)\n", "EarlyExit"),
    ("def add(a, b):\n    raise SystemExit(0)\n", "SystemExit"),
    # an object equal to everything: cannot cross to the tests' process, so it cannot fool `==`
    ("def add(a, b):\n    return type('Any', (), {'__eq__': lambda s, o: True})()\n", "TypeError"),
    ("def add(a, b):\n    return c\n", "NameError"),
    ("def add(a, b) return", "SyntaxError"),
    ("def plus(a, b):\n    return a + b\n", "NameError"),  # no such entry point
])
def test_a_solution_cannot_fake_passing_the_tests(solution, error_type):
    result = run_tests_sandboxed(solution, ADD_TESTS, "add", timeout_s=10)
    assert (result.status, result.error_type) == ("failed", error_type), result.stderr


def test_the_prompt_context_is_available_to_the_tests():
    context = "def helper(x):\n    return x * 2\n\ndef double(x):\n    \"\"\"helper(x)\"\"\"\n"
    tests = "def check(candidate):\n    assert candidate(4) == helper(4)\n"
    result = run_tests_sandboxed(context + "    return helper(x)\n", tests, "double", context=context, timeout_s=10)
    assert result.passed, result.stderr


# ---------------------------------------------------------------------------------------------
# Issue 22: only trusted code sees the tests. Each escape (tests/sandbox_escapes.py) is a wrong
# `add` that answers what the tests expect if it finds them, and reports what it tried.

ATTEMPTED = {  # the evidence that the escape really tried, from its own report
    "argv_environ": lambda r: r.get("proc_entries_read", 0) >= 2 and r.get("paths_tried", 0) >= 3,
    "filesystem": lambda r: r.get("files_read", 0) >= 500 and r.get("folders_listed", 0) >= 50,
    "sibling_proc": lambda r: r.get("processes_listed", 0) >= 1
    and r.get("absent_or_refused", 0) + r.get("processes_seen", 0) >= 50,
    "signal": lambda r: r.get("signals_refused", 0) + r.get("signals_delivered", 0) >= 50,
    "forge_verdict": lambda r: r.get("own_descriptors", 0) >= 3 and r.get("processes_listed", 0) >= 1,
}


@pytest.mark.parametrize("isolation", CONTAINING)
@pytest.mark.parametrize("escape", ESCAPES)
def test_a_solution_cannot_find_the_tests_nor_reach_their_process(escape, isolation):
    marker = new_marker()
    solution = escape_solution(escape, marker, isolation, evaluator_pid=os.getpid())
    result = run_tests_sandboxed(solution, marked_tests(marker), "add", timeout_s=120, isolation=isolation)
    report = escape_report(result.stdout, escape)
    assert ATTEMPTED[escape](report), (report, result.stderr)
    assert report["found_in"] is None and "marker_seen_in" not in report, report
    # The tests' process lived to judge the wrong answer (or the garbage a forger wrote to its own pipe).
    assert result.status == "failed" and result.error_type in {"AssertionError", "BadAnswer"}, result.stderr
    assert result.isolated


@pytest.mark.parametrize("isolation", CONTAINING)
def test_nothing_the_solution_holds_names_the_tests(isolation):
    marker = new_marker()
    probe = textwrap.dedent(f"""
        import os
        marker = bytes.fromhex({marker.encode().hex()!r}).decode()
        seen = [open("/proc/self/" + n, "rb").read().decode(errors="replace") for n in ("cmdline", "environ", "mountinfo")]
        seen += [os.readlink("/proc/self/fd/" + fd) for fd in os.listdir("/proc/self/fd") if os.path.exists("/proc/self/fd/" + fd)]
        seen += os.listdir(".")
        hits = [s for s in seen if marker in s or "tests.py" in s or "context.py" in s or "tests" in s.split("/")]
        print("looked at", len(seen), "found", hits, "runner" if "runner.py" in seen[0] else "", flush=True)
        def add(a, b):
            return a - b
    """)
    result = run_tests_sandboxed(probe, marked_tests(marker), "add", timeout_s=60, isolation=isolation)
    assert (result.status, result.error_type) == ("failed", "AssertionError"), result.stderr
    assert "found [] runner" in result.stdout, result.stdout  # it looked, and nothing names the tests


@pytest.mark.parametrize("isolation", CONTAINING)
def test_the_shipped_problems_are_hidden_from_the_solution(isolation):
    from eval.codegen.problems import shipped_problems_path

    path = str(shipped_problems_path())
    solution = (f"import os\nprint('sees', os.path.exists({path!r}), os.path.exists(os.path.dirname({path!r})), "
                f"flush=True)\ndef add(a, b):\n    return a + b\n")
    result = run_tests_sandboxed(solution, ADD_TESTS, "add", timeout_s=60, isolation=isolation)
    assert result.passed, result.stderr
    assert "sees False" in result.stdout, result.stdout  # namespaces: an empty tmpfs over it; bubblewrap: not bound


def test_bubblewrap_covers_the_problem_files_where_a_bind_brings_them_in():
    under_a_bind, elsewhere = "/usr/lib/python3/dist-packages/eval/codegen/data", "/nowhere/eval/codegen/data"
    argv = sandbox._bubblewrap_argv("/files", 1 << 20, ["true"], hidden=[under_a_bind, elsewhere])
    at = argv.index(under_a_bind)
    assert argv[at - 1] == "--tmpfs" and argv[at + 1:at + 3] == ["--remount-ro", under_a_bind]
    assert elsewhere not in argv
    assert argv[-1] == "true"


def test_process_mode_is_unisolated_and_says_so_in_every_result():
    # In process mode the same escape can read the tests' process (its memory, its descriptors):
    # whatever the verdict, the result says it cannot be trusted.
    marker = new_marker()
    solution = escape_solution("sibling_proc", marker, "process", evaluator_pid=os.getpid())
    result = run_tests_sandboxed(solution, marked_tests(marker), "add", timeout_s=120, isolation="process")
    assert result.isolation == "process" and result.isolated is False
    assert result.status in {"passed", "failed"}


@pytest.mark.parametrize("isolation", MODES)
def test_an_endless_loop_is_stopped_at_the_time_limit(isolation):
    # Independent of load: neither program can end by itself, so however slowly the sandbox
    # starts, the only outcome is the wall-clock kill.
    result = run_sandboxed("while True:\n    pass", timeout_s=2, isolation=isolation)
    assert result.status == "timeout" and result.error_type == "Timeout" and not result.passed
    hang = run_tests_sandboxed("def add(a, b):\n    while True:\n        pass\n", ADD_TESTS, "add", timeout_s=2,
                               isolation=isolation)
    assert hang.status == "timeout"


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
    for timeout_s in (5, 20, 60):  # under load spawning may outlast a short limit: then try a longer one
        result = run_sandboxed(_spawner(marker, then), timeout_s=timeout_s, isolation=isolation)
        assert _alive_with(marker) == []  # nothing survives, whenever the run ended
        if "spawned 5" in result.stdout:  # the children really ran
            break
    assert "spawned 5" in result.stdout, result.stderr
    assert result.status == status, result.stderr


def test_endless_allocation_ends_in_memory_error():
    result = run_sandboxed("x = []\nwhile True:\n    x.append(' ' * 10**7)", timeout_s=20, memory_mb=128)
    assert (result.status, result.error_type) == ("failed", "MemoryError")


@pytest.mark.parametrize("isolation", MODES)
def test_python_writes_outside_the_working_directory_are_refused(tmp_path, isolation):
    target = tmp_path / "escaped.txt"
    result = run_sandboxed(f"open({str(target)!r}, 'w').write('x')", timeout_s=10, isolation=isolation)
    assert result.status == "failed" and result.error_type in {"PermissionError", "FileNotFoundError"}
    assert not target.exists()
    removal = run_sandboxed(f"import os\nos.remove({str(tmp_path)!r})", timeout_s=10, isolation=isolation)
    assert removal.error_type in {"PermissionError", "FileNotFoundError"} and tmp_path.exists()


def test_the_throwaway_folders_are_usable_and_removed_afterwards(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    program = "open('notes.txt', 'w').write('kept')\nprint(open('notes.txt').read())"
    result = run_sandboxed(program, timeout_s=10)
    assert result.passed and result.stdout.strip() == "kept", result.stderr
    assert list(tmp_path.iterdir()) == []


def test_files_larger_than_the_limit_cannot_be_written():
    result = run_sandboxed("open('big', 'wb').write(b'x' * (4 << 20))", timeout_s=10, max_file_mb=1)
    assert result.status == "failed"
    assert result.error_type in {"SIGXFSZ", "OSError"}


# ---------------------------------------------------------------------------------------------
# Issue 15, items 7 and 8: programs that are not Python (os.system, subprocess, ctypes).

def _world_writable(path: Path) -> Path:
    path.mkdir()
    path.chmod(0o777)
    return path


@NEEDS_BWRAP
def test_no_write_reaches_the_host_whatever_the_means(tmp_path):
    open_dir = _world_writable(tmp_path / "open")
    marker = f"slimtune-escape-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / marker, Path("/var/tmp") / marker, open_dir / marker, Path(sys.prefix) / marker]
    program = textwrap.dedent(f"""
        import ctypes, os, subprocess
        targets = {[str(t) for t in targets]!r}
        libc = ctypes.CDLL(None)
        for i, t in enumerate(targets):
            os.system(f"echo x > {{t}}.system")
            subprocess.run(["sh", "-c", f"echo x > {{t}}.subprocess"])
            fd = libc.open(f"{{t}}.ctypes".encode(), 0o101, 0o644)  # O_WRONLY | O_CREAT
            print("ctypes", i, fd)
        os.system("rm -rf {open_dir}")
    """)
    result = run_sandboxed(program, timeout_s=10, isolation="bubblewrap")
    assert "ctypes 3" in result.stdout, result.stderr  # the program really ran to the last attempt
    leaked = [str(t) + suffix for t in targets for suffix in (".system", ".subprocess", ".ctypes")
              if Path(str(t) + suffix).exists()]
    assert leaked == [] and open_dir.is_dir()


@NEEDS_BWRAP
def test_files_that_are_not_world_readable_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the-secret-words")
    secret.chmod(0o600)
    readable = [p for p in (Path("/etc/shadow"), secret) if p.exists()]
    program = "import os, subprocess\n" + "".join(
        f"os.system('cat {p} 2>/dev/null')\ntry:\n    print(open({str(p)!r}).read())\nexcept OSError as e:\n"
        f"    print('refused', type(e).__name__)\n" for p in readable)
    result = run_sandboxed(program, timeout_s=10, isolation="bubblewrap")
    assert result.stdout.count("refused") == len(readable), result.stdout
    assert "the-secret-words" not in result.stdout
    if os.geteuid() == 0 and Path("/etc/shadow").exists():
        assert "root:" not in result.stdout


@pytest.fixture
def listener():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    yield server
    server.close()


@pytest.mark.parametrize("isolation", CONTAINING)
def test_no_network_not_even_127_0_0_1(listener, isolation):
    port = listener.getsockname()[1]
    client = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'escaped')"
    program = textwrap.dedent(f"""
        import subprocess, sys
        done = subprocess.run([sys.executable, "-I", "-c", {client!r}], capture_output=True, text=True)
        print("child exit", done.returncode, done.stderr.strip().splitlines()[-1:])
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=2)
    """)
    result = run_sandboxed(program, timeout_s=10, isolation=isolation)
    assert "child exit 1" in result.stdout, result.stdout + result.stderr  # a child without our audit hook: refused
    assert result.status == "failed"
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing ever arrived


@pytest.mark.parametrize("isolation", CONTAINING)
def test_a_fork_bomb_is_bounded_and_cleaned_up(isolation):
    marker = f"slimtune-fork-{uuid.uuid4().hex}"
    program = textwrap.dedent(f"""
        import os
        forked = 0
        for _ in range(300):
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execv("/bin/sh", ["sh", "-c", "sleep 60; :", "{marker}"])
            forked += 1
        print("forked", forked, flush=True)
    """)
    result = run_sandboxed(program, timeout_s=10, max_processes=8, isolation=isolation)
    forked = int(result.stdout.split()[-1])
    assert forked <= 8, result.stdout  # other sandboxes running as nobody may leave it fewer
    assert _alive_with(marker) == []


EVALUATOR = """
import json, os, sys
from eval.codegen.sandbox import run_sandboxed, run_tests_sandboxed
me = os.getpid()
attack = (f"import os, signal\\nfor pid in (os.getppid(), {me}, -1):\\n    try:\\n        os.kill(pid, signal.SIGKILL)\\n"
          f"    except OSError as e:\\n        print(pid, type(e).__name__)\\n")
one = run_sandboxed(attack, timeout_s=10, isolation=sys.argv[1])
two = run_tests_sandboxed("def f():\\n" + "".join("    " + l + "\\n" for l in attack.splitlines()),
                          "def check(c):\\n    c()\\n", "f", timeout_s=10, isolation=sys.argv[1])
print(json.dumps([one.status, two.status]))
"""


@pytest.mark.parametrize("isolation", CONTAINING)
def test_the_evaluator_cannot_be_killed_and_leaves_no_temporaries(isolation):
    root = Path(__file__).resolve().parents[1]
    temp = Path(tempfile.mkdtemp(prefix="slimtune-test-"))  # in /tmp: `nobody` (namespaces mode) may pass through
    try:
        temp.chmod(0o711)
        env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": str(root)}
        done = subprocess.run([sys.executable, "-c", EVALUATOR, isolation], capture_output=True, text=True, env=env,
                              cwd=root, timeout=120)
        assert done.returncode == 0, done.stderr  # it lived to the end (a SIGKILL would give -9)
        assert set(json.loads(done.stdout.splitlines()[-1])) <= {"passed", "failed"}
        assert list(temp.iterdir()) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Issue 15, item 9: bad parameters are the caller's error, never the program's failure.

@pytest.mark.parametrize("name, value", [
    ("memory_mb", -1), ("memory_mb", 0), ("memory_mb", math.nan), ("memory_mb", math.inf), ("memory_mb", 8),
    ("memory_mb", True), ("memory_mb", "512"), ("max_processes", -5), ("max_processes", 0),
    ("max_processes", 2.5), ("timeout_s", 0), ("timeout_s", -1), ("timeout_s", math.nan), ("timeout_s", math.inf),
    ("max_file_mb", 0),
])
def test_bad_limits_are_one_clear_user_error(name, value):
    with pytest.raises(UserInputError, match=name):
        run_sandboxed("pass", **{"timeout_s": 5, name: value})
    with pytest.raises(UserInputError, match=name):
        run_tests_sandboxed("def f():\n    pass\n", "def check(c):\n    c()\n", "f", **{name: value})


def test_other_bad_arguments_are_user_errors():
    with pytest.raises(UserInputError, match="source text"):
        run_sandboxed(b"pass", timeout_s=1)
    with pytest.raises(UserInputError, match="isolation"):
        run_sandboxed("pass", timeout_s=1, isolation="vm")
    with pytest.raises(UserInputError, match="entry_point"):
        run_tests_sandboxed("pass", "pass", "not a name")


def test_auto_falls_back_to_namespaces_loudly_and_never_to_process(monkeypatch):
    monkeypatch.delenv("SLIMTUNE_SANDBOX", raising=False)
    monkeypatch.setattr(sandbox, "bubblewrap_available", lambda: False)
    monkeypatch.setattr(sandbox, "namespace_isolation_available", lambda: True)
    sandbox._warn_weak.cache_clear()
    with pytest.warns(RuntimeWarning, match="SANDBOX IS WEAK"):
        assert resolve_isolation("auto") == "namespaces"
    monkeypatch.setattr(sandbox, "namespace_isolation_available", lambda: False)
    with pytest.raises(UserInputError, match="only when asked for by name"):
        resolve_isolation("auto")  # process mode can be forged: it is never chosen for the user
    with pytest.raises(UserInputError, match="bubblewrap"):
        resolve_isolation("bubblewrap")
    sandbox._warn_weak.cache_clear()
    with pytest.warns(RuntimeWarning, match="UNISOLATED"):
        assert resolve_isolation("process") == "process"  # named: it runs, loudly
    monkeypatch.setenv("SLIMTUNE_SANDBOX", "process")
    assert resolve_isolation("auto") == "process"  # named in the environment
    sandbox._warn_weak.cache_clear()
