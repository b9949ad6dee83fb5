"""Run untrusted Python (a model's completion and its tests) so that it cannot harm us, see the tests or forge a pass.

    run_tests_sandboxed(solution, tests, "add", context=prompt)  # how codegen-eval judges a completion
    run_sandboxed(program, timeout_s=10)                         # one program, "passed" = ran to its end

Both return a `SandboxResult` (`.passed`, `.status` in {"passed", "failed", "timeout"},
`.error_type`, `.isolation`, `.isolated`). The threat model, in short (README, "Running
generated code"; the escapes tried and their outcomes per mode: docs/results/sandbox.md):

Isolation, chosen by `isolation="auto"` in this order (never "process"):
- "bubblewrap" (the `bwrap` tool, Debian package `bubblewrap`): the program runs in new PID, net,
  IPC and UTS namespaces (no network at all: 127.0.0.1 is the sandbox's own, empty loopback;
  the evaluator and every other process are invisible), on a root that holds read-only binds of
  /usr, /etc, the /bin and /lib links and the interpreter's own folders, with a fresh /proc and
  /dev, a private size-capped tmpfs /tmp and a throwaway tmpfs working directory. Nothing on the
  host is writable. It runs as `nobody`: when we are root, bwrap sets the sandbox up and setpriv
  drops to uid/gid 65534 with no groups and no capabilities before Python starts (a user
  namespace would map "nobody" back onto uid 0 and let it read /etc/shadow); when we are not,
  bwrap runs in an unprivileged user namespace as uid 65534 mapped onto our own uid, so it reads
  only what we can read, of the few folders it sees.
- "namespaces" (root without bwrap; loud warning): `unshare` with new net, PID, IPC, UTS and
  mount namespaces, its own /proc (--mount-proc: only the sandbox's processes), a private tmpfs
  working directory, then `setpriv` as nobody. No network, no view of the evaluator or of the
  other sandbox, nothing owned by root writable; but it sees the host's files as `nobody` does
  (any world-readable file, a checkout's problem files included), and a child program
  (os.system, subprocess, ctypes) can write as nobody to world-writable places such as /tmp.
- "process" (only when asked for by name; its results are marked `isolated=False` and every
  codegen report says so): resource limits and a Python audit hook only. A child program can do
  whatever our user can: read our files, delete them, reach the network, signal us, read and
  write the tests' process through /proc. Use it for code you would run anyway.
In every mode: rlimits (address space, CPU seconds, file size, processes, no core dumps) set by
the runner before any untrusted code, and a wall-clock timeout after which the whole process
tree is killed; the working folders are removed afterwards.

Who sees what. No source is ever written to a file: each process gets its own sources through
anonymous in-memory files (memfd) passed as open descriptors, which the runner reads and closes
before any untrusted code runs. Its command line and environment hold only descriptor numbers,
limits and names (the entry point, `check`). So the solution's process holds the solution
(prompt + completion) and nothing else: no argument, environment variable, mount or descriptor
of it names or holds the tests, and in the isolated modes the tests' process is in another PID
namespace with another /proc, so the solution cannot read its memory, descriptors or command
line, nor signal it. The captured output files are readable by us only (0600). Where the
package's own problem files lie under a folder bound into a sandbox (a non-editable install),
the solution's sandbox gets an empty tmpfs over them.

How a pass is decided (see eval/codegen/_sandbox_runner.py). A process that runs untrusted code can
fake anything it can print or exit with: a "done" line, exit status 0 (`os._exit(0)` before a
failing assert), even a secret token, which sits in its own memory (`gc`, `ctypes`,
/proc/self/mem) while it runs. So `run_tests_sandboxed` never runs the solution where the tests
run: the solution is loaded in its own sandbox and answers calls to its entry point over two
pipes; the tests run in a second sandbox holding only trusted code (the problem's prompt and
tests) and call the solution through a proxy that exchanges plain data (JSON with tags for
tuple, set, dict keys, bytes; never pickle, never code). The verdict is written by that trusted
process to a descriptor only it and we hold. A solution that exits early, crashes, hangs or
answers garbage makes the call fail. What remains: the tests see only return values (in-place
changes to arguments are not sent back, and non-plain values such as generators or custom
objects cannot be returned), and a solution may still game weak tests with correct-looking values.
`run_sandboxed` runs one program as a whole; its "done" report carries a nonce read from a pipe
that is closed before the program starts (no longer in argv, as before), which stops an honest
program's accidental early exit but not one that searches its own memory.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from numbers import Real
from pathlib import Path

from eval.errors import UserInputError

ISOLATIONS = ("auto", "bubblewrap", "namespaces", "process")
ISOLATED = ("bubblewrap", "namespaces")  # modes that keep the solution away from the tests and the evaluator
NOBODY_UID = 65534
MIN_MEMORY_MB = 32  # below this the interpreter cannot even load the tests
_TAIL_CHARS = 2000
_RUNNER_SOURCE = Path(__file__).resolve().parent / "_sandbox_runner.py"
_BOX_WORK, _BOX_FILES = "/sandbox", "/sandbox-files"  # paths inside a bubblewrap sandbox
_PROBLEM_DATA = Path(__file__).resolve().parent / "data"  # the shipped problems: hidden from solutions
_SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): e.g. the runner died before running any untrusted code."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one run; every value must be a positive finite number (processes: an integer)."""

    timeout_s: float = 10.0
    memory_mb: float = 512
    max_processes: int = 16
    max_file_mb: float = 16

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_file_mb", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
                raise UserInputError(f"sandbox: {name} must be a positive finite number, got {value!r}")
        if not isinstance(self.max_processes, int):
            raise UserInputError(f"sandbox: max_processes must be a positive integer, got {self.max_processes!r}")
        if self.memory_mb < MIN_MEMORY_MB:
            raise UserInputError(f"sandbox: memory_mb must be at least {MIN_MEMORY_MB} (the interpreter needs room), "
                                 f"got {self.memory_mb!r}")

    def runner_limits(self) -> dict[str, int]:
        return {"memory": int(self.memory_mb * (1 << 20)), "cpu": math.ceil(self.timeout_s) + 1,
                "fsize": max(1, int(self.max_file_mb * (1 << 20))), "nproc": self.max_processes}


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed run ended.

    status: "passed", "failed" (an exception, an early exit, a signal) or "timeout" (killed at
    the wall-clock limit). error_type: the exception's class name ("NameError",
    "AssertionError", "SystemExit", ...), "Timeout", a signal name such as "SIGXCPU",
    "EarlyExit" for an exit before the end, "SandboxError" when the sandbox itself broke (see
    `failed_run`); None when passed. isolation: the mode that ran; `isolated` is False for
    "process", whose verdicts the program could have forged.
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

    @property
    def isolated(self) -> bool:
        return self.isolation in ISOLATED


