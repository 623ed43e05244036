"""Running untrusted Python (a model's program plus its unit tests) in a contained subprocess.

Shared by the `code` grader (GRPO rewards) and the evaluation harness (HumanEval, MBPP), so that a reward
and an evaluation score mean the same thing. A model's program is hostile by accident (infinite loops,
fork loops, huge allocations, endless prints) and sometimes by reward hacking, so each protection below
is enforced by the kernel, not by the program's good will.

Three processes, the first started by `run_python` with `start_new_session=True`:
1. the *launcher* (sandbox_launcher.py run as a script, `python -I -S`) creates fresh network, mount, PID and IPC
   namespaces, plus a user namespace when we are not root, and waits for
2. the *reaper*, PID 1 of the new PID namespace, which builds the file system view, forks the program and
   reaps orphans. When it exits the kernel kills everything left in the namespace, so background children,
   even ones that called setsid() to leave the process group, never outlive a run.
3. the *runner*: resource limits, then (as root) a fresh uid, a fresh keyring and a seccomp filter, then
   `python -I -S -B -c <sandbox_runner.py>`, which splits into the *test process* (it alone reads the tests
   and the token) and the *program process* (it runs the program and answers the tests' calls with plain
   data); see sandbox_runner.py.
At the timeout (or an output flood) `run_python` sends SIGTERM to the launcher, which SIGKILLs the reaper
and reaps it: killing the group directly would orphan the reaper, and in a container whose PID 1 is the
trainer itself nobody would ever reap it. `os.killpg` on the group is the fallback if the launcher hangs.
A separate launcher process (not `preexec_fn`) keeps `run_python` safe to call from many threads.

A pass means the tests ran to their end: the runner writes a per-run token (made by `run_python`, known to
no file) to a proof pipe only after the tests returned, and then exits at once. An exit of any status
before that (sys.exit, os._exit, atexit, excepthook or signal handlers) is a failure, the tests are never in
the program's file (program.py holds the program alone), and the tests run in a separate, non-dumpable
process that receives only plain data from the program, so neither a returned object's `__eq__` nor code
that walks the tests' frames can answer for them (sandbox_runner.py).

What the program gets:
- no network: the new network namespace has only a loopback interface, and it is down.
- a read-only file system (every mount is remounted read-only and nosuid), except a private tmpfs of
  4 * max_file_bytes mounted on /tmp (also seen at /var/tmp and /dev/shm) that holds its work folder,
  /tmp/sandbox; the tmpfs disappears with the namespace, so nothing is left to clean up.
- /root, /home, /run and $HOME replaced by empty folders (the running interpreter's installation is
  mounted back, read-only, when it lives there), and a /proc that shows only its own processes.
- an empty environment, isolated mode (`-I -S`: no site-packages, no PYTHON* variables, standard library
  only) and stdin from /dev/null.
- memory: a memory cgroup per run (v2, else v1 with memory.memsw: no swap either) caps every process of
  the run, with its tmpfs and memfd pages, at `memory_bytes` together; past it the kernel kills the program
  (its oom_score_adj is 1000), reported as "memory limit exceeded". A pids cgroup (v1; v2's sits in the
  same folder) caps processes and threads of the run. Where this process may create no memory cgroup
  (not root, no delegated cgroup) `memory_control()` says "rlimit", a warning is logged at the first run,
  and the weaker cap applies: RLIMIT_AS of `memory_bytes` for each process, so max_processes * memory_bytes
  at worst, memfd and tmpfs pages not counted (the tmpfs still has its size limit), and a program with
  many threads may fail for address space it never uses (glibc reserves 64 MiB per thread's arena).
- rlimits: file size, open files, CPU time (a backstop for the wall-clock timeout), processes
  (`max_processes`), no core dumps; stdout + stderr are read through pipes and the run is stopped once
  they exceed `max_output_bytes`, so our memory never grows with them.
- a seccomp filter (`sandbox_launcher._seccomp_program`): no new user namespace (unshare/clone with CLONE_NEWUSER, setns,
  clone3), no kernel keyring calls, no ptrace / process_vm_readv / process_vm_writev / pidfd_getfd (the
  test process is out of the program's reach), no socket(AF_UNIX) (so no connect() to a host's pathname socket in a
  folder it can see), no io_uring; and a fresh, empty session keyring.

Root versus ordinary user, as `isolation_level()` reports:
- "separate-uid" (run as root: CI, containers): the program runs as a fresh uid from 2**30 upwards that no
  account owns and no other run shares (pid * 256 + a counter). Root ignores RLIMIT_NPROC and `nobody`
  is shared with other daemons, so a dedicated uid is what makes the process cap count this run's
  processes only; it also means the program can read only world-readable files and write nothing outside
  its tmpfs, whatever the mount view shows.
- "same-uid" (not root): a user namespace gives the same namespaces and mounts, and RLIMIT_NPROC still
  counts only this run (kernels >= 5.14 count processes per user namespace), but the program runs as your
  uid: outside the hidden folders it can READ every file you can (it still cannot write them: read-only
  mounts). Prefer running graders as root, or in a container, when that matters. If user namespaces are
  disabled, `run_python` raises SandboxError rather than run with less isolation.
Not covered: world-readable files outside the hidden folders (the code of this repository, for one), which
stay readable; CPU time beyond the timeout's backstop (no cpu cgroup: parallel runs share the cores); the
limits of in-process tests named above. Needs Linux >= 5.14 on x86_64 or aarch64 (the seccomp filter's
system call numbers) and no extra packages; as root it needs CAP_SYS_ADMIN (a default Docker container
lacks it, and then run_python raises SandboxError). docs/sandbox.md says what a user may rely on.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from opd.grading import cgroups as cgroup_control
from opd.grading.sandbox_launcher import WORK

_LAUNCHER = str(Path(__file__).parent / "sandbox_launcher.py")  # run as a script, never imported inside


@dataclass(frozen=True, kw_only=True, slots=True)
class SandboxLimits:
    timeout_seconds: float = 10.0  # wall clock, from start to the program's exit
    memory_bytes: int = 1 << 30  # memory of the whole run (a cgroup); without one, of each process (RLIMIT_AS)
    max_processes: int = 32  # processes and threads of the program (RLIMIT_NPROC for its uid, and a pids cgroup)
    max_output_bytes: int = 1 << 20  # stdout + stderr kept; beyond it the run is stopped and failed
    max_file_bytes: int = 16 << 20  # largest file the program may write (RLIMIT_FSIZE)


@dataclass(frozen=True, kw_only=True, slots=True)
class SandboxResult:
    passed: bool  # the tests ran to their end (the proof arrived), exit code 0, within the limits
    completed: bool  # the runner's proof that the program and its tests ran to their end arrived
    returncode: int | None  # the program's exit code (negative: killed by that signal); None if we killed it
    timed_out: bool
    stdout: str
    stderr: str
    reason: str  # one line: "passed", "timeout after 10.0s", "exit code 1: AssertionError ...", ...


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up: never reported as the program failing."""


