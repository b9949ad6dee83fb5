"""Run untrusted Python (a model's completion plus its tests) so that it cannot hang or harm us.

`run_sandboxed(program, timeout_s)` executes `program` in a separate `python -I -B` process and
returns a `SandboxResult` (`.passed`, `.status` in {"passed", "failed", "timeout"}, `.error_type`).

Containment, in two layers:

1. Always (inside the child, before the program runs; see `_RUNNER`):
   - resource limits: address space (`RLIMIT_AS`, so endless allocation ends in `MemoryError`),
     CPU seconds (`RLIMIT_CPU`), size of any file written (`RLIMIT_FSIZE`, stdout/stderr too),
     no core dumps (`RLIMIT_CORE`), and number of processes (`RLIMIT_NPROC`, counted on top of
     the processes the user already has; the kernel does not enforce it for root);
   - a Python audit hook (it cannot be removed once added) that refuses, with `PermissionError`,
     any write, create, delete, rename, chmod or link outside the throwaway working directory,
     and any socket creation, connection or name lookup;
   - its own session and process group (`start_new_session`); stdout/stderr go to files, not
     pipes, so a lingering child holding them cannot stall us.
2. When we are root and `unshare` and `setpriv` work (Linux; checked once by a probe run),
   `isolation="namespace"`: the child runs in a new network namespace (no interfaces but a
   down loopback: no network at all, whatever the code does) and a new PID namespace whose
   init is the program (when it ends or is killed, the kernel kills every process it left),
   as user `nobody` (so the process limit is enforced and nothing owned by root is writable,
   even by a shell the program starts). Otherwise `isolation="process"`: layer 1 only.

On a timeout, and after every run, the whole process group is killed (SIGKILL), plus every
descendant still found in the process tree. The working directory is removed afterwards.

What is not contained in "process" mode (documented, not hidden): a child process that is not
Python (e.g. `os.system("...")`) is not seen by the audit hook, and a grandchild that calls
`setsid()` and outlives its parent escapes the group kill. "namespace" mode closes both, except
that `nobody` can still write to world-writable places such as /tmp from a non-Python child.
A program passes only if it runs to its end: `exit()` (even `exit(0)`) or `os._exit()` before
the end counts as failed, so a completion cannot skip its tests by exiting.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from eval.errors import UserInputError

ISOLATIONS = ("auto", "namespace", "process")
NOBODY_UID = 65534
_TAIL_CHARS = 2000

# The child's entry point. It sets the limits, installs the audit hook, then executes
# program.py, and reports how it ended with a line tagged by a per-run random nonce (so the
# program's own output cannot be mistaken for our report). argv: nonce, memory bytes, CPU
# seconds, file bytes, extra processes.
_RUNNER = r'''
import os, resource, sys, traceback

NONCE = sys.argv[1]
MEMORY, CPU, FSIZE, NPROC = (int(a) for a in sys.argv[2:6])
MAIN_PID = os.getpid()


def _limit(kind, value):
    soft, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(kind, (value, value))


def _user_process_count():
    uid, count = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat("/proc/" + entry).st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


_limit(resource.RLIMIT_AS, MEMORY)
_limit(resource.RLIMIT_CPU, CPU)
_limit(resource.RLIMIT_FSIZE, FSIZE)
_limit(resource.RLIMIT_CORE, 0)
# RLIMIT_NPROC counts all processes of the (real) user, so allow the ones already running.
_limit(resource.RLIMIT_NPROC, _user_process_count() + NPROC)

WORKDIR = os.path.realpath(os.getcwd())
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {  # audit event -> positions of the path arguments it modifies
    "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
    "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1), "os.link": (0, 1),
    "os.symlink": (1,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.copytree": (1,),
    "shutil.move": (0, 1), "os.mkfifo": (0,), "os.mknod": (0,), "os.chflags": (0,),
}
_NETWORK_EVENTS = {
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
    "socket.gethostbyname_ex", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sendto",
}


def _inside_workdir(path):
    if isinstance(path, int) or path is None:  # an already open descriptor
        return True
    path = os.path.realpath(os.fsdecode(path))
    return path == WORKDIR or path.startswith(WORKDIR + os.sep) or path == os.devnull


def _is_write(mode, flags):
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return isinstance(flags, int) and bool(flags & _WRITE_FLAGS)


def _audit(event, args):
    if event == "open":
        if _is_write(args[1], args[2]) and not _inside_workdir(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
    elif event in _PATH_EVENTS:
        for i in _PATH_EVENTS[event]:
            if i < len(args) and not _inside_workdir(args[i]):
                raise PermissionError(f"sandbox: {event} on {args[i]!r} outside the working directory is not allowed")
    elif event in _NETWORK_EVENTS:
        raise PermissionError("sandbox: network access is disabled")


with open("program.py", encoding="utf-8") as f:
    SOURCE = f.read()
del f
ERROR_REPORT = "\n" + NONCE + " error {}\n"
DONE_REPORT = ("\n" + NONCE + " done\n").encode()
RESERVE = bytearray(1 << 20)  # freed on an exception, so that reporting a MemoryError has room
namespace = {"__name__": "__main__", "__file__": "program.py"}
sys.argv = ["program.py"]
sys.addaudithook(_audit)
try:
    exec(compile(SOURCE, "program.py", "exec"), namespace)
except BaseException as e:  # noqa: BLE001 - report every way the program can end
    del RESERVE
    namespace.clear()  # drop what the program allocated (its frames still point at this dict)
    if os.getpid() != MAIN_PID:  # a forked child of the program: not ours to report
        os._exit(1)
    os.write(2, ERROR_REPORT.format(type(e).__name__).encode())
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the report above is what counts
        pass
    code = e.code if isinstance(e, SystemExit) and isinstance(e.code, int) and e.code else 1
    os._exit(code)
if os.getpid() != MAIN_PID:
    os._exit(0)
sys.stdout.flush()
sys.stderr.flush()
os.write(2, DONE_REPORT)
'''


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed program ended.

    status: "passed" (ran to its end), "failed" (an exception, an early exit, a signal) or
    "timeout" (killed at the wall-clock limit). error_type: the exception's class name
    ("NameError", "AssertionError", "SystemExit", ...), "Timeout", a signal name such as
    "SIGXCPU" when the process was killed, "EarlyExit" for `os._exit` before the end; None
    when passed.
    """

    status: str
    error_type: str | None
    returncode: int | None
    duration_s: float
    stdout: str
    stderr: str
    isolation: str

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_sandboxed(
    program: str,
    timeout_s: float = 10.0,
    *,
    memory_mb: int = 512,
    max_processes: int = 16,
    max_file_mb: int = 16,
    isolation: str = "auto",
) -> SandboxResult:
    """Execute `program` (Python source) in a contained child process; see the module doc."""
    if not isinstance(program, str):
        raise UserInputError(f"program must be Python source text (str), got {type(program).__name__}")
    if not timeout_s > 0:
        raise UserInputError(f"timeout_s must be > 0, got {timeout_s}")
    if isolation not in ISOLATIONS:
        raise UserInputError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "auto":
        isolation = "namespace" if namespace_isolation_available() else "process"
    elif isolation == "namespace" and not namespace_isolation_available():
        raise UserInputError("isolation='namespace' needs root with working `unshare` and `setpriv`; use 'process'")

    base = Path(tempfile.mkdtemp(prefix="slimtune-sandbox-"))
    try:
        os.chmod(base, 0o711)  # `nobody` may pass through to its working directory, not list ours
        workdir = base / "work"
        workdir.mkdir()
        (workdir / "program.py").write_text(program, encoding="utf-8")
        (workdir / "_runner.py").write_text(_RUNNER, encoding="utf-8")
        if isolation == "namespace":
            for path in (workdir, workdir / "program.py", workdir / "_runner.py"):
                os.chown(path, NOBODY_UID, NOBODY_UID)
        nonce = secrets.token_hex(8)
        cpu_s = int(timeout_s) + 1
        argv = [_interpreter(isolation), "-I", "-B", "_runner.py", nonce, str(memory_mb << 20), str(cpu_s),
                str(max_file_mb << 20), str(max_processes)]
        if isolation == "namespace":
            argv = _namespace_prefix() + argv
        return _run(argv, workdir, base, nonce, timeout_s, isolation)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _run(argv: list[str], workdir: Path, base: Path, nonce: str, timeout_s: float, isolation: str) -> SandboxResult:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "LANG": "C.UTF-8", "TMPDIR": str(workdir)}
    with open(base / "stdout", "w+b") as out, open(base / "stderr", "w+b") as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_everything(proc, running=proc.returncode is None)
        duration = time.monotonic() - start
        stdout, stderr = _tail(out), _tail(err)
    status, error_type = _classify(proc.returncode, stderr, nonce, timed_out)
    stderr = "\n".join(line for line in stderr.splitlines() if not line.startswith(nonce)).rstrip()
    return SandboxResult(status, error_type, proc.returncode, duration, stdout, stderr, isolation)