def failed_run(error: Exception, isolation: str) -> SandboxResult:
    """A run that ended in an error of ours (e.g. a `SandboxError`) as one failed result named by its type.

    For an evaluation of many completions: one that breaks its sandbox (in "process" mode a
    program can eat the tests' "ready" line) is counted as failed instead of aborting the run.
    """
    return SandboxResult("failed", type(error).__name__, None, 0.0, "", str(error)[-_TAIL_CHARS:], isolation)


def run_sandboxed(program: str, timeout_s: float = 10.0, *, memory_mb: float = 512, max_processes: int = 16,
                  max_file_mb: float = 16, isolation: str = "auto") -> SandboxResult:
    """Execute `program` (Python source) in a contained child; passed = it ran to its end (see the module doc)."""
    if not isinstance(program, str):
        raise UserInputError(f"program must be Python source text (str), got {type(program).__name__}")
    limits = SandboxLimits(timeout_s, memory_mb, max_processes, max_file_mb)
    isolation = resolve_isolation(isolation)
    with _Box(isolation) as box:
        nonce = secrets.token_hex(16).encode()
        nonce_r, nonce_w = os.pipe()
        os.write(nonce_w, nonce)
        os.close(nonce_w)
        verdict_r, verdict_w = os.pipe()
        start = time.monotonic()
        proc = box.start("program", limits, [nonce_r, verdict_w], {}, {"program": program})
        _close(nonce_r, verdict_w)
        timed_out = _wait(proc, start + limits.timeout_s)
        duration = time.monotonic() - start
        reports = _read_available(verdict_r).split(b"\n")
        stdout, stderr = box.output("program")
    if timed_out:
        return SandboxResult("timeout", "Timeout", proc.returncode, duration, stdout, stderr, isolation)
    if b"ready" not in reports:
        raise SandboxError(f"the sandbox ({isolation}) did not start the program: {stderr[-500:]}")
    errors = [r.split()[1].decode(errors="replace") for r in reports if r.startswith(b"error ") and len(r.split()) > 1]
    if errors:
        status, error_type = "failed", errors[0]
    elif proc.returncode == 0 and b"done " + nonce in reports:
        status, error_type = "passed", None
    else:
        status, error_type = "failed", _ended_by(proc.returncode)
    return SandboxResult(status, error_type, proc.returncode, duration, stdout, stderr, isolation)


