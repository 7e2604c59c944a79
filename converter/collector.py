"""Python's cyclic garbage collector and a job's long-lived structures.

A DeepSeek-V3-sized job holds millions of objects for the whole command (the plan; verify's shard headers and
manifest). Each full collection traverses all of them again, though they are never garbage: planning of 171k tensors
grew faster than the job (2.16 × the time for 2.05 × the tensors, docs/benchmarks.md session 21), and a verify spent
a tenth of its time in collections. Paused while they are made and then frozen (moved out of every later
collection), they cost nothing more — and a child forked after the freeze (forked.py) does not traverse them either,
nor copy their pages by touching their headers.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Callable, Iterator


@contextmanager
def paused_then_kept() -> Iterator[Callable[[], None]]:
    """The collector paused from the start of the block; the function it yields freezes everything made so far and
    resumes collecting (call it once the long-lived structures are made). At the end of the block the frozen objects
    go back to the collector: the commands also run in-process (the tests), where they become garbage later."""
    gc.disable()
    try:
        yield _keep
    finally:
        gc.enable()
        gc.unfreeze()


def _keep() -> None:
    gc.freeze()
    gc.enable()
