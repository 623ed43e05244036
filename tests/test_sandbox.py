"""The code sandbox: correct programs pass, wrong ones fail, and hostile programs stay inside their limits
while this test process stays healthy. Every hostile case checks that the effect it tried to have is absent
on the real system, so each test fails if the protection it is about is taken away."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import socket
import sys
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from opd.grading.sandbox import SandboxError, SandboxLimits, check_program, isolation_level, run_python

FAST = SandboxLimits(timeout_seconds=5.0)
SEPARATE_UID = isolation_level() == "separate-uid"


def _processes_with(marker: str) -> list[int]:
    """Pids of processes on the real system whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            pass
    return found


def _gone(marker: str, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while _processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _spawn_marked(marker: str, body: str) -> str:
    """Program text that starts a child Python (`body`, with `marker` in its command line) and goes on."""
    return textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()  # leaves the process group: killing the group alone would miss it
            os.execv(sys.executable, [sys.executable, "-c", {body!r}, {marker!r}])
    """)


def _visible_to_sandbox(path: Path) -> bool:
    from opd.grading.sandbox import _hidden_folders

    hidden = [*_hidden_folders(), "/tmp", "/var/tmp", "/dev/shm"]
    resolved = str(path.resolve())
    return not any(resolved == h or resolved.startswith(h + "/") for h in hidden)


@pytest.fixture
def visible_dir():
    """A folder the sandbox still sees (not under /tmp, /root, /home or /run, which it replaces). The
    repository's git-ignored .pytest_cache when the checkout is visible; a checkout under /tmp (a fresh CI
    clone may be one) is hidden, so then a scratch folder under /var/lib, /srv or /opt is used."""
    candidates = [Path(__file__).resolve().parents[1] / ".pytest_cache", Path("/var/lib"), Path("/srv"), Path("/opt")]
    for base in candidates:
        if not _visible_to_sandbox(base):
            continue
        try:
            base.mkdir(exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="opd-sandbox-test-", dir=base))
        except OSError:
            continue
        folder.chmod(0o755)
        yield folder
        shutil.rmtree(folder)
        return
    pytest.skip("no writable folder that the sandbox does not hide")


def test_passing_and_failing_solutions():
    program = "def add(a, b):\n    return a + b\n"
    good = check_program(program, "assert add(2, 3) == 5")
    assert good.passed and good.returncode == 0 and good.reason == "passed"
    wrong = check_program(program.replace("a + b", "a - b"), "assert add(2, 3) == 5, 'add(2, 3) is wrong'")
    assert not wrong.passed and wrong.returncode == 1
    assert wrong.reason == "exit code 1: AssertionError: add(2, 3) is wrong"
    broken = run_python("def f(:\n")
    assert not broken.passed and "SyntaxError" in broken.reason


def test_infinite_loop_is_killed_at_the_timeout_with_all_its_processes():
    marker = f"opd-sandbox-loop-{os.getpid()}-{time.monotonic_ns()}"
    # The child sleeps, so that only a kill (not the CPU-time backstop) can end it.
    program = _spawn_marked(marker, "import time; time.sleep(60)") + "while True:\n    pass\n"
    results = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: results.append(run_python(program, SandboxLimits(timeout_seconds=1.5))))
    worker.start()
    worker.join(15.0)  # a sandbox that cannot kill its program would hang here: fail instead
    assert not worker.is_alive(), "the sandbox did not stop an infinite loop"
    result = results[0]
    assert result.timed_out and not result.passed and result.returncode is None
    assert result.reason == "timeout after 1.5s"
    assert time.monotonic() - started < 4.0
    assert _gone(marker), "a child of the timed-out program is still running"


def test_background_processes_do_not_outlive_a_finished_run():
    marker = f"opd-sandbox-bg-{os.getpid()}-{time.monotonic_ns()}"
    result = run_python(_spawn_marked(marker, "import time; time.sleep(60)") + "print('parent done')\n", FAST)
    assert result.passed and result.stdout == "parent done\n"
    assert _gone(marker), "a setsid() child survived its run"


def test_process_flood_is_capped_even_as_root():
    # Up to 500 children that sleep: without a cap (root ignores RLIMIT_NPROC) all 500 would be created.
    flood = textwrap.dedent("""
        import os, time
        created = 0
        try:
            for _ in range(500):
                if os.fork() == 0:
                    time.sleep(3)
                    os._exit(0)
                created += 1
        except OSError as error:
            print("stopped", created, error.errno)
        else:
            print("created", created)
    """)
    result = run_python(flood, SandboxLimits(timeout_seconds=8.0, max_processes=16))
    assert result.stdout.startswith("stopped"), result
    assert 0 < int(result.stdout.split()[1]) < 16
    assert run_python("print('still fine')", FAST).passed  # and we can go on


def test_large_allocation_fails_inside_the_child():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limits = SandboxLimits(timeout_seconds=10.0, memory_bytes=256 << 20)  # (pages are touched to fill a cgroup)
    result = run_python("block = bytearray(4 * 1024 ** 3)\nprint('allocated')\n", limits)
    # Past the run's memory cgroup the kernel kills the program; without one, RLIMIT_AS makes malloc fail.
    expected = {"exit code 1: MemoryError", f"memory limit exceeded ({256 << 20} bytes for the whole run)"}
    assert not result.passed and result.reason in expected and "allocated" not in result.stdout, result.reason
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB: we did not grow


def test_file_size_is_capped():
    limits = SandboxLimits(timeout_seconds=5.0, max_file_bytes=1 << 20)
    program = "with open('big.bin', 'wb') as handle:\n    handle.write(b'x' * (4 << 20))\n"
    result = run_python(program, limits)
    assert not result.passed and "File too large" in result.reason


def test_no_network_even_to_a_local_listener():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
        result = run_python(program, FAST)
        assert not result.passed and "connected" not in result.stdout
        assert "Network is unreachable" in result.reason or "Connection refused" in result.reason, result.reason
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever reached our listener


def test_writes_outside_the_work_folder_fail_and_the_work_folder_goes_away(tmp_path, visible_dir):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    open_to_all = visible_dir / "open"
    open_to_all.mkdir()
    open_to_all.chmod(0o777)  # only a read-only mount stops a write here
    marker = f"opd-sandbox-{os.getpid()}-{time.monotonic_ns()}"
    outside = list(dict.fromkeys([closed / marker, open_to_all / marker, Path("/root") / marker, Path.home() / marker]))
    private = f"/tmp/{marker}"  # allowed, but in the sandbox's own /tmp
    program = textwrap.dedent(f"""
        import os
        for path in {[str(path) for path in outside] + [private]!r}:
            try:
                with open(path, "w") as handle:
                    handle.write("escaped")
                print("wrote", path)
            except OSError as error:
                print("refused", path, error.errno)
        with open("inside.txt", "w") as handle:
            handle.write("fine")
        print(os.getcwd())
    """)
    result = run_python(program, FAST)
    assert result.passed, result.stderr
    lines = result.stdout.splitlines()
    for path in outside:
        assert f"refused {path}" in " ".join(lines), lines
        assert not os.path.exists(path)  # (False too where we may not look: the refusal above is what counts)
    assert f"wrote {private}" in lines and not os.path.exists(private)
    work = lines[-1]
    assert work.startswith("/tmp/") and not os.path.exists(os.path.join(work, "inside.txt"))


def test_files_the_user_did_not_expose_cannot_be_read(tmp_path, visible_dir):
    secrets = []
    folders = [tmp_path / "private", visible_dir / "private"]
    if SEPARATE_UID:
        folders.append(Path("/root") / f".opd-sandbox-test-{os.getpid()}")
    for folder in folders:
        folder.mkdir(mode=0o700)
        secret = folder / "secret.txt"
        secret.write_text("s3cret")
        secret.chmod(0o600)
        secrets.append(secret)
    try:
        for secret in secrets:
            result = run_python(f"print(open({str(secret)!r}).read())\n", FAST)
            if secret.is_relative_to(visible_dir) and not SEPARATE_UID:
                # The documented weaker guarantee: without root the program runs as us and reads what we read.
                assert result.passed and "s3cret" in result.stdout
                continue
            assert not result.passed and "s3cret" not in result.stdout, result
            # /tmp and /root are replaced by empty folders; elsewhere the program's own uid is refused.
            expected = "PermissionError" if secret.is_relative_to(visible_dir) else "FileNotFoundError"
            assert expected in result.reason, (secret, result.reason)
    finally:
        if SEPARATE_UID:
            shutil.rmtree(folders[-1])


def test_endless_output_is_cut_without_growing_our_memory():
    limits = SandboxLimits(timeout_seconds=10.0, max_output_bytes=64 * 1024)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    program = "import sys\nwhile True:\n    print('x' * 1000)\n    print('y' * 1000, file=sys.stderr)\n"
    result = run_python(program, limits)
    assert not result.passed and not result.timed_out and result.reason.startswith("output limit exceeded")
    assert len(result.stdout) + len(result.stderr) == limits.max_output_bytes
    assert time.monotonic() - started < 5.0  # stopped as soon as the limit was passed, not at the timeout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # KiB


def test_environment_is_minimal_isolated_and_fresh(monkeypatch):
    monkeypatch.setenv("OPD_TEST_SECRET", "hunter2")
    program = textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"environ": dict(os.environ), "isolated": sys.flags.isolated, "cwd": os.getcwd(),
                          "files": os.listdir("."), "uid": os.getuid(), "gid": os.getgid()}))
    """)
    first, second = (json.loads(run_python(program, FAST).stdout) for _ in range(2))
    assert "hunter2" not in json.dumps(first) and set(first["environ"]) <= {"PATH", "HOME", "TMPDIR", "LANG"}
    assert first["isolated"] == 1 and first["cwd"].startswith("/tmp/") and first["files"] == ["program.py"]
    if SEPARATE_UID:
        assert first["uid"] >= 1 << 16 and first["gid"] == first["uid"] and second["uid"] != first["uid"]
    else:
        assert first["uid"] == os.getuid()