def isolation_level() -> str:
    """"separate-uid" when running as root, else "same-uid" (reads what you can read; module docstring)."""
    return "separate-uid" if os.geteuid() == 0 else "same-uid"


def memory_control() -> str:
    """How a run's memory is capped: "cgroup v2" or "cgroup v1" (every process, tmpfs and memfd page of the
    run together), else "rlimit" (each process alone, RLIMIT_AS; logged once, see the module docstring)."""
    return cgroup_control.cgroup_bases()[0]


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; passed means it ran to its end within the limits."""
    return _run(source, "", limits)


def check_program(program: str, tests: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """The program, then its tests (asserts, or a check function the tests call), in one namespace; passes
    only when the tests ran to their end (sandbox_runner.py), whatever the exit status said."""
    return _run(program, tests, limits)


def _run(program: str, tests: str, limits: SandboxLimits) -> SandboxResult:
    token = secrets.token_hex(16)  # written by the runner after the tests, and nowhere else
    status_read, status_write = os.pipe()  # the reaper reports "exit: <wait status>" or "error: <why>"
    proof_read, proof_write = os.pipe()
    try:
        # The launcher, the reaper and the test process are in the pids cgroup too: three beyond the program's.
        cgroups = cgroup_control.make_cgroups(limits.memory_bytes, limits.max_processes + 3)
    except OSError as error:
        for fd in (status_read, status_write, proof_read, proof_write):
            os.close(fd)
        raise SandboxError(f"cannot create the run's cgroups ({memory_control()}): {error}") from error
    try:
        try:
            process = _start(program, tests, token, limits, cgroups, status_write, proof_write)
        except BaseException:
            os.close(status_read)
            os.close(proof_read)
            raise
        finally:
            os.close(status_write)
            os.close(proof_write)
        try:
            stdout, stderr, timed_out, flooded = _collect(process, limits)
        finally:
            if process.poll() is None:  # still running (timeout, output flood): the launcher stops the run
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=5.0)
                except subprocess.TimeoutExpired:  # a launcher that cannot even do that: kill the whole group
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            process.stdout.close()
            process.stderr.close()
            report = _read_report(status_read)
            proof = _read_report(proof_read)
        out_of_memory = cgroup_control.out_of_memory(cgroups)
    finally:
        cgroup_control.remove_cgroups(cgroups)
    if report.startswith("error:"):
        raise SandboxError(f"{report[6:].strip()} (isolation level {isolation_level()!r})")
    returncode = os.waitstatus_to_exitcode(int(report[5:])) if report.startswith("exit:") else None
    completed = proof == token
    passed = completed and returncode == 0 and not timed_out and not flooded
    out = stdout.decode("utf-8", errors="replace")
    err = stderr.decode("utf-8", errors="replace")
    reason = "passed" if passed else _reason(returncode, timed_out, flooded, out_of_memory, err, limits)
    return SandboxResult(passed=passed, completed=completed, returncode=returncode, timed_out=timed_out,
                         stdout=out, stderr=err, reason=reason)


# ------------------------------------------------------------------------------------------- the parent

_uid_counter = itertools.count()  # next() on a C iterator is atomic: threads never get the same value


@cache
def _uid_pool() -> tuple[int, int]:
    """(first uid, how many): 2**30 .. 2**31 - 1 when this user namespace maps them (the usual case), else
    the upper half of its largest mapped range (a rootful container with a 65536-uid map)."""
    extents = []
    with open("/proc/self/uid_map") as handle:
        for line in handle:
            inside, _, count = map(int, line.split())
            extents.append((inside, count))
    start, count = max(extents, key=lambda extent: extent[1])
    if start <= 1 << 30 and start + count >= 1 << 31:
        return 1 << 30, 1 << 30
    return start + count // 2, count // 2 - 2  # leaves out the top two: nobody (65534) and -1 (65535)


def _fresh_uid() -> int:
    """A uid no account and no other live run uses: pids are unique among live processes, and the counter
    is unique within this one. (In a small uid pool two runs may share one: then they share the cap.)"""
    start, count = _uid_pool()
    return start + (os.getpid() * 256 + next(_uid_counter) % 256) % count


def _hidden_folders() -> list[str]:
    """Where secrets live (keys, tokens, sockets of services): replaced by empty folders in the sandbox."""
    candidates = {os.path.realpath(path) for path in ("/root", "/home", "/run", os.path.expanduser("~"))}
    folders = sorted(path for path in candidates if path != "/" and os.path.isdir(path))
    return [path for path in folders if not any(path.startswith(other + "/") for other in folders)]


def _exposed_folders(python: str, hidden: list[str]) -> list[str]:
    """The interpreter's installation, when it lives in a hidden folder (pyenv in /root or ~)."""
    folders = {os.path.realpath(path) for path in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(python))}
    inside = sorted(path for path in folders if any(path.startswith(h + "/") for h in hidden))
    return [path for path in inside if not any(path.startswith(other + "/") for other in inside)]


