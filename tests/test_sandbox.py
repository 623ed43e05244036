"""The code sandbox: correct programs pass, wrong ones fail, and hostile programs stay inside their limits
while this test process stays healthy. Every hostile case checks the effect it tried to have is absent."""

from __future__ import annotations

import os
import resource
import shutil
import select
import socket
import stat
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from opd.sandbox import SandboxLimits, check_program, isolation_level, run_python

FAST = SandboxLimits(timeout_seconds=5.0)


def test_passing_and_failing_solutions():
    program = "def add(a, b):\n    return a + b\n"
    assert check_program(program, "assert add(2, 3) == 5").passed
    wrong = check_program(program.replace("a + b", "a - b"), "assert add(2, 3) == 5")
    assert not wrong.passed and wrong.reason.startswith("exit code 1: AssertionError")
    broken = run_python("def f(:\n")
    assert not broken.passed and "SyntaxError" in broken.reason


def test_infinite_loop_is_killed_at_the_timeout():
    result = run_python("while True:\n    pass\n", SandboxLimits(timeout_seconds=1.5))
    assert result.timed_out and not result.passed and result.reason == "timeout after 1.5s"


def test_process_flood_is_capped_even_as_root():
    # Up to 500 children that each sleep: without a cap all 500 would be created.
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
    assert int(result.stdout.split()[1]) < 16
    assert os.getpid() and threading.active_count() >= 1  # we are alive and well


def test_large_allocation_fails_inside_the_child():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = run_python("block = bytearray(4 * 1024 ** 3)\nprint('allocated')\n", FAST)
    assert not result.passed and "MemoryError" in result.reason and "allocated" not in result.stdout
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: we did not grow


def test_no_network_even_to_a_local_listener():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
        result = run_python(program, FAST)
        assert not result.passed and "connected" not in result.stdout
        assert "Network is unreachable" in result.stderr or "Connection refused" in result.stderr
        ready, _, _ = select.select([listener], [], [], 0.2)
        assert not ready  # nothing ever reached our listener
    finally:
        listener.close()


def test_writes_outside_the_work_folder_do_not_land(tmp_path):
    closed = tmp_path / "closed"
    closed.mkdir(mode=0o700)
    target = closed / "written.txt"
    in_tmp = f"/tmp/opd-sandbox-escape-{os.getpid()}"
    program = textwrap.dedent(f"""
        import os
        for path in ({str(target)!r}, {in_tmp!r}):
            try:
                with open(path, "w") as handle:
                    handle.write("escaped")
                print("wrote", path)
            except OSError as error:
                print("refused", path, error.errno)
        with open("inside.txt", "w") as handle:
            handle.write("fine")
        print("inside ok")
    """)
    result = run_python(program, FAST)
    assert result.passed and "inside ok" in result.stdout
    assert not target.exists() and not os.path.exists(in_tmp)  # nothing reached the real file system
    if isolation_level() == "root":
        assert f"refused {target}" in result.stdout


@pytest.mark.skipif(isolation_level() != "root", reason="as an ordinary user the program runs as that user")
def test_files_the_user_did_not_expose_cannot_be_read(tmp_path):
    secrets = []
    for folder in (tmp_path / "private", Path.home() / f".opd-test-private-{os.getpid()}"):
        folder.mkdir(mode=0o700)
        secret = folder / "secret.txt"
        secret.write_text("s3cret")
        secret.chmod(stat.S_IRUSR | stat.S_IWUSR)
        secrets.append(secret)
    try:
        for secret, error in zip(secrets, ("FileNotFoundError", "PermissionError")):
            # In /tmp the file is hidden by the private tmpfs; elsewhere the dropped uid may not read it.
            result = run_python(f"print(open({str(secret)!r}).read())\n", FAST)
            assert not result.passed and error in result.reason and "s3cret" not in result.stdout, result.reason
    finally:
        shutil.rmtree(secrets[1].parent)


def test_endless_output_is_cut_without_growing_our_memory():
    limits = SandboxLimits(timeout_seconds=5.0, max_output_bytes=64 * 1024)
    result = run_python("while True:\n    print('x' * 1000)\n", limits)
    assert not result.passed and result.reason.startswith("output limit exceeded")
    assert len(result.stdout) <= limits.max_output_bytes


def test_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("OPD_TEST_SECRET", "hunter2")
    result = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('OPD_TEST_SECRET'))\n", FAST)
    assert result.passed and "hunter2" not in result.stdout


def test_escaped_background_processes_are_killed():
    duration = f"30.{os.getpid() % 1000:03d}"  # a sleep length no other process on the machine uses
    program = textwrap.dedent(f"""
        import os
        if os.fork() == 0:
            os.setsid()  # leaves the process group, so killing the group alone would miss it
            os.execv("/bin/sleep", ["/bin/sleep", "{duration}"])
        print("parent done")
    """)
    result = run_python(program, FAST)
    assert result.passed
    survivors = subprocess.run(["pgrep", "-f", f"sleep {duration}"], capture_output=True, text=True)
    if isolation_level() == "root":  # as a user, a setsid() escapee is out of reach (see the module docstring)
        assert survivors.stdout.strip() == "", survivors.stdout


def test_sandboxes_run_concurrently_from_threads():
    results = [None] * 6

    def work(index):
        results[index] = check_program(f"def f():\n    return {index}\n", f"assert f() == {index}", FAST)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.passed for r in results), [r.reason for r in results]