def test_runs_in_parallel_threads_are_independent():
    def work(index: int):
        program = f"import time\nopen('mine.txt', 'w').write('{index}')\ntime.sleep(0.3)\n"
        return check_program(program, f"assert open('mine.txt').read() == '{index}'", FAST)

    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(work, range(6)))
    assert all(result.passed for result in results), [result.reason for result in results]
    assert time.monotonic() - started < 6 * 0.3 + 3.0


def test_setup_failures_raise_and_programs_cannot_fake_them(monkeypatch):
    forge = textwrap.dedent("""
        import os, sys
        for fd in range(1024):  # the reaper's report pipe, were it still open here
            try:
                os.write(fd, b"error: setup: forged")
            except OSError:
                pass
        sys.exit(125)
    """)
    forged = run_python(forge, FAST)
    assert not forged.passed and forged.returncode == 125
    monkeypatch.setattr(sys, "_base_executable", "/nonexistent/python3", raising=False)
    with pytest.raises(SandboxError, match="program start"):
        run_python("print('hi')", FAST)


def test_the_program_runs_as_another_uid_exactly_when_the_isolation_level_says_so():
    result = run_python("import os; print(os.geteuid())", FAST)
    assert result.passed, result.reason
    program_uid = int(result.stdout)
    assert program_uid != 0
    assert isolation_level() in ("separate-uid", "same-uid")
    assert (program_uid != os.geteuid()) == (isolation_level() == "separate-uid"), (program_uid, isolation_level())


