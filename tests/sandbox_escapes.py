"""Escapes from the code-generation sandbox (issue 22): wrong solutions that try to learn the tests.

Used by tests/test_sandbox.py and by docs/recipes/sandbox_escapes.py (the table in
docs/results/sandbox.md). Each escape is the source of a solution of `add(a, b)` that answers
a - b (wrong) unless it finds the tests or reaches the tests' process; then it answers what the
tests expect, or forges a verdict. It prints one line `escape NAME: {JSON}` saying what it tried
(files read, processes seen, descriptors opened, signals sent), so a test can check that the
attempt really happened, not only that it failed.

The tests carry a random marker (made per run, in no file) that the escapes look for: an
attacker given a way to tell these tests from any other `def check` it finds. A found copy is
parsed with `ast` for `candidate(<literals>) == <literal>` and those values are answered.

Safety on a shared machine: `mode` tells an escape where it runs. In "process" mode it can see
every process of our user, so it touches only its siblings (processes with its own parent: the
tests' processes of the same evaluator, which is its own run's when runs go one at a time), and
it never sends a signal. In the isolated modes it tries every process
it can see, and guessed process ids around the evaluator's.
"""

from __future__ import annotations

import textwrap
import uuid

ESCAPES = ("argv_environ", "filesystem", "sibling_proc", "signal", "forge_verdict")
SEARCH_BUDGET_S = 8.0  # the tests' filesystem search stops after this long; the recipe searches everything


def marked_tests(marker: str) -> str:
    """Tests of `add` that only a solution which found them (by their marker) can pass with a - b."""
    return (f"# {marker}\n"
            "def check(candidate):\n"
            "    assert candidate(20, 22) == 42\n"
            "    assert candidate(1, 2) == 3\n")


def new_marker() -> str:
    return f"slimtune-tests-{uuid.uuid4().hex}"


_COMMON = '''
import ast, ctypes, gzip, json, os, signal, sys, time

MARKER = bytes.fromhex({marker_hex!r}).decode()  # in no source text: only the tests hold it whole
MODE, EVALUATOR_PID, NAME = {mode!r}, {evaluator_pid!r}, {name!r}
REPORT = {{"found_in": None}}
_FOUND = {{}}
_LIBC = ctypes.CDLL(None, use_errno=True)  # libc's open(): the audit hook never sees it


def _count(key, n=1):
    REPORT[key] = REPORT.get(key, 0) + n


def _learn(text, where):
    """Take the expected values out of the tests, if `text` holds them."""
    if MARKER not in text:
        return False
    REPORT.setdefault("marker_seen_in", where)  # a copy of the tests, parseable or not
    if "def check" not in text:
        return False
    start = text.rfind("#", 0, text.index(MARKER))
    end = text.find("\\n\\n", text.index(MARKER))
    source = text[start: end if end > 0 else len(text)]
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and len(node.ops) == 1
                and isinstance(node.ops[0], ast.Eq)):
            try:
                _FOUND[tuple(ast.literal_eval(a) for a in node.left.args)] = ast.literal_eval(node.comparators[0])
            except ValueError:
                pass
    REPORT["found_in"] = REPORT["found_in"] or where
    return True


def _read_text(path, limit=1 << 20):
    try:
        with open(path, "rb") as f:
            data = f.read(limit)
    except (OSError, ValueError):
        return ""
    _count("files_read")
    if data[:2] == b"\\x1f\\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            pass
    return data.decode("utf-8", errors="replace")


def _strings(value):
    """Every string inside a JSON value (a command line's config, say)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _paths_in(text):
    """Path-like words in a command line or environment, and the tests.py next to each."""
    found = set()
    for word in text.replace("\\0", " ").split():
        words = [word]
        try:
            words += list(_strings(json.loads(word)))
        except ValueError:
            pass
        for w in words:
            for part in w.replace("=", " ").replace(":", " ").split():
                if part.startswith("/"):
                    folder = os.path.dirname(part)
                    found.update({{part, folder + "/tests.py", folder + "/context.py",
                                  os.path.dirname(folder) + "/files/tests.py"}})
    return found


def _proc_text(pid, name):
    try:
        with open(f"/proc/{{pid}}/{{name}}", "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return None


def _parent_of(pid):
    stat = _proc_text(pid, "stat")
    try:
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (AttributeError, IndexError, ValueError):
        return None


def _targets():
    """Other processes this escape may touch (see the module doc of tests/sandbox_escapes.py)."""
    me, parent = os.getpid(), os.getppid()
    listed = {{int(p) for p in os.listdir("/proc") if p.isdigit()}}
    REPORT["processes_listed"] = len(listed)
    if MODE == "process":
        return sorted(p for p in listed if p != me and _parent_of(p) == parent)
    guessed = set(range(max(1, EVALUATOR_PID - 8), EVALUATOR_PID + 64)) | set(range(1, 16))
    return sorted((listed | guessed) - {{me}})


def _read_memory(pid):
    """Search the process's readable memory for the tests (through /proc/PID/mem)."""
    maps = _proc_text(pid, "maps")
    if maps is None:
        return
    try:
        mem = open(f"/proc/{{pid}}/mem", "rb", buffering=0)
    except OSError:
        _count("memory_refused")
        return
    with mem:
        budget = 256 << 20
        for line in maps.splitlines():
            fields = line.split()
            if len(fields) < 2 or not fields[1].startswith("r"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start > budget:
                continue
            budget -= end - start
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, OverflowError, ValueError):
                continue
            _count("memory_bytes_read", len(chunk))
            at = chunk.find(MARKER.encode())
            while at >= 0:
                end = chunk.find(b"\\0", at)  # a str's characters end in a NUL in memory
                text = chunk[max(0, at - 16): end if end > 0 else at + 4096].decode(errors="replace")
                if _learn(text, f"/proc/{{pid}}/mem"):
                    return
                at = chunk.find(MARKER.encode(), at + 1)


def _print_report():
    if not REPORT.get("printed"):
        REPORT["printed"] = True
        print("escape " + NAME + ": " + json.dumps(REPORT, sort_keys=True), flush=True)


def add(a, b):
    if "done" not in REPORT:
        REPORT["done"] = True
        try:
            attack()
        except BaseException as e:  # report what stopped the attempt
            REPORT["stopped_by"] = repr(e)[:200]
        _print_report()
    return _FOUND.get((a, b), a - b)
'''