def run_tests_sandboxed(solution: str, tests: str, entry_point: str, *, context: str = "", check: str = "check",
                        timeout_s: float = 10.0, memory_mb: float = 512, max_processes: int = 16,
                        max_file_mb: float = 16, isolation: str = "auto") -> SandboxResult:
    """Judge `solution` by `tests` (which define `check(candidate)`), each in its own sandbox.

    `solution` is the untrusted source that defines `entry_point` (for HumanEval: prompt +
    completion); `tests` and `context` (the prompt, for its helpers) are trusted and run apart
    from it: the solution's process is given the solution only, the tests' process the tests
    and the context only. The verdict comes from the tests' process only (see the module doc).
    """
    for name, value in (("solution", solution), ("tests", tests), ("context", context)):
        if not isinstance(value, str):
            raise UserInputError(f"{name} must be Python source text (str), got {type(value).__name__}")
    for name, value in (("entry_point", entry_point), ("check", check)):
        if not isinstance(value, str) or not value.isidentifier():
            raise UserInputError(f"{name} must be a Python name, got {value!r}")
    limits = SandboxLimits(timeout_s, memory_mb, max_processes, max_file_mb)
    isolation = resolve_isolation(isolation)
    with _Box(isolation) as box:
        requests_r, requests_w = os.pipe()
        answers_r, answers_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        start = time.monotonic()
        server = box.start("serve", limits, [requests_r, answers_w], {"entry_point": entry_point},
                           {"solution": solution})
        try:
            tester = box.start("test", limits, [requests_w, answers_r, verdict_w], {"check": check},
                               {"context": context, "tests": tests})
        except BaseException:
            _kill_everything(server, running=True)
            raise
        finally:
            _close(requests_r, answers_w, requests_w, answers_r, verdict_w)
        timed_out = _wait(tester, start + limits.timeout_s)
        server_code = server.poll()  # how the solution's process ended, if it ended by itself
        _kill_everything(server, running=server_code is None)
        duration = time.monotonic() - start
        lines = _read_available(verdict_r).decode(errors="replace").splitlines()
        out_s, err_s = box.output("serve")
        out_t, err_t = box.output("test")
    stdout, stderr = (out_s + out_t)[-_TAIL_CHARS:], (err_t + "\n" + err_s).strip()[-_TAIL_CHARS:]
    if timed_out:
        return SandboxResult("timeout", "Timeout", tester.returncode, duration, stdout, stderr, isolation)
    if "ready" not in lines:
        raise SandboxError(f"the sandbox ({isolation}) did not start the tests: {stderr[-500:]}")
    verdict = _last_verdict(lines)
    if verdict is None:  # the trusted process died without a verdict: never a pass
        return SandboxResult("failed", _ended_by(tester.returncode), tester.returncode, duration, stdout, stderr,
                             isolation)
    status, error_type = verdict.get("status"), verdict.get("error_type")
    if status != "passed":
        status = "failed"
        if error_type == "EarlyExit" and server_code is not None and _ended_by(server_code) != "EarlyExit":
            error_type = _ended_by(server_code)  # e.g. SIGXCPU: the solution hit its CPU limit
    return SandboxResult(status, None if status == "passed" else str(error_type), tester.returncode, duration,
                         stdout, stderr, isolation)


def _last_verdict(lines: list[str]) -> dict | None:
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


# ---------------------------------------------------------------------------------------------
# Choosing the isolation