# ------------------------------------------------------------ a pass means the tests ran to their end

ADD_TESTS = "assert add(2, 3) == 5\nassert add(10, -4) == 6\nassert abs(add(0.5, 0.25) - 0.75) < 1e-9\n"

# Programs that do not add, yet ended with exit status 0 (or made the checks agree) on the old sandbox.
REWARD_HACKS = {
    "token taken from the runner's frame": textwrap.dedent(r"""
        import os, sys
        def add(a, b):
            frame = sys._getframe()
            while frame is not None:
                found = frame.f_locals
                if "token" in found and "proof_fd" in found:
                    os.write(found["proof_fd"], found["token"])
                    os._exit(0)
                frame = frame.f_back
            return None
    """),
    "the tests' comparison helper replaced": textwrap.dedent(r"""
        import sys
        def add(a, b):
            scope = sys._getframe(1).f_globals
            for name in list(scope):
                if name.startswith("__opd_"):
                    scope[name] = lambda *args: True
            return None
    """),
    "sys.exit(0)": "import sys\ndef add(a, b):\n    return None\nsys.exit(0)\n",
    "os._exit(0) in the function": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "atexit handler exits 0": "import atexit, os\natexit.register(os._exit, 0)\ndef add(a, b):\n    return None\n",
    "excepthook exits 0": "import os, sys\nsys.excepthook = lambda *info: os._exit(0)\n"
                          "def add(a, b):\n    return None\n",
    "SIGTERM handler exits 0": textwrap.dedent("""
        import os, signal
        signal.signal(signal.SIGTERM, lambda *info: os._exit(0))
        def add(a, b):
            os.kill(os.getpid(), signal.SIGTERM)
    """),
    "__eq__ always True": textwrap.dedent("""
        class Anything:
            __eq__ = lambda self, other: True
            __ne__ = lambda self, other: False
            __lt__ = __sub__ = __abs__ = lambda self, *other: self
            __bool__ = lambda self: True
        def add(a, b):
            return Anything()
    """),
    "int subclass with __eq__": textwrap.dedent("""
        class Equal(int):
            __eq__ = lambda self, other: True
            __lt__ = lambda self, other: True
            __sub__ = lambda self, other: Equal(0)
            __abs__ = lambda self: Equal(0)
        def add(a, b):
            return Equal(0)
    """),
    "asserts read from its own file": textwrap.dedent(r"""
        import re
        _SOURCE = open(__file__).read()
        def add(*args):
            for call, value in re.findall(r"add\((.*?)\) (?:==|-) ([^\s)]+)", _SOURCE):
                try:
                    if eval("(" + call + ",)") == args:
                        return eval(value)
                except Exception:
                    pass
    """),
    "asserts read with inspect.getsource": textwrap.dedent(r"""
        import inspect, re, sys
        def add(*args):
            source = inspect.getsource(sys._getframe(1))
            for call, value in re.findall(r"add\((.*?)\) (?:==|-) ([^\s)]+)", source):
                if eval("(" + call + ",)") == args:
                    return eval(value)
    """),
    "asserts read through /proc/self/cmdline": textwrap.dedent(r"""
        import os, re
        _TEXT = ""
        for argument in open("/proc/self/cmdline").read().split("\0"):
            _TEXT += argument
            if os.path.isfile(argument):
                _TEXT += open(argument, errors="replace").read()
        def add(*args):
            for call, value in re.findall(r"add\((.*?)\) (?:==|-) ([^\s)]+)", _TEXT):
                if eval("(" + call + ",)") == args:
                    return eval(value)
    """),
    "builtins patched": "import builtins\nbuiltins.abs = lambda value: 0\n"
                        "def add(a, b):\n    return 5 if (a, b) == (2, 3) else 6\n",
    "tests read from open descriptors": textwrap.dedent(r"""
        import os, re
        _TEXT = ""
        for fd in range(3, 256):
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                _TEXT += os.read(fd, 1 << 20).decode(errors="replace")
            except OSError:
                pass
        def add(*args):
            for call, value in re.findall(r"add\((.*?)\) (?:==|-) ([^\s)\\]+)", _TEXT):
                if eval("(" + call + ",)") == args:
                    return eval(value)
    """),
}


