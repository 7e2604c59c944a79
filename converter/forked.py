"""Run one piece of work in a forked child process while the caller goes on with its own, on the machine's other
core: verify hashes and value-checks the tensors there while it checks config.json, the manifest and the splits
itself; planning checks the linears' values there while it plans the rest (both sides are Python over 171k tensors
at DeepSeek-V3 size: on threads they would share one core through the GIL).

The child gets the caller's memory as it was (copy-on-write: no pickling of what it reads), reports progress and
sends back only its (small) result; it never returns into the caller's code — it ends with os._exit, so no atexit
handler, temporary-directory cleanup or buffered output of the parent runs twice. On Linux only (macOS's system
libraries are not safe to use in a child forked without exec: CPython's multiprocessing spawns there), with two
cores or more; otherwise, and when the child dies without a result (the OOM killer), the work runs in-process when
its result is asked for.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")
_PROGRESS, _RESULT = b"P", b"R"
_RECORD = struct.Struct("<cQ")  # kind, then a step count or the length of the pickled result that follows


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _die_with(parent: int) -> None:
    """The child is killed when its parent dies (even by kill -9): it holds copies of the parent's descriptors — a
    build's output lock among them —, which must not outlive the build."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(1)


_PR_SET_PDEATHSIG = 1


class Forked(Generic[T]):
    """work(step) in a child process: step(n) reports progress (passed on to on_step in the caller, from a reader
    thread); result() waits for the child and returns what work returned, or raises the UserError or OSError it
    raised. Any other exception in the child is raised in the caller as a RuntimeError carrying the child's
    traceback."""

    def __init__(self, work: Callable[[Callable[[int], None]], T], on_step: Callable[[int], None]):
        self._work, self._on_step = work, on_step
        self._pid = None
        self._outcome: tuple[str, object] | None = None
        self._reported = 0  # steps the child reported (a rerun here does not report them again)
        if sys.platform != "linux" or usable_cores() < 2:
            return  # in-process, when result() is asked for
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            os.close(r)
            self._child(w, parent)
        os.close(w)
        self._pid = pid
        self._reader = threading.Thread(target=self._read, args=(r,), name="mpconvert-forked", daemon=True)
        self._reader.start()

    def _child(self, w: int, parent: int) -> None:
        try:
            _die_with(parent)
            out = os.fdopen(w, "wb", buffering=0)

            def step(n: int) -> None:
                out.write(_RECORD.pack(_PROGRESS, n))

            try:
                outcome = ("ok", self._work(step))
            except UserError as e:
                outcome = ("user", str(e))
            except OSError as e:  # a file that failed under the child: the caller names it as it would its own
                outcome = ("os", (e.errno, e.strerror, e.filename, traceback.format_exc()))
            except BaseException:  # noqa: BLE001 — sent to the caller, which raises it
                outcome = ("crash", traceback.format_exc())
            payload = pickle.dumps(outcome, pickle.HIGHEST_PROTOCOL)
            out.write(_RECORD.pack(_RESULT, len(payload)) + payload)
        finally:
            os._exit(0)

    def _read(self, r: int) -> None:
        with os.fdopen(r, "rb") as f:
            while True:
                head = f.read(_RECORD.size)
                if len(head) < _RECORD.size:
                    return  # the child ended without a result (killed): result() does the work here
                kind, n = _RECORD.unpack(head)
                if kind == _PROGRESS:
                    self._reported += n
                    self._on_step(n)
                else:
                    self._outcome = pickle.loads(f.read(n))
                    return

    def result(self) -> T:
        if self._pid is None:
            return self._work(self._on_step)
        self._reader.join()
        os.waitpid(self._pid, 0)
        self._pid = None
        if self._outcome is None:  # the child was killed: the work is done here instead
            return self._work(self._after_reported())
        kind, value = self._outcome
        if kind == "user":
            raise UserError(value)
        if kind == "os":
            errno_, strerror, filename, trace = value
            raise OSError(errno_, strerror, filename) from RuntimeError(f"in the worker process:\n{trace}")
        if kind == "crash":
            raise RuntimeError(f"the worker process failed:\n{value}")
        return value

    def _after_reported(self) -> Callable[[int], None]:
        """on_step for a rerun of the work here: the steps the killed child already reported are not reported again
        (a progress bar would overshoot its total)."""
        left = self._reported

        def step(n: int) -> None:
            nonlocal left
            skip = min(left, n)
            left -= skip
            if n > skip:
                self._on_step(n - skip)
        return step

    def cancel(self) -> None:
        """Stop the child (the caller gave up before asking for the result)."""
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
                os.waitpid(self._pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            self._pid = None