def resolve_isolation(isolation: str = "auto") -> str:
    """The mode a run will use: for "auto" the strongest isolated one (a loud warning below bubblewrap).

    "process" is never chosen for the user: it runs only when named (here or in SLIMTUNE_SANDBOX),
    because a program in it can forge its verdict; its results say `isolated=False`.
    """
    if isolation not in ISOLATIONS:
        raise UserInputError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "auto":
        forced = os.environ.get("SLIMTUNE_SANDBOX")
        if forced in ISOLATIONS[1:]:
            isolation = forced
        elif bubblewrap_available():
            return "bubblewrap"
        elif namespace_isolation_available():
            isolation = "namespaces"
        else:
            raise UserInputError("no isolated sandbox here: install bubblewrap (Debian/Ubuntu: apt-get install "
                                 "bubblewrap), or run as root with `unshare` and `setpriv` for isolation='namespaces'. "
                                 "isolation='process' runs generated code unisolated (it can forge its own verdict) "
                                 "and is used only when asked for by name")
        _warn_weak(isolation)
    elif isolation == "process":
        _warn_weak(isolation)
    if isolation == "bubblewrap" and not bubblewrap_available():
        raise UserInputError("isolation='bubblewrap' needs a working `bwrap` (Debian/Ubuntu: apt-get install "
                             "bubblewrap; it also needs user namespaces when not run as root)")
    if isolation == "namespaces" and not namespace_isolation_available():
        raise UserInputError("isolation='namespaces' needs root with working `unshare` (mount namespaces "
                             "included) and `setpriv`; isolation='process' runs unisolated")
    return isolation


@functools.cache
def _warn_weak(isolation: str) -> None:
    if isolation != "bubblewrap":
        warnings.warn(f"SANDBOX IS WEAK: generated code runs with isolation={isolation!r}, not bubblewrap, which "
                      f"does not contain everything (see the README, 'Running generated code')"
                      + (": UNISOLATED, a program can forge its own pass" if isolation not in ISOLATED else "")
                      + ". Install bubblewrap (apt-get install bubblewrap) for full isolation.",
                      RuntimeWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def bubblewrap_available() -> bool:
    """True when `bwrap` runs a probe as uid 65534 in our bubblewrap layout (checked once)."""
    if not sys.platform.startswith("linux") or not shutil.which("bwrap"):
        return False
    if os.geteuid() == 0 and not shutil.which("setpriv"):
        return False
    probe = f"import os, sys; sys.exit(0 if os.getuid() == {NOBODY_UID} else 3)"
    with tempfile.TemporaryDirectory(prefix="slimtune-sandbox-probe-") as files:
        os.chmod(files, 0o755)
        argv = _bubblewrap_argv(files, 64 << 20, [_interpreter(), "-I", "-B", "-c", probe])
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0


@functools.lru_cache(maxsize=1)
def namespace_isolation_available() -> bool:
    """True when we are root on Linux and a probe run inside unshare + setpriv works."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return False
    if not (shutil.which("unshare") and shutil.which("setpriv")):
        return False
    probe = [_world_interpreter(), "-I", "-B", "-c",
             f"import os, socket; assert os.getuid() == {NOBODY_UID}; assert os.listdir('.') == []; "
             f"assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1']"]
    with tempfile.TemporaryDirectory(prefix="slimtune-sandbox-probe-") as work:
        os.chmod(work, 0o755)
        try:
            done = subprocess.run(_namespace_argv(work, 1 << 20, probe), stdin=subprocess.DEVNULL,
                                  capture_output=True, timeout=30, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0


# ---------------------------------------------------------------------------------------------
# One run's folders and processes


class _Box:
    """A run's host folder, removed on exit whatever happened: `files/` (the runner only,
    read-only), one working folder per role (`work-ROLE`, the cwd outside bubblewrap) and the
    captured output (readable by us only). Sources never go there: see `_source_fd`."""

    def __init__(self, isolation: str):
        self.isolation = isolation
        self.processes: list[subprocess.Popen] = []

    def __enter__(self):
        self.base = Path(tempfile.mkdtemp(prefix="slimtune-sandbox-"))
        try:
            os.chmod(self.base, 0o711)  # `nobody` may pass through to the runner, not list the folder
            self.files = self.base / "files"
            self.files.mkdir(mode=0o755)
            shutil.copyfile(_RUNNER_SOURCE, self.files / "runner.py")
            (self.files / "runner.py").chmod(0o644)
        except BaseException:
            shutil.rmtree(self.base, ignore_errors=True)
            raise
        return self

    def __exit__(self, *exc):
        for proc in self.processes:
            _kill_everything(proc, running=proc.returncode is None)
        shutil.rmtree(self.base, ignore_errors=True)

    def start(self, role: str, limits: SandboxLimits, fds: list[int], extra: dict,
              sources: dict[str, str]) -> subprocess.Popen:
        """Start the runner as `role`; it gets `sources` (name -> Python text) and nothing else to read."""
        host_work = self.base / f"work-{role}"
        # namespaces: root-owned and empty on the host; the role mounts a private tmpfs over it,
        # so the other role (same uid `nobody`) sees this empty folder, never the role's files.
        host_work.mkdir(mode=0o755)
        inside_files = _BOX_FILES if self.isolation == "bubblewrap" else str(self.files)
        workdir = _BOX_WORK if self.isolation == "bubblewrap" else str(host_work)
        source_fds = {name: _source_fd(text) for name, text in sources.items()}
        try:
            config = {"role": role, "fds": fds, "sources": source_fds, "workdir": workdir,
                      **limits.runner_limits(), **extra}
            inner = [_interpreter() if self.isolation != "namespaces" else _world_interpreter(), "-I", "-B",
                     f"{inside_files}/runner.py", json.dumps(config)]
            tmpfs_bytes = int(limits.memory_mb) << 20
            hidden = _hidden_from(role)
            if self.isolation == "bubblewrap":
                argv = _pdeathsig() + _bubblewrap_argv(str(self.files), tmpfs_bytes, inner, hidden)
            elif self.isolation == "namespaces":
                argv = _pdeathsig() + _namespace_argv(workdir, tmpfs_bytes, inner, hidden)
            else:
                argv = inner
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8",
                   "TMPDIR": "/tmp" if self.isolation == "bubblewrap" else workdir}
            with _private_file(self.base / f"{role}.stdout") as out, _private_file(self.base / f"{role}.stderr") as err:
                proc = subprocess.Popen(argv, cwd=host_work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=err, start_new_session=True, close_fds=True,
                                        pass_fds=[*fds, *source_fds.values()])
        finally:
            _close(*source_fds.values())
        self.processes.append(proc)
        return proc

    def output(self, role: str) -> tuple[str, str]:
        return _tail(self.base / f"{role}.stdout"), _tail(self.base / f"{role}.stderr")


def _source_fd(text: str) -> int:
    """An anonymous in-memory file holding `text`, rewound: a descriptor that no path names."""
    data = text.encode("utf-8")
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("source")  # close-on-exec: only a child given it in pass_fds holds it
    else:  # not Linux (process mode only): an unlinked temporary file
        fd = os.dup(tempfile.TemporaryFile().fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_file(path: Path):
    return open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def _hidden_from(role: str) -> list[str]:
    """Folders an untrusted role's sandbox gets an empty tmpfs over: the shipped problems and their tests."""
    if role == "test" or not _PROBLEM_DATA.is_dir():
        return []
    return [str(_PROBLEM_DATA)]