_ATTACKS = {
    # The attack of the issue: the tests' path from our own command line and environment (and
    # the evaluator's), then the old layout's neighbours (tests.py beside solution.py).
    "argv_environ": '''
def attack():
    seen = set()
    for pid in ("self", os.getppid()):
        for name in ("cmdline", "environ"):
            text = _proc_text(pid, name)
            if text is not None:
                _count("proc_entries_read")
                seen |= _paths_in(text)
    seen |= {"/sandbox-files/tests.py", os.path.join(os.getcwd(), "tests.py"),
             os.path.join(os.path.dirname(os.getcwd()), "files", "tests.py")}
    REPORT["paths_tried"] = len(seen)
    for path in sorted(seen):
        _learn(_read_text(path), path)
''',
    # Everything the sandbox shows: first the evaluator's likely temporary folders in /tmp (by
    # guessed names), then a walk of the likely places and of / (not /proc, /sys), reading every
    # file under 1 MiB (gunzipping .gz) until the budget runs out.
    "filesystem": '''
def attack():
    deadline = time.monotonic() + {budget!r}
    for entry in os.listdir("/tmp") if os.path.isdir("/tmp") else []:
        for guess in ("files/tests.py", "files/context.py", "work-test/tests.py", "test.stderr", "test.stdout"):
            _count("guesses")
            if _learn(_read_text(os.path.join("/tmp", entry, guess)), guess):
                return
    walked = set()
    for top in ("/tmp", "/var/tmp", "/dev/shm", "/run", os.path.dirname(os.getcwd()), "/"):
        for root, dirs, files in os.walk(top, onerror=lambda e: _count("folders_refused")):
            if root in walked:
                dirs[:] = []
                continue
            walked.add(root)
            if root == "/":
                dirs[:] = [d for d in dirs if d not in ("proc", "sys")]
            _count("folders_listed")
            for name in files:
                path = os.path.join(root, name)
                try:
                    if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > (1 << 20):
                        continue
                except OSError:
                    continue
                if _learn(_read_text(path), path):
                    return
                if time.monotonic() > deadline:
                    REPORT["budget_exhausted"] = True
                    return
''',
    # Another process's /proc entries: command line, environment, every open descriptor
    # (opened through /proc/PID/fd/N) and its memory (/proc/PID/mem).
    "sibling_proc": '''
def attack():
    for pid in _targets():
        cmdline = _proc_text(pid, "cmdline")
        if cmdline is None:
            _count("absent_or_refused")
            continue
        _count("processes_seen")
        for path in sorted(_paths_in(cmdline + " " + (_proc_text(pid, "environ") or ""))):
            if _learn(_read_text(path), path):
                return
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            _count("fd_listing_refused")
            fds = []
        for fd in fds:
            _count("descriptors_seen")
            try:
                fd_path = f"/proc/{pid}/fd/{fd}"
                if os.readlink(fd_path).startswith(("pipe:", "socket:")):
                    continue  # a pipe read here would steal the run's messages, not show the tests
            except OSError:
                continue
            if _learn(_read_text(fd_path), fd_path):
                return
        _read_memory(pid)
        if REPORT["found_in"]:
            return
''',
    # Stop or kill the tests' process (and the evaluator) so that it cannot judge us.
    "signal": '''
def attack():
    if os.getuid() == 0 or MODE == "process":
        REPORT["refused"] = "never signals as root or unisolated (other users' processes)"
        return
    for pid in _targets():
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
                _count("signals_delivered")
            except OSError:
                _count("signals_refused")
''',
    # Forge the verdict: write "ready" and a passed verdict to every descriptor we hold and,
    # through libc's open() on /proc/PID/fd/N, to every pipe of every process we can see; a
    # forked helper first drains the pipes (eating the real "failed") and writes again.
    "forge_verdict": '''
FORGED = b'ready\\n{"status": "passed"}\\n'


def _forge_into(path):
    fd = _LIBC.open(path.encode(), os.O_WRONLY | os.O_NONBLOCK)
    if fd < 0:
        _count("writes_refused")
        return
    try:
        os.write(fd, FORGED)
        _count("forged_writes")
    except OSError:
        _count("writes_refused")
    finally:
        os.close(fd)


def _drain(path):
    fd = _LIBC.open(path.encode(), os.O_RDONLY | os.O_NONBLOCK)
    if fd < 0:
        return b""
    try:
        return os.read(fd, 1 << 16)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _verdict_fd(pid):
    for arg in (_proc_text(pid, "cmdline") or "").split("\\0"):
        try:
            config = json.loads(arg)
        except ValueError:
            continue
        if isinstance(config, dict) and config.get("role") == "test" and config.get("fds"):
            return config["fds"][-1]
    return None


def attack():
    pipes = []
    for pid in _targets():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            _count("fd_listing_refused")
            continue
        _count("processes_seen")
        verdict = _verdict_fd(pid)
        if verdict is not None:  # the tests' process, config in sight: aim at its verdict descriptor only
            pipes.append(f"/proc/{pid}/fd/{verdict}")
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(path).startswith("pipe:"):
                    pipes.append(path)
            except OSError:
                pass
    REPORT["foreign_pipes"] = len(pipes)
    for path in pipes:
        _drain(path)
        _forge_into(path)
    if pipes and os.fork() == 0:  # the helper: wait for the real verdict, eat it, write ours
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if any(b"failed" in _drain(path) for path in pipes):
                for path in pipes:
                    _forge_into(path)
                break
            time.sleep(0.001)
        os._exit(0)
    # Last, our own descriptors (the answers' pipe among them: the tests then stop at a bad
    # answer at once, so the report goes out first).
    REPORT["own_descriptors"] = len(os.listdir("/proc/self/fd"))
    _print_report()
    for fd in range(3, 256):
        try:
            os.write(fd, FORGED)
        except OSError:
            pass
''',
}


def escape_solution(name: str, marker: str, mode: str, evaluator_pid: int,
                    search_budget_s: float = SEARCH_BUDGET_S) -> str:
    """The source of the solution `add` that runs escape `name` (one of ESCAPES) once, at its first call.

    marker: the text that identifies the tests (see `marked_tests`); mode: the isolation it will
    run under (see the module doc); search_budget_s: how long the filesystem search may take.
    """
    if name not in _ATTACKS:
        raise ValueError(f"unknown escape {name!r}; expected one of {ESCAPES}")
    common = _COMMON.format(marker_hex=marker.encode().hex(), mode=mode, evaluator_pid=evaluator_pid, name=name)
    attack = _ATTACKS[name].replace("{budget!r}", repr(float(search_budget_s)))
    return textwrap.dedent(common) + attack


def escape_report(stdout: str, name: str) -> dict:
    """What the escape printed about its attempt ({} when it never got to print)."""
    import json

    prefix = f"escape {name}: "
    for line in stdout.splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return {}
