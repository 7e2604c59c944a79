"""forked.Forked: work in a child process, its result, its UserError and its progress back in the caller — and verify's
digest findings from the child in the place they would take in turn."""
import os
import threading

import pytest

from mpconvert import forked
from mpconvert.errors import UserError
from mpconvert.forked import Forked


def _counting():
    steps, lock = [], threading.Lock()

    def on_step(n):
        with lock:
            steps.append(n)
    return steps, on_step


def test_result_and_progress_come_back_from_the_child():
    steps, on_step = _counting()
    parent = os.getpid()

    def work(step):
        for i in range(100):
            step(i)
        return {"pid": os.getpid(), "rows": list(range(10_000))}

    job = Forked(work, on_step)
    got = job.result()
    assert got["rows"] == list(range(10_000))
    assert got["pid"] != parent  # it ran in another process (this machine has two cores or more)
    assert steps == list(range(100))


def test_user_error_in_the_child_is_raised_in_the_caller():
    def work(step):
        raise UserError("shard.safetensors: truncated: tensor 'x' needs bytes up to 10")

    with pytest.raises(UserError, match="truncated: tensor 'x'"):
        Forked(work, lambda n: None).result()


def test_a_file_that_fails_in_the_child_is_raised_as_that_os_error(tmp_path):
    """A file the child reads that is gone (moved or removed meanwhile): the caller gets the same OSError, naming the
    file, so that the CLI says it as for its own reads — not an internal error; the child's traceback is its cause."""
    def work(step):
        os.open(tmp_path / "gone.safetensors", os.O_RDONLY)

    with pytest.raises(FileNotFoundError) as e:
        Forked(work, lambda n: None).result()
    assert e.value.filename == str(tmp_path / "gone.safetensors") and e.value.strerror == "No such file or directory"
    assert "in the worker process" in str(e.value.__cause__) and "os.open" in str(e.value.__cause__)


def test_an_unexpected_error_carries_the_childs_traceback():
    def work(step):
        return 1 // 0

    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        Forked(work, lambda n: None).result()


def test_a_killed_child_leaves_the_work_to_the_caller():
    """A child that dies without a result (the OOM killer) is neither a hang nor a wrong result: the work runs
    in the caller."""
    parent = os.getpid()

    def work(step):
        if os.getpid() != parent:
            os.kill(os.getpid(), 9)
        step(1)
        return "done here"

    steps, on_step = _counting()
    assert Forked(work, on_step).result() == "done here" and steps == [1]


def test_a_rerun_does_not_count_the_killed_childs_progress_twice():
    """The child reports 3 of 5 steps, then dies: the work runs again here, and the caller hears of 5 steps in all,
    not 8 (a progress bar past its total)."""
    parent = os.getpid()

    def work(step):
        for i in range(5):
            if i == 3 and os.getpid() != parent:
                os.kill(os.getpid(), 9)
            step(1)
        return "done"

    steps, on_step = _counting()
    assert Forked(work, on_step).result() == "done" and sum(steps) == 5


def test_the_child_never_runs_the_callers_code_after_it(tmp_path):
    """The child ends with os._exit: nothing after the work — the caller's own code, its finally blocks — runs twice."""
    marks = tmp_path / "marks"
    try:
        Forked(lambda step: 1, lambda n: None).result()
    finally:
        with open(marks, "a") as f:
            f.write(f"{os.getpid()}\n")
    assert marks.read_text().split() == [str(os.getpid())]


def test_cancel_stops_the_child():
    job = Forked(lambda step: __import__("time").sleep(60), lambda n: None)
    pid = job._pid
    job.cancel()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone and reaped


def test_one_core_runs_the_work_in_process(monkeypatch):
    monkeypatch.setattr(forked, "usable_cores", lambda: 1)
    steps, on_step = _counting()
    job = Forked(lambda step: (step(3), os.getpid())[1], on_step)
    assert job.result() == os.getpid() and steps == [3]


def test_the_child_dies_with_its_parent(tmp_path):
    """A build killed by kill -9 must not leave its forked child holding copies of its descriptors (the output lock
    among them): the child is killed with it."""
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = f"""
import os, time
from mpconvert.forked import Forked
def work(step):
    open({str(pids)!r}, "a").write(f"{{os.getpid()}}\\n")
    time.sleep(60)
job = Forked(work, lambda n: None)
time.sleep(60)
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    for _ in range(200):
        if pids.exists() and pids.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pids.read_text().split()[0])
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(200):
        if not _running(child):
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


def _running(pid: int) -> bool:
    """Whether pid is a live process: not gone and not a zombie (dead, its descriptors closed, waiting for whoever
    adopted it to reap it — some containers' init never does)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