def _kill_everything(proc: subprocess.Popen, running: bool) -> None:
    """SIGKILL the process, every descendant and every member of its process group; wait for them.

    Killing is asynchronous, so we wait (a few seconds at most) until each is gone or a zombie.
    Descendants are looked up only while the process is still running and unreaped (its pid
    cannot have been reused); once it has ended, its orphans are still found by process group.
    """
    victims = _descendants(proc.pid) if running else []
    _kill_group(proc.pid)
    proc.wait()
    try:
        os.killpg(proc.pid, 0)  # the group outlives its reaped leader while members remain
        victims += _group_members(proc.pid)
    except (ProcessLookupError, PermissionError):
        pass
    for victim in victims:
        _quietly(victim.kill)
    _kill_group(proc.pid)
    _wait_gone(victims, timeout_s=5.0)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list:
    try:
        import psutil

        return psutil.Process(pid).children(recursive=True)
    except Exception:  # noqa: BLE001 - already gone, or psutil missing: the group kill remains
        return []


def _group_members(pgid: int) -> list:
    import psutil

    members = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid:
                members.append(p)
        except (OSError, psutil.Error):
            pass
    return members


def _wait_gone(processes: list, timeout_s: float) -> None:
    import psutil

    deadline = time.monotonic() + timeout_s
    pending = list(processes)
    while pending and time.monotonic() < deadline:
        still = []
        for p in pending:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    still.append(p)
            except psutil.Error:
                pass
        pending = still
        if pending:
            time.sleep(0.01)