def _bubblewrap_argv(files: str, tmpfs_bytes: int, inner: list[str], hidden: list[str] = ()) -> list[str]:
    """bwrap's command line: namespaces, a read-only minimal root, private tmpfs /tmp and work dir.

    `hidden`: folders that, where a bind brings them in, are covered by an empty read-only tmpfs.
    """
    argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-ipc", "--unshare-pid", "--unshare-net",
            "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:
        # Privileged setup, then setpriv (below) drops to nobody: these two capabilities exist
        # only for that drop and are gone, with every other one, before Python starts.
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        inner = [shutil.which("setpriv") or "setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}",
                 "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--", *inner]
    else:
        argv += ["--unshare-user", "--uid", str(NOBODY_UID), "--gid", str(NOBODY_UID)]
    for name in _SYSTEM_DIRS:
        path = "/" + name
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    size = str(max(tmpfs_bytes, 1 << 20))
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", size, "--perms", "1777", "--tmpfs", "/tmp",
             "--size", size, "--perms", "1777", "--tmpfs", _BOX_WORK,
             "--perms", "0755", "--dir", _BOX_FILES, "--ro-bind", files, _BOX_FILES]
    made = {"/", "/tmp", "/proc", "/dev", _BOX_WORK, _BOX_FILES}
    bound = ["/" + n for n in _SYSTEM_DIRS]  # folders whose insides already exist (read-only)
    for path in _interpreter_dirs():
        for parent in map(str, reversed(Path(path).parents)):
            if parent not in made and not any(parent == b or parent.startswith(b + "/") for b in bound):
                argv += ["--perms", "0755", "--dir", parent]  # bwrap would make it 0700: untraversable
                made.add(parent)
        argv += ["--ro-bind", path, path]
        bound.append(path)
    for path in hidden:
        if any(path == b or path.startswith(b + "/") for b in bound):
            argv += ["--size", "4096", "--perms", "0755", "--tmpfs", path, "--remount-ro", path]
    return argv + ["--chdir", _BOX_WORK, "--", *inner]


