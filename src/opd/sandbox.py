"""Running untrusted Python (a model's program plus its unit tests) in a contained subprocess.

Shared by the `code` grader (GRPO rewards, training accuracy) and the evaluation harness (HumanEval, MBPP).

How it contains a program (`isolation_level()` says which applies on this machine):
- Started as root (CI, containers): a launcher process enters new network and mount namespaces, mounts
  private tmpfs over /tmp, /var/tmp and /dev/shm, sets resource limits, and drops to a fresh, unused uid
  before exec'ing the system Python. So: no network (only a private loopback), no reading files the user
  did not expose (root's files are closed to that uid), no writing outside the work folder, and
  RLIMIT_NPROC counts only this run's processes (it does not apply to root itself, which is why the uid
  changes). When the run ends, every process of that uid is killed, including ones that left the group.
- Started as an ordinary user: a user namespace gives the same network, mount and tmpfs isolation where the
  kernel allows it, but the program runs as that user (it can read what the user can read) and
  RLIMIT_NPROC counts all of the user's processes; isolation_level() reports "user".
- Always: a wall-clock timeout that kills the process group, limits on address space (memory), CPU time,
  file size (which also caps stdout + stderr: they go to files, so endless output never grows our memory)
  and open files, no core dumps, `python -I -S` (no site packages, no environment), an empty environment
  and a fresh work folder that is deleted afterwards.
The launcher runs as a separate process (not a preexec_fn), so sandboxes may be started from threads.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, kw_only=True, slots=True)
class SandboxLimits:
    timeout_seconds: float = 10.0
    memory_bytes: int = 1 << 30  # address space of each process
    max_processes: int = 32
    max_output_bytes: int = 1 << 20  # stdout + stderr, and any one file the program writes


@dataclass(frozen=True, kw_only=True, slots=True)
class SandboxResult:
    passed: bool  # exit code 0 within the limits
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    reason: str  # one line: "passed", "timeout after 10.0s", "exit code 1: AssertionError ..."


# Runs first in the child, as root or as the user, with only the standard library (-I -S).
_LAUNCHER = r"""
import ctypes, os, resource, sys
try:
    uid, memory, cpu, nproc, fsize, python = int(sys.argv[1]), *map(int, sys.argv[2:6]), sys.argv[6]
    CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWUSER = 0x00020000, 0x40000000, 0x10000000
    MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 16384, 1 << 18, 2, 4
    libc = ctypes.CDLL(None, use_errno=True)
    def check(result, what):
        if result != 0:
            raise OSError(ctypes.get_errno(), what)
    if uid >= 0:
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET), "unshare")
    else:
        outer_uid, outer_gid = os.getuid(), os.getgid()
        check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET), "unshare (user namespace)")
        open("/proc/self/setgroups", "w").write("deny")
        open("/proc/self/uid_map", "w").write(f"{outer_uid} {outer_uid} 1")
        open("/proc/self/gid_map", "w").write(f"{outer_gid} {outer_gid} 1")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    work = os.getcwd()
    for private in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(private):
            check(libc.mount(b"tmpfs", private.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=16m,mode=1777"),
                  "mount tmpfs " + private)
            if work.startswith(private + "/"):
                # The fresh tmpfs hides the work folder: bind it back at the same path (cwd still holds it).
                os.makedirs(work, exist_ok=True)
                check(libc.mount(b"/proc/self/cwd", work.encode(), None, 4096, None), "bind the work folder")
                os.chdir(work)
    # The new network namespace has only a loopback interface, and it is down: there is no network at all.
    for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
except BaseException as error:
    sys.stderr.write(f"opd-sandbox-launcher: {type(error).__name__}: {error}\n")
    sys.exit(125)
os.execve(python, [python, "-I", "-S", "program.py"], {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": os.getcwd()})
"""

_SYSTEM_PYTHONS = ("/usr/bin/python3", "/usr/local/bin/python3")


class SandboxError(RuntimeError):
    """The sandbox itself could not start (not a failure of the program)."""


def isolation_level() -> str:
    """"root": separate uid + network/mount namespaces; "user": namespaces only (see the module docstring)."""
    return "root" if os.geteuid() == 0 else "user"


def _interpreter() -> str:
    if os.geteuid() != 0:
        return sys.executable
    for candidate in _SYSTEM_PYTHONS:
        # The dropped uid must be able to run it: /root (where pyenv and venvs often live) is closed to it.
        if os.path.isfile(candidate) and os.stat(os.path.realpath(candidate)).st_mode & 0o001:
            return candidate
    raise SandboxError(f"no system Python the sandbox user can run; looked at {list(_SYSTEM_PYTHONS)}")


def _fresh_uid() -> int:
    # A uid no account uses, so RLIMIT_NPROC and the final kill concern this run only.
    return random.SystemRandom().randrange(2_000_000, 3_000_000)


def _kill_uid(uid: int) -> None:
    """Kill every process of `uid` (as that uid, kill(-1) reaches exactly its own processes)."""
    subprocess.run([sys.executable, "-I", "-S", "-c",
                    f"import os, signal\nos.setgid({uid})\nos.setuid({uid})\nos.kill(-1, signal.SIGKILL)"],
                   capture_output=True)


def run_python(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; passed means exit code 0 within the limits."""
    as_root = os.geteuid() == 0
    uid = _fresh_uid() if as_root else -1
    work = Path(tempfile.mkdtemp(prefix="opd-sandbox-"))
    try:
        (work / "program.py").write_text(source)
        if as_root:
            os.chown(work, uid, uid)
            os.chown(work / "program.py", uid, uid)
            work.chmod(0o700)
        stdout_path, stderr_path = work / ".stdout", work / ".stderr"
        cpu_seconds = int(limits.timeout_seconds) + 1
        command = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(uid), str(limits.memory_bytes), str(cpu_seconds),
                   str(limits.max_processes), str(limits.max_output_bytes), _interpreter()]
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(command, cwd=work, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                       env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
            timed_out = False
            try:
                returncode = process.wait(timeout=limits.timeout_seconds)
            except subprocess.TimeoutExpired:
                timed_out, returncode = True, None
            _terminate(process, uid)
        out = _read(stdout_path, limits.max_output_bytes)
        err = _read(stderr_path, limits.max_output_bytes)
        if returncode == 125 and err.startswith("opd-sandbox-launcher:"):
            # The sandbox could not be set up: never report that as the program failing.
            raise SandboxError(err.strip() + f" (isolation level {isolation_level()!r})")
        # Python ignores SIGXFSZ: a write past the file-size limit fails with EFBIG instead of killing it.
        flooded = max(stdout_path.stat().st_size, stderr_path.stat().st_size) >= limits.max_output_bytes
        return SandboxResult(passed=not timed_out and returncode == 0 and not flooded, returncode=returncode,
                             timed_out=timed_out, stdout=out, stderr=err,
                             reason=_reason(returncode, timed_out, err, limits, flooded))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_program(program: str, tests: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """The program followed by its tests (asserts, or a check function the tests call)."""
    return run_python(program + "\n\n" + tests + "\n", limits)


def _terminate(process: subprocess.Popen, uid: int) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid >= 0:
        _kill_uid(uid)  # children that called setsid() left the group, not the uid
    process.wait()


def _read(path: Path, limit: int) -> str:
    with open(path, "rb") as handle:
        return handle.read(limit).decode("utf-8", errors="replace")


def _reason(returncode: int | None, timed_out: bool, stderr: str, limits: SandboxLimits, flooded: bool) -> str:
    if flooded or returncode == -signal.SIGXFSZ:
        return f"output limit exceeded ({limits.max_output_bytes} bytes)"
    if timed_out:
        return f"timeout after {limits.timeout_seconds:g}s"
    if returncode == 0:
        return "passed"
    if returncode == -signal.SIGXCPU:
        return "CPU time limit exceeded"
    if returncode is not None and returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    last = next((line for line in reversed(stderr.strip().splitlines()) if line.strip()), "")
    return f"exit code {returncode}: {last[:200]}" if last else f"exit code {returncode}"
