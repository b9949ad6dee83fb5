"""The code that runs inside the sandbox (copied there and started as `python -I -B FILE CONFIG`).

Not imported by the suite: `eval.codegen.sandbox` copies this file into the sandbox's read-only files
folder. It uses the standard library only. CONFIG (argv[1]) is JSON: role, limits, descriptor
numbers and names; nothing in it is secret. The sources arrive as open in-memory files
(CONFIG["sources"]: name -> descriptor), each role's own only; `_read_sources` reads and closes
them before any untrusted code runs, so no path, argument or descriptor left in this process
leads to them.

Roles:
- "program": run one program; report "ready", then "error TYPE" or "done NONCE" on the verdict
  descriptor. The nonce arrives through a pipe that is read and closed before the program runs,
  so it is in no file, argument or environment variable the program could read. It is still in
  this process's memory while the program runs (the program could dig it out with `gc` or
  `ctypes`), so "done" is best effort; `run_tests` below does not depend on it.
- "serve": load an untrusted solution and answer calls to its entry point over two pipes. This
  process never reports a verdict, and it is never given the tests: whatever it does, it can
  only answer (or not) the calls.
- "test": trusted code only (the problem's context and tests). It calls the solution through a
  proxy that sends plain data over the pipes, so no code of the solution ever runs here; its
  verdict is the evaluator's evidence of a pass.
"""

import builtins
import json
import linecache
import os
import resource
import sys
import traceback

CONF = json.loads(sys.argv[1])
MAIN_PID = os.getpid()
WORKDIR = os.path.realpath(CONF["workdir"])
MAX_MESSAGE = 16 << 20  # bytes of one answer from the solution's process


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
                count += os.stat("/proc/" + entry).st_uid == uid
            except OSError:
                pass
    return count


def _apply_limits():
    _limit(resource.RLIMIT_AS, CONF["memory"])
    _limit(resource.RLIMIT_CPU, CONF["cpu"])
    _limit(resource.RLIMIT_FSIZE, CONF["fsize"])
    _limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts every process of the (real) user, so allow the ones already running.
    _limit(resource.RLIMIT_NPROC, _user_process_count() + CONF["nproc"])


# A Python audit hook (it cannot be removed once added): the only barrier in "process" mode,
# defence in depth in the others. It sees Python-level calls only, not a child program's.
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


def _read_sources():
    """{name: text} of this role's sources; their descriptors are closed afterwards.

    Each is registered with linecache under NAME.py, so tracebacks still show the lines.
    """
    sources = {}
    for name, fd in CONF["sources"].items():
        with os.fdopen(fd, "rb") as f:
            text = f.read().decode("utf-8")
        filename = name + ".py"
        linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
        sources[name] = text
    return sources


def _say(fd, text):
    os.write(fd, (text + "\n").encode())


def _exit_code(e):
    return e.code if isinstance(e, SystemExit) and isinstance(e.code, int) and e.code else 1


def _print_traceback():
    try:
        sys.stdout.flush()  # what the program printed before it failed
    except BaseException:  # noqa: BLE001 - e.g. a closed stdout
        pass
    try:
        traceback.print_exc()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the verdict is what counts
        pass


# ---------------------------------------------------------------------------------------------
# Plain data between the test process and the solution's: JSON with tags for the types JSON
# lacks. Lists are JSON arrays; every other container is a one-key object, so decoding is
# unambiguous and builds nothing but builtin values (no pickle, no code).

def _enc(x):
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, list):
        return [_enc(v) for v in x]
    for tag, kind in (("t", tuple), ("s", set), ("f", frozenset)):
        if isinstance(x, kind):
            return {tag: [_enc(v) for v in x]}
    if isinstance(x, dict):
        return {"d": [[_enc(k), _enc(v)] for k, v in x.items()]}
    if isinstance(x, (bytes, bytearray)):
        return {"b": bytes(x).decode("latin-1")}
    if isinstance(x, complex):
        return {"c": [x.real, x.imag]}
    raise TypeError(f"a {type(x).__name__} cannot be passed between the tests and the solution "
                    "(plain data only: None, bool, int, float, str, bytes, complex, list, tuple, set, dict)")


def _dec(x):
    if not isinstance(x, dict):
        return [_dec(v) for v in x] if isinstance(x, list) else x
    if len(x) != 1:
        raise ValueError("malformed message from the solution's process")
    (tag, value), = x.items()
    kinds = {"t": tuple, "s": set, "f": frozenset}
    if tag in kinds:
        return kinds[tag](_dec(v) for v in value)
    if tag == "d":
        return {_dec(k): _dec(v) for k, v in value}
    if tag == "b":
        return value.encode("latin-1")
    if tag == "c":
        return complex(*value)
    raise ValueError(f"unknown tag {tag!r} from the solution's process")


# ---------------------------------------------------------------------------------------------

