"""Memory and pids cgroups, one pair per sandbox run: how a run's memory is capped as a whole.

A run's processes, threads, tmpfs and memfd pages are all charged to its memory cgroup, so `memory_bytes`
caps the run, not each process. `cgroup_bases()` probes once which hierarchy this process may create
children in (cgroup v2 with the memory controller delegated, else a writable cgroup v1 memory hierarchy,
with the pids one beside it); where there is none it says "rlimit", logs a warning once, and the sandbox
falls back to a per-process address-space cap (sandbox.py's docstring says what that leaves open).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from functools import cache

_cgroup_counter = itertools.count()
_OPTIONAL_CGROUP_FILES = {"memory.swap.max", "memory.memsw.limit_in_bytes"}  # absent without swap accounting


@cache
def cgroup_bases() -> tuple[str, dict[str, str]]:
    """("cgroup v2" | "cgroup v1", {controller: folder in which we may create cgroups}) or ("rlimit", {}).

    Probed once by creating and removing a child of our own cgroup: a controller counts only where that
    child gets its limit files (v2: memory enabled in our subtree_control; v1: a writable hierarchy)."""
    mounts = {}  # fstype or v1 controller -> mount point
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split()
            fstype, options = fields[fields.index("-") + 1], fields[-1].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("cgroup2", fields[4])
            elif fstype == "cgroup":
                for controller in ("memory", "pids"):
                    if controller in options:
                        mounts.setdefault(controller, fields[4])
    paths = {}  # "" (v2) or controller -> our cgroup's path
    with open("/proc/self/cgroup") as handle:
        for line in handle:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if controllers else [""]:
                paths[controller] = path
    if "cgroup2" in mounts and "" in paths:
        base = mounts["cgroup2"] + paths[""].rstrip("/")
        if _probe(base, ("memory.max", "pids.max")):
            return "cgroup v2", {"memory": base}
    if "memory" in mounts and "memory" in paths:
        bases = {"memory": mounts["memory"] + paths["memory"].rstrip("/")}
        if _probe(bases["memory"], ("memory.limit_in_bytes",)):
            if "pids" in mounts and "pids" in paths:
                pids = mounts["pids"] + paths["pids"].rstrip("/")
                if _probe(pids, ("pids.max",)):
                    bases["pids"] = pids
            return "cgroup v1", bases
    logging.getLogger(__name__).warning(
        "opd sandbox: no memory cgroup this process may create (%s); each process of a run is capped at "
        "memory_bytes of address space instead (RLIMIT_AS), so a run may use max_processes * memory_bytes "
        "and memfd or shared-memory pages beyond that; run as root, or in a delegated cgroup, for a per-run cap",
        "cgroup v2 without the memory controller delegated" if "cgroup2" in mounts else "no cgroup file system")
    return "rlimit", {}


def _probe(base: str, files: tuple[str, ...]) -> bool:
    folder = f"{base}/opd-sandbox-probe-{os.getpid()}"
    try:
        os.mkdir(folder)
    except OSError:
        return False
    try:
        return all(os.access(f"{folder}/{name}", os.W_OK) for name in files)
    finally:
        os.rmdir(folder)


def make_cgroups(memory_bytes: int, max_tasks: int) -> list[str]:
    """Fresh cgroups for one run with its limits written (`memory_bytes` for all its memory, `max_tasks`
    processes and threads); the launcher joins them before it forks."""
    kind, bases = cgroup_bases()
    name = f"opd-sandbox-{os.getpid()}-{next(_cgroup_counter)}"
    settings = {"cgroup v2": {"memory": [("memory.max", memory_bytes), ("memory.swap.max", 0),
                                         ("pids.max", max_tasks)]},
                "cgroup v1": {"memory": [("memory.limit_in_bytes", memory_bytes),
                                         ("memory.memsw.limit_in_bytes", memory_bytes)],
                              "pids": [("pids.max", max_tasks)]}}.get(kind, {})
    made = []
    try:
        for controller, base in bases.items():
            folder = f"{base}/{name}"
            os.mkdir(folder)
            made.append(folder)
            for file, value in settings[controller]:
                if file in _OPTIONAL_CGROUP_FILES and not os.path.exists(f"{folder}/{file}"):
                    continue
                with open(f"{folder}/{file}", "w") as handle:
                    handle.write(str(value))
    except BaseException:
        remove_cgroups(made)
        raise
    return made


def out_of_memory(cgroups: list[str]) -> bool:
    """Whether the kernel killed a process of the run for passing its memory cap."""
    for folder in cgroups:
        for file in ("memory.events", "memory.oom_control"):  # v2, v1: both have an "oom_kill N" line
            try:
                with open(f"{folder}/{file}") as handle:
                    counts = dict(line.split() for line in handle if line.strip())
            except OSError:
                continue
            if int(counts.get("oom_kill", 0)) > 0:
                return True
    return False


def remove_cgroups(cgroups: list[str]) -> None:
    """Remove a run's cgroups: empty by now (the PID namespace is gone), but exiting tasks take a moment."""
    for folder in cgroups:
        deadline = time.monotonic() + 5.0
        while True:
            try:
                os.rmdir(folder)
                break
            except FileNotFoundError:
                break
            except OSError:
                if time.monotonic() > deadline:
                    logging.getLogger(__name__).warning("opd sandbox: could not remove %s", folder)
                    break
                try:
                    with open(f"{folder}/cgroup.procs") as handle:
                        for pid in handle.read().split():
                            os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
                time.sleep(0.01)