def _start(program: str, tests: str, token: str, limits: SandboxLimits, cgroups: list[str], status_write: int,
           proof_write: int) -> subprocess.Popen:
    """Start the launcher (sandbox_launcher.py as a script) in a new session, so that it leads its process group."""
    def clean(text: str) -> str:  # a lone surrogate becomes "?", never a crash
        return text.encode("utf-8", errors="replace").decode("utf-8")

    setup = {"program": clean(program), "tests": clean(tests), "token": token, "path": f"{WORK}/program.py"}
    data = json.dumps(setup).encode()  # read by the reaper and the runner; closed before the program runs
    source_fd = os.memfd_create("opd-sandbox-setup")  # program, tests and token, never on disk
    try:
        for start in range(0, len(data), 1 << 20):
            os.write(source_fd, data[start:start + (1 << 20)])
        os.lseek(source_fd, 0, os.SEEK_SET)
        python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        hidden = _hidden_folders()
        config = {"uid": _fresh_uid() if os.geteuid() == 0 else None, "python": python,
                  "hide": hidden, "expose": _exposed_folders(python, hidden), "cgroups": cgroups,
                  "source_fd": source_fd, "status_fd": status_write, "proof_fd": proof_write,
                  "memory": None if cgroups else limits.memory_bytes, "runner": _runner_source(),
                  "cpu": int(limits.timeout_seconds) + 1, "processes": limits.max_processes + 1,  # + the test process
                  "file": limits.max_file_bytes, "scratch": 4 * limits.max_file_bytes + len(data)}
        return subprocess.Popen([sys.executable, "-I", "-S", "-B", _LAUNCHER, json.dumps(config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(source_fd, status_write, proof_write), cwd="/",
                                env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
    finally:
        os.close(source_fd)


@cache
def _runner_source() -> str:
    return (Path(__file__).parent / "sandbox_runner.py").read_text()


def _collect(process: subprocess.Popen, limits: SandboxLimits) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close (everything in the sandbox has exited), the deadline passes
    (timed out) or they exceed max_output_bytes together (flooded). Keeps at most max_output_bytes."""
    deadline = time.monotonic() + limits.timeout_seconds
    kept = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    total = 0
    with selectors.DefaultSelector() as selector:
        for fd in kept:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(kept[process.stdout.fileno()]), bytes(kept[process.stderr.fileno()]), True, False
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                kept[key.fd] += chunk[:max(limits.max_output_bytes - total, 0)]
                total += len(chunk)
                if total > limits.max_output_bytes:
                    return bytes(kept[process.stdout.fileno()]), bytes(kept[process.stderr.fileno()]), False, True
    return bytes(kept[process.stdout.fileno()]), bytes(kept[process.stderr.fileno()]), False, False


def _read_report(fd: int) -> str:
    """What the reaper wrote; non-blocking, since a killed reaper may never write (nor close) its end."""
    os.set_blocking(fd, False)
    parts = []
    try:
        while chunk := os.read(fd, 4096):
            parts.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(parts).decode("utf-8", errors="replace")


def _reason(returncode: int | None, timed_out: bool, flooded: bool, out_of_memory: bool, stderr: str,
            limits: SandboxLimits) -> str:
    """Why a run did not pass."""
    if flooded:
        return f"output limit exceeded ({limits.max_output_bytes} bytes of stdout + stderr)"
    if timed_out:
        return f"timeout after {float(limits.timeout_seconds)}s"
    if out_of_memory:
        return f"memory limit exceeded ({limits.memory_bytes} bytes for the whole run)"
    if returncode is None:
        return "the sandbox ended without reporting the program's exit"
    if returncode == 0:
        return "exit code 0 before the tests ran to their end"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        return "CPU time limit exceeded" if name == "SIGXCPU" else f"killed by signal {name}"
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    return f"exit code {returncode}: {last[:200]}" if last else f"exit code {returncode}"
