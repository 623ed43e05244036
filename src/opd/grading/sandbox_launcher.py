"""The sandbox's inside: the launcher, the reaper and the start of the trusted runner.

`sandbox.py` runs this file as a script (`python -I -S -B sandbox_launcher.py <config json>`), so it uses the
standard library only and never imports opd; sandbox.py imports it only for `WORK`. The processes, the
file system view, the rlimits, the uid and the seccomp filter built here are described in sandbox.py's
docstring, which lists every wall a run gets.
"""

import errno
import json
import os
import signal
import sys

WORK = "/tmp/sandbox"
# From <linux/sched.h>, <linux/mount.h>, <linux/prctl.h>; mount_setattr is 442 on every architecture.
_CLONE_NEWNS, _CLONE_NEWIPC, _CLONE_NEWUSER, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x20000, 0x8000000, 0x10000000, 0x20000000, 0x40000000)
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_NO_NEW_PRIVS = 1, 4, 38
_SYS_MOUNT_SETATTR, _AT_FDCWD, _AT_RECURSIVE, _MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID = 442, -100, 0x8000, 1, 2


def _launch(config: dict) -> None:
    """The launcher: new namespaces, then wait for the reaper. Runs as the caller (root or not)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    status = config["status_fd"]
    try:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # our caller died: so do we, and so the reaper
        for folder in config["cgroups"]:  # before any fork: every process of the run is born inside
            with open(f"{folder}/cgroup.procs", "w") as handle:
                handle.write(str(os.getpid()))
        os.umask(0o022)
        namespaces = _CLONE_NEWNS | _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWIPC
        if config["uid"] is None:  # not root: a user namespace grants the rights to set up the rest
            uid, gid = os.getuid(), os.getgid()
            _check(libc.unshare(_CLONE_NEWUSER | namespaces), "unshare (user namespaces)")
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as handle:
                    handle.write(text)
        else:
            _check(libc.unshare(namespaces), "unshare")
        libc.prctl(_PR_SET_DUMPABLE, 0)  # a same-uid program may not ptrace us or open our /proc/<pid>/fd
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # until the handler below knows the reaper
        reaper = os.fork()
    except BaseException as error:
        _report(status, f"error: launcher: {type(error).__name__}: {error}")
        os._exit(125)
    if reaper == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        _reap(config, libc)
    # SIGTERM from run_python (timeout, output flood) stops the run: the reaper's death empties its namespace,
    # and we still reap it, so that it never lingers as a zombie of whatever process adopts orphans.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(reaper, signal.SIGKILL))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    os.waitpid(reaper, 0)
    os._exit(0)


def _reap(config: dict, libc) -> None:
    """PID 1 of the namespace: mounts, the work folder, then forks the program and reaps until it exits."""
    status = config["status_fd"]
    try:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as PID 1, unhandled signals from inside are ignored
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        setup = b""
        while chunk := os.read(config["source_fd"], 1 << 20):
            setup += chunk
        os.lseek(config["source_fd"], 0, os.SEEK_SET)  # the runner reads it again, then closes it
        _mount(config, libc)
        os.mkdir(WORK, 0o700)
        with open(f"{WORK}/program.py", "w", encoding="utf-8") as handle:  # the program alone, never its tests
            handle.write(json.loads(setup)["program"])
        del setup
        if config["uid"] is not None:
            for path in (WORK, f"{WORK}/program.py"):
                os.chown(path, config["uid"], config["uid"])
        os.chdir(WORK)
        program = os.fork()
    except BaseException as error:
        _report(status, f"error: setup: {type(error).__name__}: {error}")
        os._exit(125)
    if program == 0:
        _exec_program(config, libc)
    os.close(config["source_fd"])
    os.close(config["proof_fd"])
    while True:
        pid, wait_status = os.waitpid(-1, 0)  # also reaps orphans re-parented to us
        if pid == program:
            _report(status, f"exit: {wait_status}")
            os._exit(0)  # the kernel now kills whatever the program left behind


def _mount(config: dict, libc) -> None:
    import ctypes

    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

    def mount(source, target: str, fstype, flags: int, data: str | None = None) -> None:
        _check(libc.mount(source and source.encode(), target.encode(), fstype and fstype.encode(), flags,
                          data and data.encode()), f"mount {target}")

    mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing we mount may propagate to the real system
    exposed = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in config["expose"]]
    for path in config["hide"]:
        mount("tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755")
    for path, fd in exposed:
        os.makedirs(path, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
        os.close(fd)
    attributes = (ctypes.c_uint64 * 4)(_MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), ctypes.c_char_p(b"/"),
                        ctypes.c_long(_AT_RECURSIVE), attributes, ctypes.c_long(ctypes.sizeof(attributes))),
           "mount_setattr / read-only")
    mount("tmpfs", "/tmp", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={config['scratch']},nr_inodes=4096,mode=1777")
    for path in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(path) and not os.path.islink(path):
            mount("/tmp", path, None, _MS_BIND)
    try:
        mount("proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)  # only this namespace's processes
    except OSError:
        if config["uid"] is not None:
            raise
        # A container may forbid proc mounts in user namespaces; the host's /proc would let a same-uid
        # program open /proc/<pid>/mem of our own processes, so it goes away entirely.
        mount("tmpfs", "/proc", "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, "size=4k,mode=555")


def _exec_program(config: dict, libc) -> None:
    import resource

    try:
        limits = [(resource.RLIMIT_FSIZE, config["file"]), (resource.RLIMIT_NOFILE, 256), (resource.RLIMIT_CORE, 0),
                  # Without a uid of its own (not root) the launcher and the reaper count too.
                  (resource.RLIMIT_NPROC, config["processes"] + (0 if config["uid"] is not None else 2))]
        if config["memory"] is not None:  # no cgroup: the weaker per-process cap (memory_control())
            limits.append((resource.RLIMIT_AS, config["memory"]))
        for limit, value in limits:
            resource.setrlimit(limit, (value, value))
        resource.setrlimit(resource.RLIMIT_CPU, (config["cpu"], config["cpu"] + 1))
        try:  # at the cgroup's limit the kernel kills the program, not the reaper that reports on it
            with open("/proc/self/oom_score_adj", "w") as handle:
                handle.write("1000")
        except OSError:
            pass
        if config["uid"] is not None:
            os.setgroups([])
            os.setgid(config["uid"])
            os.setuid(config["uid"])  # drops every capability: no way back to root
        _join_fresh_keyring(libc)
        _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl no_new_privs")
        _install_seccomp_filter(libc)
        os.set_inheritable(config["status_fd"], False)  # closed by exec: the program cannot forge a report
        for fd in (config["source_fd"], config["proof_fd"]):
            os.set_inheritable(fd, True)  # the runner's: it closes the first before the program runs
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORK, "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
        os.execve(config["python"], [config["python"], "-I", "-S", "-B", "-c", config["runner"],
                                     str(config["source_fd"]), str(config["proof_fd"]), f"{WORK}/program.py"], env)
    except BaseException as error:
        _report(config["status_fd"], f"error: program start: {type(error).__name__}: {error}")
    os._exit(125)


# System call numbers, and the audit architecture the seccomp filter checks (<linux/audit.h>).
_SYSCALLS = {
    "x86_64": {"arch": 0xC000003E, "clone": 56, "unshare": 272, "setns": 308, "clone3": 435, "socket": 41,
               "add_key": 248, "request_key": 249, "keyctl": 250, "io_uring_setup": 425, "io_uring_enter": 426,
               "io_uring_register": 427, "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311,
               "pidfd_getfd": 438},
    "aarch64": {"arch": 0xC00000B7, "clone": 220, "unshare": 97, "setns": 268, "clone3": 435, "socket": 198,
                "add_key": 217, "request_key": 218, "keyctl": 219, "io_uring_setup": 425, "io_uring_enter": 426,
                "io_uring_register": 427, "ptrace": 117, "process_vm_readv": 270, "process_vm_writev": 271,
                "pidfd_getfd": 438},
}
_KEYCTL_JOIN_SESSION_KEYRING, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, _AF_UNIX = 1, 22, 2, 1
_SECCOMP_RET_KILL_PROCESS, _SECCOMP_RET_ERRNO, _SECCOMP_RET_ALLOW = 0x80000000, 0x00050000, 0x7FFF0000
_X32_SYSCALL_BIT = 0x40000000


def _syscalls() -> dict[str, int]:
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"no seccomp filter written for {machine} (x86_64 and aarch64 only)")
    return _SYSCALLS[machine]


def _join_fresh_keyring(libc) -> None:
    """A new, empty session keyring: through the inherited one the program would possess the grader's keys,
    and possession grants reading them whatever the uid. (The seccomp filter then refuses keyctl.)"""
    import ctypes

    if libc.syscall(ctypes.c_long(_syscalls()["keyctl"]), ctypes.c_long(_KEYCTL_JOIN_SESSION_KEYRING), None) < 0:
        if ctypes.get_errno() != errno.ENOSYS:  # a kernel without keys has none to hide
            _check(-1, "keyctl join session keyring")


def _seccomp_program() -> list[tuple[int, int, int, int]]:
    """The classic BPF filter the program runs under, as (code, jt, jf, k) instructions. It refuses
    (EPERM): a new user namespace (unshare or clone with CLONE_NEWUSER, and setns; inside one a program
    would be root again, free to mount a tmpfs past its caps), the kernel keyring (add_key, request_key,
    keyctl), ptrace, process_vm_readv/writev and pidfd_getfd (the test process beside the program must stay
    out of its reach), socket(AF_UNIX) (connect() to a host's pathname socket is the one way out that the network
    namespace leaves; socketpair() still works) and io_uring (its operations bypass this filter). clone3
    says ENOSYS, since its flags sit in memory a filter cannot read; glibc then falls back to clone. A
    system call of another ABI (x32, 32-bit) kills the process."""
    numbers = _syscalls()
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
    # seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low 32 bits on a little-endian machine).
    code = [("ld", 4), ("jump", jeq, numbers["arch"], None, "kill"), ("ld", 0)]
    if os.uname().machine == "x86_64":
        code.append(("jump", jge, _X32_SYSCALL_BIT, "kill", None))
    code += [("jump", jeq, numbers[name], "flags", None) for name in ("unshare", "clone")]
    code += [("jump", jeq, numbers["socket"], "domain", None), ("jump", jeq, numbers["clone3"], "enosys", None)]
    code += [("jump", jeq, numbers[name], "eperm", None)
             for name in ("setns", "add_key", "request_key", "keyctl", "io_uring_setup", "io_uring_enter",
                          "io_uring_register", "ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd")]
    code += [("ret", _SECCOMP_RET_ALLOW),
             ("label", "flags"), ("ld", 16), ("jump", jset, _CLONE_NEWUSER, "eperm", None), ("ret", _SECCOMP_RET_ALLOW),
             ("label", "domain"), ("ld", 16), ("jump", jeq, _AF_UNIX, "eperm", None), ("ret", _SECCOMP_RET_ALLOW),
             ("label", "eperm"), ("ret", _SECCOMP_RET_ERRNO | errno.EPERM),
             ("label", "enosys"), ("ret", _SECCOMP_RET_ERRNO | errno.ENOSYS),
             ("label", "kill"), ("ret", _SECCOMP_RET_KILL_PROCESS)]
    labels, position = {}, 0
    for item in code:
        if item[0] == "label":
            labels[item[1]] = position
        else:
            position += 1
    program = []
    for item in code:
        if item[0] == "ld":
            program.append((ld, 0, 0, item[1]))
        elif item[0] == "ret":
            program.append((ret, 0, 0, item[1]))
        elif item[0] == "jump":
            _, op, value, true, false = item
            here = len(program) + 1  # jumps count from the next instruction
            program.append((op, labels[true] - here if true else 0, labels[false] - here if false else 0, value))
    return program


def _install_seccomp_filter(libc) -> None:
    import ctypes

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    instructions = _seccomp_program()
    table = (SockFilter * len(instructions))(*(SockFilter(*instruction) for instruction in instructions))
    fprog = SockFprog(len(instructions), table)
    _check(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0), "seccomp filter")


def _check(result: int, what: str) -> None:
    if result != 0:
        import ctypes

        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def _report(fd: int, text: str) -> None:
    os.write(fd, text.encode("utf-8", errors="replace")[:4000])


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]))