def _interpreter_dirs() -> list[str]:
    """The interpreter's folders (venv and base installation) that the system binds do not cover."""
    candidates = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    candidates.add(os.path.realpath(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))))
    covered = tuple("/" + n + "/" for n in _SYSTEM_DIRS)
    dirs = sorted(p for p in candidates if not (p + "/").startswith(covered) and p != "/")
    return [p for p in dirs if not any(p.startswith(q + "/") for q in dirs if q != p)]


def _interpreter() -> str:
    """This interpreter by a path that exists inside bubblewrap: its folder's links resolved (a venv
    reached through a symlink is bound at its real place), its own name kept (a venv's python is a
    link to the base one, and only the venv's path makes it use the venv)."""
    if not sys.executable:
        return shutil.which("python3") or "python3"
    return os.path.join(os.path.realpath(os.path.dirname(sys.executable)), os.path.basename(sys.executable))


def _pdeathsig() -> list[str]:
    # If the evaluator dies, its sandbox launcher gets SIGKILL too (bwrap --die-with-parent and
    # unshare --kill-child then take the whole sandbox down).
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


# Runs as root inside the new namespaces, before setpriv drops to nobody. $1: the working folder
# (gets a private tmpfs owned by nobody), $2: its size, then folders to hide up to "--", then the
# command. The mount namespace is private (unshare's default propagation), so none of this
# reaches the host or the other sandbox.
_NAMESPACE_SETUP = f"""set -e
work=$1; size=$2; shift 2
mount -t tmpfs -o "size=$size,mode=0700,uid={NOBODY_UID},gid={NOBODY_UID}" tmpfs "$work"
cd "$work"  # the cwd we were started in is the host folder below the new mount
while [ "$1" != -- ]; do mount -t tmpfs -o ro,size=4096,mode=0755 tmpfs "$1"; shift; done
shift
exec "$@"
"""


def _namespace_argv(workdir: str, tmpfs_bytes: int, inner: list[str], hidden: list[str] = ()) -> list[str]:
    """unshare's command line: new net, PID, IPC, UTS and mount namespaces with their own /proc.

    --mount-proc: /proc shows the sandbox's processes only (not the host's, not the other
    sandbox's). --kill-child: if unshare dies, its child (the namespace's init) gets SIGKILL,
    which takes every process in the namespace with it.
    """
    return ["unshare", "--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc",
            "--", "/bin/sh", "-c", _NAMESPACE_SETUP, "sandbox-setup", workdir, str(max(tmpfs_bytes, 1 << 20)),
            *hidden, "--",
            "setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_UID}", "--clear-groups", "--inh-caps=-all",
            "--bounding-set=-all", "--", *inner]


def _world_interpreter() -> str:
    """The first Python that `nobody` may execute (namespaces mode runs on the host's filesystem)."""
    for candidate in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", shutil.which("python3")):
        if candidate and _world_executable(candidate):
            return os.path.realpath(candidate)
    return _interpreter()


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


# ---------------------------------------------------------------------------------------------
# Waiting, killing, reading back


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait until `proc` ends or the deadline passes; then kill its whole tree. True on timeout."""
    timed_out = False
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_everything(proc, running=proc.returncode is None)
    return timed_out


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


def _close(*fds: int) -> None:
    for fd in fds:
        _quietly(lambda fd=fd: os.close(fd))


def _read_available(fd: int, limit: int = 1 << 16) -> bytes:
    """What the pipe holds, without blocking (a writer that escaped the kill must not stall us)."""
    os.set_blocking(fd, False)
    chunks, size = [], 0
    try:
        while size < limit:
            chunk = os.read(fd, limit - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 4 * _TAIL_CHARS))
        return f.read().decode("utf-8", errors="replace")[-_TAIL_CHARS:]


def _ended_by(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return _signal_name(-returncode)
    if returncode is not None and returncode > 128:  # a shell-style (or bwrap) "killed by signal" status
        return _signal_name(returncode - 128)
    return "EarlyExit"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