def test_a_correct_program_passes_with_the_proof_of_completion():
    result = check_program("def add(a, b):\n    return a + b\n", ADD_TESTS, FAST)
    assert result.passed and result.completed and result.returncode == 0, result
    unfinished = run_python("print('start')\nimport sys\nsys.exit(0)\nprint('never')\n", FAST)
    assert not unfinished.passed and not unfinished.completed and unfinished.returncode == 0
    assert unfinished.reason == "exit code 0 before the tests ran to their end"


# Hacks against the one-process runner's internals that the frame walk above does not cover: each passed
# there (the function under test shared the tests' process) and must fail with the tests in another process.
INTERNALS_HACKS = {
    "the tests' comparison helpers replaced through gc": (textwrap.dedent(r"""
        import gc
        def add(a, b):
            for found in gc.get_objects():
                if type(found) is dict:
                    for name in [name for name in found if type(name) is str and name.startswith("__opd_")]:
                        found[name] = lambda *args: True  # the hardened comparison and truth helpers
            return 5  # right for the first assert only, whose helper was loaded before this call
    """), ADD_TESTS),
    "sys.settrace jumps over the asserts": (textwrap.dedent(r"""
        import sys
        def add(a, b):
            tests = sys._getframe(1)
            last = max(line for *_, line in tests.f_code.co_lines() if line is not None)
            def skip(frame, event, argument):
                if event == "line" and frame.f_lineno < last:
                    frame.f_lineno = last  # straight to the tests' last line: the asserts never run
                return skip
            tests.f_trace, tests.f_trace_lines = skip, True
            sys.settrace(lambda *args: None)  # tracing on, so that the frame's own trace function runs
            return 5  # right for the first assert only
    """), "assert add(2, 3) == 5\nassert add(10, -4) == 6\nassert add(0, 0) == 0\nchecked = True\n"),
}


