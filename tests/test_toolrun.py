"""The tool runner: output kept and followed live, timeouts kill the whole process group."""

import os
import select
import sys
import textwrap

from tasks.common.toolrun import run_tool


def script(tmp_path, body: str):
    path = tmp_path / "tool.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_lines_followed_and_logged(tmp_path):
    argv = script(
        tmp_path,
        """
        import sys
        for k in range(3):
            print(f"line {k}", flush=True)
        print("to stderr", file=sys.stderr)
        sys.exit(3)
    """,
    )
    seen = []
    run = run_tool(
        argv,
        cwd=tmp_path,
        log_path=tmp_path / "logs" / "tool.log",
        timeout=30,
        poll=0.05,
        on_line=seen.append,
    )
    assert run.returncode == 3 and not run.timed_out
    assert seen == ["line 0", "line 1", "line 2", "to stderr"]
    assert (tmp_path / "logs" / "tool.log").read_text().splitlines() == seen
    assert run.tail_text(2) == "line 2\nto stderr"


def test_timeout_kills_the_process_group(tmp_path):
    child_pid_file = tmp_path / "child.pid"
    argv = script(
        tmp_path,
        f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open({str(child_pid_file)!r}, "w").write(str(child.pid))
        print("started", flush=True)
        time.sleep(600)
    """,
    )
    run = run_tool(argv, cwd=tmp_path, log_path=tmp_path / "tool.log", timeout=1.5, poll=0.05)
    assert run.timed_out
    assert run.returncode is not None and run.returncode < 0
    assert "started" in run.tail_text()
    child = int(child_pid_file.read_text())
    # the grandchild was in the same group, so SIGKILL reached it too; a signalled process dies
    # when next scheduled: wait (bounded) for its exit through a pidfd, readable once it exited
    try:
        pidfd = os.pidfd_open(child)
    except ProcessLookupError:
        return  # already gone and reaped
    try:
        readable, _, _ = select.select([pidfd], [], [], 10)
    finally:
        os.close(pidfd)
    assert readable, f"process {child} of the timed-out tool's group is still alive"


def test_cwd_is_the_tools_directory(tmp_path):
    workdir = tmp_path / "engine"
    workdir.mkdir()
    argv = script(tmp_path, "import os; print(os.getcwd())")
    run = run_tool(argv, cwd=workdir, log_path=tmp_path / "tool.log", timeout=30)
    assert run.returncode == 0 and run.tail_text() == str(workdir)
    assert os.getcwd() != str(workdir)