def run_program():
    nonce_fd, verdict_fd = CONF["fds"]
    nonce = os.read(nonce_fd, 64)
    os.close(nonce_fd)
    source = _read_sources()["program"]
    _say(verdict_fd, "ready")
    reserve = bytearray(1 << 20)  # freed on an exception, so that reporting a MemoryError has room
    namespace = {"__name__": "__main__", "__file__": "program.py"}
    sys.argv = ["program.py"]
    sys.addaudithook(_audit)
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException as e:  # noqa: BLE001 - report every way the program can end
        del reserve
        namespace.clear()  # drop what the program allocated (its frames still point at this dict)
        if os.getpid() != MAIN_PID:  # a forked child of the program: not ours to report
            os._exit(1)
        _say(verdict_fd, "error " + type(e).__name__)
        _print_traceback()
        os._exit(_exit_code(e))
    if os.getpid() != MAIN_PID:
        os._exit(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(verdict_fd, b"done " + nonce + b"\n")


def _answer(stream, message):
    stream.write((json.dumps(message) + "\n").encode())
    stream.flush()


def _failure(e):
    return {"raised": type(e).__name__, "message": str(e)[:500]}


def serve():
    requests_fd, answers_fd = CONF["fds"]
    requests, answers = os.fdopen(requests_fd, "rb"), os.fdopen(answers_fd, "wb")
    solution = _read_sources()["solution"]
    namespace = {"__name__": "__main__", "__file__": "solution.py"}
    sys.argv = ["solution.py"]
    sys.addaudithook(_audit)
    try:
        exec(compile(solution, "solution.py", "exec"), namespace)
        function = namespace.get(CONF["entry_point"])
        if not callable(function):
            raise NameError(f"the solution defines no function {CONF['entry_point']!r}")
    except BaseException as e:  # noqa: BLE001 - a solution that does not load fails every test
        _print_traceback()
        _answer(answers, _failure(e))
        os._exit(1)
    _answer(answers, {"ready": True})
    for line in requests:
        reserve = bytearray(1 << 20)
        try:
            call = json.loads(line)
            answer = {"ok": _enc(function(*_dec(call["args"]), **_dec(call["kwargs"])))}
        except BaseException as e:  # noqa: BLE001 - every way a call can end goes back to the tests
            del reserve
            if os.getpid() != MAIN_PID:
                os._exit(1)
            _print_traceback()
            answer = _failure(e)
        if os.getpid() != MAIN_PID:  # a forked child of the solution never answers
            os._exit(0)
        _answer(answers, answer)
    os._exit(0)


class EarlyExit(Exception):
    """The solution's process ended (os._exit, a signal, a limit) before answering a call."""


class BadAnswer(Exception):
    """The solution's process wrote something that is not an answer (garbage, a forged verdict)."""


def _exception(answer):
    name = answer.get("raised")
    message = str(answer.get("message", ""))
    if not isinstance(name, str) or not name.isidentifier():
        return BadAnswer(f"not an answer: {answer!r:.80}")
    kind = getattr(builtins, name, None)
    if isinstance(kind, type) and issubclass(kind, BaseException):
        try:
            return kind(message)
        except TypeError:  # e.g. UnicodeDecodeError wants five arguments
            pass
    return type(name, (Exception,), {})(message)  # same name, so failure types stay comparable


class _Solution:
    """Stands in for the entry point: each call goes, as plain data, to the solution's process."""

    def __init__(self, requests, answers):
        self.requests, self.answers = requests, answers

    def receive(self):
        line = self.answers.readline(MAX_MESSAGE)
        if not line:
            raise EarlyExit("the solution's process ended before answering")
        if not line.endswith(b"\n"):
            raise MemoryError(f"the solution's answer is larger than {MAX_MESSAGE} bytes")
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BadAnswer(f"not an answer: {line[:80]!r}")
        return answer

    def __call__(self, *args, **kwargs):
        try:
            self.requests.write((json.dumps({"args": _enc(list(args)), "kwargs": _enc(kwargs)}) + "\n").encode())
            self.requests.flush()
        except BrokenPipeError:
            raise EarlyExit("the solution's process ended before answering") from None
        answer = self.receive()
        if "ok" not in answer:
            raise _exception(answer)
        try:
            return _dec(answer["ok"])
        except (ValueError, TypeError, KeyError) as e:
            raise BadAnswer(f"not an answer: {e}") from None


def run_tests():
    requests_fd, answers_fd, verdict_fd = CONF["fds"]
    solution = _Solution(os.fdopen(requests_fd, "wb"), os.fdopen(answers_fd, "rb"))
    sources = _read_sources()
    context, tests = sources["context"], sources["tests"]
    _say(verdict_fd, "ready")
    namespace = {"__name__": "__main__", "__file__": "tests.py"}
    try:
        hello = solution.receive()
        if "ready" not in hello:
            raise _exception(hello)  # the solution did not load: its error is the failure
        try:
            context = compile(context, "context.py", "exec")
        except SyntaxError:  # a prompt that ends inside a statement: the tests do without it
            context = None
        if context is not None:
            exec(context, namespace)  # the prompt's helpers (and a body-less stub of the entry point)
        exec(compile(tests, "tests.py", "exec"), namespace)
        namespace[CONF["check"]](solution)
    except BaseException as e:  # noqa: BLE001 - every failure, whatever its kind
        _print_traceback()
        _say(verdict_fd, json.dumps({"status": "failed", "error_type": type(e).__name__}))
        os._exit(1)
    sys.stdout.flush()
    _say(verdict_fd, json.dumps({"status": "passed"}))


_apply_limits()
{"program": run_program, "serve": serve, "test": run_tests}[CONF["role"]]()