@pytest.mark.parametrize("name", sorted(REWARD_HACKS))
def test_reward_hacks_score_zero(name):
    result = check_program(REWARD_HACKS[name], ADD_TESTS, FAST)
    assert not result.passed, (name, result)


@pytest.mark.parametrize("name", sorted(REWARD_HACKS))
def test_reward_hacks_score_zero_with_the_code_grader(name):
    from opd.data import PromptRow
    from opd.grading.graders import code_grader, program_passes

    program_passes.cache_clear()
    row = PromptRow(index=0, prompt="Write add(a, b).", domain="code", tests=ADD_TESTS.splitlines())
    assert code_grader(row, f"```python\n{REWARD_HACKS[name]}\n```") == 0.0
    assert code_grader(row, "```python\ndef add(a, b):\n    return a + b\n```") == 1.0
    program_passes.cache_clear()


PLAIN_VALUE_CASES = {  # program -> tests; each must fail: the program's objects never answer for the tests
    "__eq__ always True": ("class Anything:\n    __eq__ = lambda self, other: True\n"
                           "def f():\n    return Anything()\n", "assert f() == 5\n"),
    "__bool__ always True": ("class Anything:\n    __bool__ = lambda self: True\n"
                             "def f():\n    return Anything()\n", "assert f()\n"),
    "int subclass whose __eq__ lies": ("class Equal(int):\n    __eq__ = lambda self, other: True\n"
                                      "def f():\n    return Equal(4)\n", "assert f() == 5\n"),
    "ordering an object of its own": ("class Small:\n    __lt__ = lambda self, other: True\n"
                                      "def f():\n    return Small()\n", "assert f() < 0\n"),
}
PLAIN_VALUE_PASSES = {  # what a legitimate program returns still compares by value
    "int subclass by its value": ("class Equal(int):\n    __eq__ = lambda self, other: False\n"
                                  "def f():\n    return Equal(5)\n", "assert f() == 5\n"),
    "Counter, namedtuple, deque, set, bytes, complex, nan": (
        "import collections\nPoint = collections.namedtuple('Point', 'x y')\n"
        "def f():\n    return (collections.Counter('aab'), Point(1, 2), collections.deque([1]), {3}, b'x', 1j,"
        " float('nan'), 10 ** 5000)\n",
        "import math\nc, p, d, s, b, z, n, big = f()\nassert c == {'a': 2, 'b': 1} and p == (1, 2)\n"
        "assert d == __import__('collections').deque([1]) and s == {3} and b == b'x' and z == 1j\n"
        "assert math.isnan(n) and big == 10 ** 5000\n"),
    "objects of its own, kept in the program": (
        "class Node:\n    def __init__(self, value):\n        self.value, self.next = value, None\n"
        "def length(node):\n    return 0 if node is None else 1 + length(node.next)\n"
        "def count():\n    yield from range(3)\n",
        "head = Node(1)\nhead.next = Node(2)\nassert length(head) == 2 and head.next.value == 2\n"
        "assert head == head and head != Node(1) and list(count()) == [0, 1, 2]\n"),
    "its exceptions keep their built-in type": (
        "def f(x):\n    raise ValueError('no')\n",
        "try:\n    f(1)\nexcept ValueError as error:\n    assert str(error) == 'no'\nelse:\n    assert False\n"),
}