def _quietly(fn) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - it ended by itself meanwhile
        pass


def _tail(f) -> str:
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(0, size - 4 * _TAIL_CHARS))
    return f.read().decode("utf-8", errors="replace")[-_TAIL_CHARS:]


def _classify(returncode: int, stderr: str, nonce: str, timed_out: bool) -> tuple[str, str | None]:
    if timed_out:
        return "timeout", "Timeout"
    reports = [line.split()[1:] for line in stderr.splitlines() if line.startswith(nonce)]
    for report in reports:
        if report and report[0] == "error":
            return "failed", report[1] if len(report) > 1 else "Exception"
    if returncode == 0 and ["done"] in reports:
        return "passed", None
    if returncode is not None and returncode < 0:
        return "failed", _signal_name(-returncode)
    if returncode is not None and returncode > 128:  # a shell-style "killed by signal" status
        return "failed", _signal_name(returncode - 128)
    return "failed", "EarlyExit"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _namespace_prefix() -> list[str]:
    # New network + PID namespaces; --kill-child: if unshare dies, its child (the namespace's
    # init, i.e. the program) gets SIGKILL, which takes every process in the namespace with it.
    return ["unshare", "--net", "--pid", "--fork", "--kill-child",
            "setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups", "--"]


def _interpreter(isolation: str = "process") -> str:
    """The Python that runs the program: ours, or (as `nobody`) the first one `nobody` may execute."""
    candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", shutil.which("python3")]
    if isolation == "namespace":
        for candidate in candidates:
            if candidate and _world_executable(candidate):
                return os.path.realpath(candidate)
    return sys.executable or shutil.which("python3") or "python3"


def _world_executable(path: str) -> bool:
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == os.path.dirname(parent):
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def namespace_isolation_available() -> bool:
    """True when we are root on Linux and a probe run inside the namespaces works."""
    if os.environ.get("SLIMTUNE_SANDBOX") == "process":
        return False
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    probe = _namespace_prefix() + [_interpreter("namespace"), "-I", "-B", "-c",
                                   f"import os, socket; assert os.getuid() == {NOBODY_UID}"]
    try:
        done = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd="/")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0