@pytest.mark.parametrize("name", sorted(INTERNALS_HACKS) + sorted(PLAIN_VALUE_CASES))
def test_hacks_against_the_runners_internals_and_the_programs_objects_score_zero(name):
    """Neither code that reaches for the tests' internals nor an object of the program's own answers for them."""
    program, tests = INTERNALS_HACKS.get(name) or PLAIN_VALUE_CASES[name]
    result = check_program(program, tests, FAST)
    assert not result.passed and not result.completed, (name, result)


@pytest.mark.parametrize("name", sorted(PLAIN_VALUE_PASSES))
def test_plain_values_and_the_programs_own_objects_still_work(name):
    program, tests = PLAIN_VALUE_PASSES[name]
    result = check_program(program, tests, FAST)
    assert result.passed, (name, result)


def test_a_module_the_program_patched_is_not_the_tests_module():
    program = "import math\nmath.isclose = lambda *args, **kwargs: True\ndef add(a, b):\n    return a - b\n"
    tests = "import math\nassert math.isclose(add(2, 3), 5)\n"
    assert not check_program(program, tests, FAST).passed
    # Tests that use the program's import (MBPP's often do) get a fresh copy of that module, not the patched one.
    assert not check_program(program, "assert math.isclose(add(2, 3), 5)\n", FAST).passed
    honest = "import math\ndef add(a, b):\n    return a + b\n"
    assert check_program(honest, "assert math.isclose(add(2, 3), 5)\n", FAST).passed  # its imports are seen


# ------------------------------------------------------------------- resources are capped per run

def _cgroup_runs_left() -> list[str]:
    from opd.grading.cgroups import cgroup_bases

    return [f"{base}/{name}" for base in cgroup_bases()[1].values() for name in os.listdir(base)
            if name.startswith(f"opd-sandbox-{os.getpid()}-")]  # (other processes' runs may be under way)


def test_memory_of_several_processes_is_capped_together():
    limits = SandboxLimits(timeout_seconds=15.0, memory_bytes=256 << 20)
    program = textwrap.dedent("""
        import os, time
        children = []
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                block = bytearray(150 << 20)  # touched: zero-filled
                time.sleep(2)
                os._exit(0)
            children.append(pid)
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children]
        assert codes == [0, 0, 0], codes
        print("all allocated")
    """)
    result = run_python(program, limits)
    assert not result.passed and "all allocated" not in result.stdout, result
    assert not _cgroup_runs_left()


def test_memfd_pages_count_against_the_run():
    limits = SandboxLimits(timeout_seconds=15.0, memory_bytes=256 << 20)
    program = textwrap.dedent("""
        import os
        files = []
        for _ in range(30):  # 30 * 15 MiB, each under the 16 MiB file-size cap
            fd = os.memfd_create("fill")
            for _ in range(15):
                os.write(fd, b"x" * (1 << 20))
            files.append(fd)
        print("wrote", len(files) * 15, "MiB")
    """)
    result = run_python(program, limits)
    assert not result.passed and "wrote" not in result.stdout, result


def test_a_program_with_twenty_threads_passes():
    # Each thread mallocs (so glibc gives it an arena: 64 MiB of address space) and all twenty live at once:
    # under a 1 GiB address-space cap per process the later ones could not even get their stacks.
    program = textwrap.dedent("""
        import threading
        barrier = threading.Barrier(20)
        results = [None] * 20
        def work(index):
            block = bytearray(100_000)
            barrier.wait(timeout=5)
            results[index] = sum(range(10000 * (index + 1))) + len(block) - 100_000
        threads = [threading.Thread(target=work, args=(index,), daemon=True) for index in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    """)
    tests = "assert results == [sum(range(10000 * (i + 1))) for i in range(20)]\n"
    result = check_program(program, tests, FAST)
    assert result.passed, result


def test_user_namespaces_are_refused():
    program = textwrap.dedent("""
        import ctypes, os, subprocess
        libc = ctypes.CDLL(None, use_errno=True)
        print("unshare", libc.unshare(0x10000000), ctypes.get_errno())  # CLONE_NEWUSER
        if os.path.exists("/usr/bin/unshare"):
            done = subprocess.run(["/usr/bin/unshare", "-Urm", "sh", "-c",
                                   "mount -t tmpfs -o size=1g none /mnt && echo mounted"],
                                  capture_output=True, text=True)
            print("tool", done.returncode, done.stdout.strip())
    """)
    result = run_python(program, FAST)
    assert result.passed, result
    assert f"unshare -1 {1}" in result.stdout, result.stdout  # EPERM
    assert "mounted" not in result.stdout


def test_the_graders_keyring_is_out_of_reach():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    secret = f"opd-key-secret-{os.getpid()}".encode()
    key = libc.syscall(248 if os.uname().machine == "x86_64" else 217, b"user", b"opd-sandbox-test", secret,
                       len(secret), -3)  # add_key into KEY_SPEC_SESSION_KEYRING
    if key < 0:
        pytest.skip(f"no kernel keyring here (errno {ctypes.get_errno()})")
    keyctl = 250 if os.uname().machine == "x86_64" else 219
    try:
        program = textwrap.dedent(f"""
            import ctypes
            libc = ctypes.CDLL(None, use_errno=True)
            buffer = ctypes.create_string_buffer(256)
            size = libc.syscall({keyctl}, 11, {key}, buffer, 256)  # KEYCTL_READ
            print("read", size, buffer.raw[:max(size, 0)])
            try:
                print(open("/proc/keys").read())
            except OSError as error:
                print("no /proc/keys", error)
        """)
        result = run_python(program, FAST)
        assert result.passed, result
        assert secret.decode() not in result.stdout and "opd-sandbox-test" not in result.stdout, result.stdout
    finally:
        libc.syscall(keyctl, 21, key)  # KEYCTL_INVALIDATE


def test_pathname_unix_sockets_of_the_host_cannot_be_reached(visible_dir):
    path = visible_dir / "listener.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        path.chmod(0o777)  # only the sandbox, not a permission, may stop the connect
        listener.listen(1)
        program = f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(path)!r})\nprint('connected')\n"
        result = run_python(program, FAST)
        assert not result.passed and "connected" not in result.stdout, result
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert run_python("import socket\na, b = socket.socketpair()\na.send(b'x')\nassert b.recv(1) == b'x'\n",
                      FAST).passed  # a connected pair stays possible


def test_memory_control_is_reported_and_the_rlimit_fallback_still_caps(monkeypatch):
    from opd.grading import cgroups, sandbox

    level = sandbox.memory_control()
    assert level in ("cgroup v1", "cgroup v2", "rlimit")
    if os.geteuid() == 0 and Path("/sys/fs/cgroup").is_dir():
        assert level != "rlimit"
    monkeypatch.setattr(cgroups, "cgroup_bases", lambda: ("rlimit", {}))
    result = run_python("block = bytearray(4 * 1024 ** 3)\nprint('allocated')\n", FAST)
    assert not result.passed and result.reason == "exit code 1: MemoryError"


def test_the_program_cannot_reach_into_the_test_process():
    """ptrace, process_vm_readv and /proc/<pid>/mem or /fd of the test process (the program's parent) all fail."""
    program = textwrap.dedent(r"""
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        tests = os.getppid()
        outcome = {"ptrace": libc.syscall(101 if os.uname().machine == "x86_64" else 117, 16, tests, 0, 0)}
        for name in ("mem", "fd/3", "environ"):
            try:
                with open(f"/proc/{tests}/{name}", "rb") as handle:
                    outcome[name] = len(handle.read(1))
            except OSError as error:
                outcome[name] = error.errno
        print(json.dumps(outcome))
    """)
    result = run_python(program, FAST)
    assert result.passed, result
    outcome = json.loads(result.stdout)
    assert outcome["ptrace"] == -1, outcome  # PTRACE_ATTACH refused
    assert all(outcome[name] in (errno.EACCES, errno.EPERM, errno.ENOENT) for name in ("mem", "fd/3", "environ")), outcome
